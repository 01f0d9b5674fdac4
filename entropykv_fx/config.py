"""The one configuration object of entropykv_fx, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .errors import EntropyKVError

Pooling = Literal["max", "avg", "none"]
BudgetSource = Literal["dynamic", "calibrated"]
TierBy = Literal["quantile", "entropy"]
MatrixStates = Literal["query", "key"]
_POOLINGS = ("max", "avg", "none")
_SOURCES = ("dynamic", "calibrated")
_TIER_BY = ("quantile", "entropy")
_MATRIX_STATES = ("query", "key")


class ConfigError(EntropyKVError, ValueError):
    """An invalid configuration value: the message names the field, the value and what is accepted."""


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"EntropyKVConfig.{field}={value!r} is invalid: expected {accepted}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class EntropyKVConfig:
    """How the KV cache is compressed after prefill.

    budget: a float in (0, 1] is the fraction of the prompt kept per layer on average; an int >= 1 is a token
        count per layer on average (capped at the prompt length).
    scorer: how tokens are ranked inside each budget (`entropykv_fx.scorers`): "window" (attention from the
        observation window, SnapKV), "last_query" (attention from the last prompt query, TOVA) or "key_norm"
        (negated key norm, Knorm). Policies that rank by position (streaming) or keep everything ignore it.
    window: the last `window` prompt queries measure attention entropy (and score tokens, for the "window"
        scorer); those `window` tokens are always kept.
    sink_tokens: the first tokens of each sequence, always kept (attention sinks).
    pooling / pool_kernel: smoothing of token scores along the sequence before top-k, so neighbours of an
        important token survive with it.
    min_layer_budget / max_layer_budget: clamp of each layer's budget, as multiples of the mean layer budget.
    budget_source: "dynamic" computes layer budgets from each prompt's entropies; "calibrated" reads per-layer
        fractions from `calibration_file` (written by `entropykv_fx.calibrate`), which gives static shapes;
        head-wise policies read per-head fractions and int8 storage from it (`head_calibration`).

    Head-wise policies (docs/policies.md):
    tier_by / tier_thresholds (entropy_head): the (low, high) boundaries between the low, middle and high entropy
        tiers of heads, as quantiles of the heads' entropies ("quantile") or as entropies normalised by
        log(prompt length) ("entropy"); both in [0, 1].
    crop_history (entropy_head): None, or keep only the sinks and the last `crop_history` prompt tokens.
    matrix_states / matrix_rank (matrix_entropy): which states ("query" or "key") and how many top eigenvalues
        the truncated matrix entropy uses.
    head_groups / layer_groups (matrix_entropy): how many budget tiers the heads of a layer, and the layers, form.
    """

    policy: str = "entropy"
    budget: float | int = 0.25
    window: int = 32
    sink_tokens: int = 4
    pooling: Pooling = "max"
    pool_kernel: int = 7
    min_layer_budget: float = 0.25
    max_layer_budget: float = 4.0
    budget_source: BudgetSource = "dynamic"
    calibration_file: str | None = None
    tier_by: TierBy = "quantile"
    tier_thresholds: tuple[float, float] = (1 / 3, 2 / 3)
    crop_history: int | None = None
    matrix_states: MatrixStates = "query"
    matrix_rank: int = 32
    head_groups: int = 2
    layer_groups: int = 2
    scorer: str = "window"  # last: fields keep their positions

    def __post_init__(self) -> None:
        from .policies import POLICIES  # late import: policies import the config module

        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            _fail("policy", self.policy, f"one of {sorted(POLICIES)}")
        from .scorers import SCORERS

        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            _fail("scorer", self.scorer, f"one of {sorted(SCORERS)}")
        b = self.budget
        if _is_int(b):
            if b < 1:
                _fail("budget", b, "an int >= 1 (tokens) or a float in (0, 1] (fraction of the prompt)")
        elif isinstance(b, float):
            if not (0.0 < b <= 1.0) or math.isnan(b):
                _fail("budget", b, "a float in (0, 1] (fraction of the prompt) or an int >= 1 (tokens)")
        else:
            _fail("budget", b, "a float in (0, 1] or an int >= 1")
        if not _is_int(self.window) or self.window < 1:
            _fail("window", self.window, "an int >= 1")
        if not _is_int(self.sink_tokens) or self.sink_tokens < 0:
            _fail("sink_tokens", self.sink_tokens, "an int >= 0")
        if _is_int(b) and b < self.window + self.sink_tokens:
            _fail("budget", b, f"at least window + sink_tokens = {self.window + self.sink_tokens} tokens, "
                  "since those are always kept")
        if self.pooling not in _POOLINGS:
            _fail("pooling", self.pooling, f"one of {_POOLINGS}")
        if not _is_int(self.pool_kernel) or self.pool_kernel < 1 or self.pool_kernel % 2 == 0:
            _fail("pool_kernel", self.pool_kernel, "an odd int >= 1")
        if not _is_number(self.min_layer_budget) or not 0.0 <= self.min_layer_budget <= 1.0:
            _fail("min_layer_budget", self.min_layer_budget, "a number in [0, 1] (multiple of the mean layer budget)")
        if not _is_number(self.max_layer_budget) or not 1.0 <= self.max_layer_budget < math.inf:
            _fail("max_layer_budget", self.max_layer_budget, "a finite number >= 1 (multiple of the mean layer budget)")
        if self.budget_source not in _SOURCES:
            _fail("budget_source", self.budget_source, f"one of {_SOURCES}")
        if self.budget_source == "calibrated":
            if not isinstance(self.calibration_file, (str, os.PathLike)):
                _fail("calibration_file", self.calibration_file,
                      "a path to a calibration JSON when budget_source='calibrated'")
            if not Path(self.calibration_file).is_file():
                _fail("calibration_file", self.calibration_file, "an existing calibration JSON file")
        elif self.calibration_file is not None:
            _fail("calibration_file", self.calibration_file, "None unless budget_source='calibrated'")
        if self.budget_source == "calibrated" and POLICIES[self.policy].headwise:
            self.head_calibration()  # a per-layer calibration file fails here, not after a prefill
        self._check_headwise_fields()

    def _check_headwise_fields(self) -> None:
        if self.tier_by not in _TIER_BY:
            _fail("tier_by", self.tier_by, f"one of {_TIER_BY}")
        t = self.tier_thresholds
        if (not isinstance(t, (tuple, list)) or len(t) != 2 or not all(_is_number(x) for x in t)
                or not 0.0 <= t[0] <= t[1] <= 1.0):
            _fail("tier_thresholds", t, "two numbers (low, high) with 0 <= low <= high <= 1")
        object.__setattr__(self, "tier_thresholds", (float(t[0]), float(t[1])))
        c = self.crop_history
        if c is not None and (not _is_int(c) or c < self.window):
            _fail("crop_history", c, f"None or an int >= window = {self.window} (the window is always kept)")
        if self.matrix_states not in _MATRIX_STATES:
            _fail("matrix_states", self.matrix_states, f"one of {_MATRIX_STATES}")
        for name in ("matrix_rank", "head_groups", "layer_groups"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                _fail(name, getattr(self, name), "an int >= 1")

    def replace(self, **overrides: Any) -> EntropyKVConfig:
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown EntropyKVConfig field(s) {unknown}: accepted fields are {sorted(names)}")
        return dataclasses.replace(self, **overrides)

    def _calibration(self, expected: str) -> Any:
        try:
            return json.loads(Path(self.calibration_file).read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"calibration file {self.calibration_file}: not valid JSON ({err}); expected {expected}") from err

    def layer_fractions(self, num_layers: int) -> list[float]:
        """Per-layer kept fractions from the calibration file (budget_source='calibrated')."""
        data = self._calibration(f"{{'layer_fractions': [...]}} with {num_layers} numbers in (0, 1]")
        fractions = data.get("layer_fractions") if isinstance(data, dict) else None
        if (not isinstance(fractions, list) or len(fractions) != num_layers
                or not all(_is_number(f) and 0 < f <= 1 for f in fractions)):
            raise ConfigError(
                f"calibration file {self.calibration_file}: expected {{'layer_fractions': [...]}} with "
                f"{num_layers} numbers in (0, 1], one per layer of this model")
        return [float(f) for f in fractions]

    def head_calibration(self, num_layers: int | None = None,
                         num_kv_heads: int | None = None) -> tuple[list[list[float]], list[list[bool]]]:
        """(kept fraction, int8 storage) per layer and KV head from a head-wise calibration file.

        Shapes are checked against the model when `num_layers` / `num_kv_heads` are given.
        """
        shape = f"[{num_layers or 'layers'}][{num_kv_heads or 'kv heads'}]"
        expected = (f"{{'head_fractions': {shape} numbers in (0, 1], 'int8_heads': {shape} booleans}}, as "
                    "entropykv_fx.calibrate writes for a head-wise policy")
        data = self._calibration(expected)
        fractions = data.get("head_fractions") if isinstance(data, dict) else None
        int8 = data.get("int8_heads") if isinstance(data, dict) else None

        def table(rows, ok) -> bool:
            return (isinstance(rows, list) and len(rows) > 0 and len(rows) == (num_layers or len(rows))
                    and all(isinstance(r, list) and len(r) == (num_kv_heads or len(rows[0])) and all(map(ok, r))
                            for r in rows))

        if not (table(fractions, lambda f: _is_number(f) and 0 < f <= 1) and table(int8, lambda x: isinstance(x, bool))
                and [len(r) for r in fractions] == [len(r) for r in int8]):
            raise ConfigError(f"calibration file {self.calibration_file}: expected {expected}")
        return [[float(f) for f in row] for row in fractions], int8
