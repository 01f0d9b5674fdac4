"""The one configuration object of entropykv_fx, validated when it is built."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from .errors import EntropyKVError, short_repr

if TYPE_CHECKING:
    from .composition import Composition

Pooling = Literal["max", "avg", "none"]
BudgetSource = Literal["dynamic", "calibrated"]
TierBy = Literal["quantile", "entropy"]
MatrixStates = Literal["query", "key"]
_POOLINGS = ("max", "avg", "none")
_SOURCES = ("dynamic", "calibrated")
_TIER_BY = ("quantile", "entropy")
_MATRIX_STATES = ("query", "key")
# Token counts beyond int32 indices overflow torch's index arithmetic; no prompt comes near it.
MAX_TOKENS = 2**31 - 1
# A layer budget of mean budget x max_layer_budget must stay a finite float with an exact integer part.
MAX_LAYER_BUDGET = 1e6
# KVzip's cache-wide allocation over its reconstruction scores: the most accurate composition on the H200 needle
# sweeps (README, "The default"); the fast, exportable preset is "uniform".
DEFAULT_POLICY = "cache_topk"
_HEAD_TABLES = ("{{'head_fractions': {shape} numbers in (0, 1], 'int8_heads': {shape} booleans}}, as "
                "entropykv_fx.calibrate writes for a head-wise policy")


class ConfigError(EntropyKVError, ValueError):
    """An invalid configuration value: the message names the field, the value and what is accepted."""


def _fail(field: str, value: Any, accepted: str) -> None:
    raise ConfigError(f"EntropyKVConfig.{field}={short_repr(value)} is invalid: expected {accepted}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _int_in(value: Any, low: int, high: int = MAX_TOKENS) -> bool:
    return _is_int(value) and low <= value <= high


@dataclass(frozen=True)
class Calibration:
    """A calibration file as `entropykv_fx.calibrate` writes it, parsed and validated once (`read`).

    layer_fractions: kept fraction per layer; head_fractions / int8_heads: per layer and KV head (head-wise
    policies). policy / window / sink_tokens: the settings it was measured with. model / num_layers / num_kv_heads / num_attention_heads: what it was measured on, when recorded
    (older files lack them); `check_model` compares them with a model."""

    path: str
    layer_fractions: tuple[float, ...] | None = None
    head_fractions: tuple[tuple[float, ...], ...] | None = None
    int8_heads: tuple[tuple[bool, ...], ...] | None = None
    model: str | None = None
    policy: str | None = None
    window: int | None = None
    sink_tokens: int | None = None
    num_layers: int | None = None
    num_kv_heads: int | None = None
    num_attention_heads: int | None = None

    @classmethod
    def read(cls, path: str | os.PathLike) -> Calibration:
        """Parse and validate `path`; ConfigError names the file, the field and what is accepted."""
        path = str(path)

        def bad(field: str, accepted: str) -> ConfigError:
            return ConfigError(f"calibration file {path}: {field} is invalid: expected {accepted}")

        try:
            data = json.loads(Path(path).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"calibration file {path}: not valid JSON ({err}); expected "
                              "{'layer_fractions': [...]} with one number in (0, 1] per layer") from None
        except OSError as err:
            raise ConfigError(f"calibration file {path}: cannot be read ({err.strerror})") from None
        if not isinstance(data, dict):
            raise bad("the top level", "{'layer_fractions': [...]} with one number in (0, 1] per layer")
        fractions = data.get("layer_fractions")
        if fractions is not None and (not isinstance(fractions, list) or not fractions
                                      or not all(_is_number(f) and 0 < f <= 1 for f in fractions)):
            raise bad("'layer_fractions'", "{'layer_fractions': [...]} with one number in (0, 1] per layer, got "
                      f"{fractions!r}"[:200])
        heads, int8 = data.get("head_fractions"), data.get("int8_heads")
        if heads is not None or int8 is not None:
            def table(rows, ok) -> bool:
                return (isinstance(rows, list) and len(rows) > 0 and all(
                    isinstance(r, list) and len(r) == len(rows[0]) > 0 and all(map(ok, r)) for r in rows))

            if not (table(heads, lambda f: _is_number(f) and 0 < f <= 1) and table(int8, lambda x: isinstance(x, bool))
                    and [len(r) for r in heads] == [len(r) for r in int8]):
                raise bad("'head_fractions' / 'int8_heads'", _HEAD_TABLES.format(shape="[layers][kv heads]"))
        for key in ("model", "policy"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise bad(repr(key), f"a string, got {short_repr(data[key])}")
        counts = {}
        for key, low in (("window", 1), ("sink_tokens", 0), ("num_layers", 1), ("num_kv_heads", 1),
                         ("num_attention_heads", 1)):
            if data.get(key) is not None and not _int_in(data[key], low):
                raise bad(repr(key), f"an int >= {low}, got {short_repr(data[key])}")
            counts[key] = data.get(key)
        return cls(path, None if fractions is None else tuple(float(f) for f in fractions),
                   None if heads is None else tuple(tuple(float(f) for f in r) for r in heads),
                   None if int8 is None else tuple(tuple(r) for r in int8), data.get("model"), data.get("policy"),
                   **counts)

    def check_model(self, model: Any) -> None:
        """ConfigError unless this calibration was made for `model` (`check_shape`) and holds one row of fractions
        per layer of it."""
        actual = model_shape(model)
        self.check_shape(actual)
        if self.layer_fractions is not None and len(self.layer_fractions) != actual["num_layers"]:
            raise ConfigError(f"calibration file {self.path}: expected {{'layer_fractions': [...]}} with "
                              f"{actual['num_layers']} numbers in (0, 1], one per layer of this model; it holds "
                              f"{len(self.layer_fractions)}")
        if self.head_fractions is not None and (len(self.head_fractions), len(self.head_fractions[0])) != (
                actual["num_layers"], actual["num_kv_heads"]):
            raise ConfigError(f"calibration file {self.path}: head_fractions is [{len(self.head_fractions)}]"
                              f"[{len(self.head_fractions[0])}] but the model has {actual['num_layers']} layers of "
                              f"{actual['num_kv_heads']} KV heads")

    def check_shape(self, actual: dict[str, Any]) -> None:
        """ConfigError unless the architecture, layer and head counts the file records (older files record
        none) equal `actual`, a `model_shape`."""
        for key, value in actual.items():
            recorded = getattr(self, key)
            if recorded is not None and recorded != value:
                raise ConfigError(f"calibration file {self.path} was made for {key}={recorded!r}, but the model has "
                                  f"{key}={value!r}; calibrate this model (entropykv_fx.calibrate)")


def model_shape(model: Any) -> dict[str, Any]:
    """What a calibration records of the model it measured, and what `Calibration.check_shape` compares."""
    cfg = model.config
    return {"model": type(model).__name__, "num_layers": cfg.num_hidden_layers,
            "num_kv_heads": getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            "num_attention_heads": cfg.num_attention_heads}


@dataclass(frozen=True)
class EntropyKVConfig:
    """How the KV cache is compressed after prefill.

    policy: one of `entropykv_fx.policies()`, or a `Composition` (allocator x scorer x granularity,
        `entropykv_fx.composition`), which sets `policy` to the policy implementing it, `scorer` and its parts'
        parameters (a field also given with another value is refused); None (default): the policy a calibration
        file records when budget_source="calibrated" (it was measured with it; "uniform" for a file of per-layer fractions that
        records none), else DEFAULT_POLICY ("cache_topk").
    budget: a float in (0, 1] is the fraction of the prompt kept per layer on average; an int >= 1 is a token
        count per layer on average (capped at the prompt length).
    scorer: how tokens are ranked inside each budget (`entropykv_fx.scorers`): "window" (attention from the
        observation window, SnapKV), "last_query" (attention from the last prompt query, TOVA) or "key_norm"
        (negated key norm, Knorm) or "reconstruct" (attention received while the model re-reads the prompt,
        KVzip; a forward over twice the prompt). None (default): the policy's own, `Policy.scorer`
        ("reconstruct" for cache_topk and cache_topk_layer, "window" for the others). Policies that rank by
        position (streaming) or keep everything ignore it.
    repeat_prompt: token ids placed between the prompt and its repetition by the "reconstruct" scorer (e.g. the
        tokenized "Repeat the previous context exactly."); empty: the prompt is simply repeated.
    reconstruct_chunk: the "reconstruct" scorer repeats the prompt in chunks of this many tokens, each seeing the
        prompt up to its own end (chunked as KVzip does long contexts; `entropykv_fx.reconstruct` says how it differs), so the repetition reaches at most prompt + chunk +
        repeat_prompt positions and copies from chunk + repeat_prompt positions back (`entropykv_fx.reconstruct`).
    window: the last `window` prompt queries measure attention entropy (and score tokens, for the "window"
        scorer); those `window` tokens are always kept. A question at the end of the prompt that is longer than
        the window competes with the context for the budget (README, "The question inside the compressed prompt").
    sink_tokens: the first tokens of each sequence, always kept (attention sinks).
    pooling / pool_kernel: smoothing of token scores along the sequence before top-k, so neighbours of an
        important token survive with it.
    min_layer_budget / max_layer_budget: clamp of each layer's budget, as multiples of the mean layer budget.
    head_share (cache_topk): in [0, 1]; the cache-wide top-k sets each KV head's budget by the heads' own scores,
        then each head fills it with the tokens it ranks highest by max(its own score, head_share x the largest
        score any KV head of its layer gives the token), so a token one head needs also counts for its neighbours.
        0: every head by its own scores (KVzip); 1: every head by the largest score any head of its layer gives.
    budget_source: "dynamic" computes layer budgets from each prompt's entropies; "calibrated" uses per-layer
        fractions from `calibration_file` (written by `entropykv_fx.calibrate`), which gives static shapes;
        head-wise policies use per-head fractions and int8 storage from it (`head_calibration`). The file is
        read and validated once, when the config is built (`calibration`, a `Calibration`); editing or deleting
        it afterwards changes nothing.

    Head-wise policies (docs/policies.md):
    tier_by / tier_thresholds (entropy_head): the (low, high) boundaries between the low, middle and high entropy
        tiers of heads, as quantiles of the heads' entropies ("quantile") or as entropies normalised by
        log(prompt length) ("entropy"); both in [0, 1].
    crop_history (entropy_head): None, or keep only the sinks and the last `crop_history` prompt tokens.
    matrix_states / matrix_rank (matrix_entropy): which states ("query" or "key") and how many top eigenvalues
        the truncated matrix entropy uses.
    head_groups / layer_groups (matrix_entropy): how many budget tiers the heads of a layer, and the layers, form.
    """

    policy: str | Composition | None = None  # DEFAULT_POLICY, or a calibration file's own
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
    scorer: str | None = None  # after the older fields: they keep their positions
    repeat_prompt: tuple[int, ...] = ()
    reconstruct_chunk: int = 1024
    head_share: float = 0.0
    # Set by the config itself from calibration_file (kept across `replace` while the file name is unchanged).
    calibration: Calibration | None = dataclasses.field(default=None, repr=False, compare=False)
    # Set by the config itself: the policy / scorer were not named (None), so `replace` resolves them again (a new
    # policy brings its own scorer; a new calibration file its own policy).
    policy_by_default: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)
    scorer_from_policy: bool = dataclasses.field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .composition import Composition
        from .policies import POLICIES  # late import: policies import the config module

        if isinstance(self.policy, Composition):
            self._take_composition(self.policy)
        object.__setattr__(self, "policy_by_default", self.policy is None)
        if self.policy is None:
            object.__setattr__(self, "policy", self._calibrated_policy() or DEFAULT_POLICY)
        if not isinstance(self.policy, str) or self.policy not in POLICIES:
            _fail("policy", self.policy, f"one of {sorted(POLICIES)}")
        from .scorers import SCORERS

        object.__setattr__(self, "scorer_from_policy", self.scorer is None)
        if self.scorer is None:
            object.__setattr__(self, "scorer", POLICIES[self.policy].scorer)
        if not isinstance(self.scorer, str) or self.scorer not in SCORERS:
            _fail("scorer", self.scorer, f"one of {sorted(SCORERS)}")
        accepted = POLICIES[self.policy].scorers
        if accepted is not None and self.scorer not in accepted:
            _fail("scorer", self.scorer, f"one of {list(accepted)} with policy {self.policy!r}")
        r = self.repeat_prompt
        if not isinstance(r, (tuple, list)) or len(r) > MAX_TOKENS or not all(_int_in(t, 0) for t in r):
            _fail("repeat_prompt", r, "a tuple of token ids (ints >= 0)")
        object.__setattr__(self, "repeat_prompt", tuple(int(t) for t in r))
        if not _int_in(self.reconstruct_chunk, 1):
            _fail("reconstruct_chunk", self.reconstruct_chunk, f"an int >= 1 (tokens, at most {MAX_TOKENS})")
        b = self.budget
        if _is_int(b):
            if not 1 <= b <= MAX_TOKENS:
                _fail("budget", b, f"an int >= 1 (tokens, at most {MAX_TOKENS}) or a float in (0, 1] (fraction of the prompt)")
        elif isinstance(b, float):
            if not (0.0 < b <= 1.0) or math.isnan(b):
                _fail("budget", b, "a float in (0, 1] (fraction of the prompt) or an int >= 1 (tokens)")
        else:
            _fail("budget", b, "a float in (0, 1] or an int >= 1")
        if not _int_in(self.window, 1):
            _fail("window", self.window, f"an int >= 1 (at most {MAX_TOKENS})")
        if not _int_in(self.sink_tokens, 0):
            _fail("sink_tokens", self.sink_tokens, f"an int >= 0 (at most {MAX_TOKENS})")
        if _is_int(b) and b < self.window + self.sink_tokens:
            _fail("budget", b, f"at least window + sink_tokens = {self.window + self.sink_tokens} tokens, "
                  "since those are always kept")
        if self.pooling not in _POOLINGS:
            _fail("pooling", self.pooling, f"one of {_POOLINGS}")
        if not _int_in(self.pool_kernel, 1) or self.pool_kernel % 2 == 0:
            _fail("pool_kernel", self.pool_kernel, f"an odd int >= 1 (at most {MAX_TOKENS})")
        if not _is_number(self.min_layer_budget) or not 0.0 <= self.min_layer_budget <= 1.0:
            _fail("min_layer_budget", self.min_layer_budget, "a number in [0, 1] (multiple of the mean layer budget)")
        if not _is_number(self.head_share) or not 0.0 <= self.head_share <= 1.0:
            _fail("head_share", self.head_share, "a number in [0, 1] (fraction of the layer's largest score)")
        if self.head_share and self.policy != "cache_topk":
            _fail("head_share", self.head_share, f"0 with policy {self.policy!r}: only 'cache_topk' shares rankings "
                  "across a layer's heads")
        if not _is_number(self.max_layer_budget) or not 1.0 <= self.max_layer_budget <= MAX_LAYER_BUDGET:
            _fail("max_layer_budget", self.max_layer_budget,
                  f"a finite number >= 1 and <= {MAX_LAYER_BUDGET:g} (multiple of the mean layer budget)")
        if self.calibration is not None and not isinstance(self.calibration, Calibration):
            _fail("calibration", self.calibration, "None (it is read from calibration_file)")
        if self.budget_source not in _SOURCES:
            _fail("budget_source", self.budget_source, f"one of {_SOURCES}")
        if self.budget_source == "calibrated":
            if not isinstance(self.calibration_file, (str, os.PathLike)):
                _fail("calibration_file", self.calibration_file,
                      "a path to a calibration JSON when budget_source='calibrated'")
            if self.calibration is None or self.calibration.path != str(self.calibration_file):
                if not Path(self.calibration_file).is_file():
                    _fail("calibration_file", self.calibration_file, "an existing calibration JSON file")
                object.__setattr__(self, "calibration", Calibration.read(self.calibration_file))
            if POLICIES[self.policy].headwise:
                self.head_calibration()  # a per-layer calibration file fails here, not after a prefill
            elif self.calibration.layer_fractions is None:
                raise ConfigError(f"calibration file {self.calibration_file}: expected {{'layer_fractions': [...]}} "
                                  f"with one number in (0, 1] per layer (policy {self.policy!r} is layer-wise)")
        else:
            if self.calibration_file is not None:
                _fail("calibration_file", self.calibration_file, "None unless budget_source='calibrated'")
            object.__setattr__(self, "calibration", None)
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
        if c is not None and not _int_in(c, self.window):
            _fail("crop_history", c, f"None or an int >= window = {self.window} (the window is always kept; at "
                  f"most {MAX_TOKENS})")
        if self.matrix_states not in _MATRIX_STATES:
            _fail("matrix_states", self.matrix_states, f"one of {_MATRIX_STATES}")
        for name in ("matrix_rank", "head_groups", "layer_groups"):
            if not _int_in(getattr(self, name), 1):
                _fail(name, getattr(self, name), f"an int >= 1 (at most {MAX_TOKENS})")

    def replace(self, **overrides: Any) -> EntropyKVConfig:
        names = {f.name for f in dataclasses.fields(self) if f.init}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise ConfigError(f"unknown EntropyKVConfig field(s) {unknown}: accepted fields are {sorted(names)}")
        again = {name: None for name, unnamed in (("policy", self.policy_by_default), ("scorer", self.scorer_from_policy))
                 if unnamed and name not in overrides}
        from .composition import PART_FIELDS, Composition

        if isinstance(overrides.get("policy"), Composition):  # it owns its fields: none carries over from before
            again.update({name: _DEFAULTS[name] for name in PART_FIELDS if name not in overrides})
        elif overrides.get("policy") not in (None, "cache_topk") and "head_share" not in overrides:
            again["head_share"] = _DEFAULTS["head_share"]  # cache_topk's alone, refused with another policy
        return dataclasses.replace(self, **again, **overrides)

    def _take_composition(self, composition) -> None:
        """Set the fields a `Composition` owns; a field also given here with another value than its default is
        refused rather than silently overridden."""
        for name, value in composition.fields().items():
            given = getattr(self, name)
            if name != "policy" and given != _DEFAULTS[name] and given != value:
                _fail(name, given, f"{value!r} as the composition {composition} sets it, or leave it out (set it "
                      "in the composition's parts)")
            object.__setattr__(self, name, value)

    def _calibrated_policy(self) -> str | None:
        """The policy a calibration file was measured with, when budgets come from one (read once, here)."""
        if self.budget_source != "calibrated" or not isinstance(self.calibration_file, (str, os.PathLike)):
            return None  # the checks below name what is wrong
        if self.calibration is None or self.calibration.path != str(self.calibration_file):
            if not Path(self.calibration_file).is_file():
                return None
            object.__setattr__(self, "calibration", Calibration.read(self.calibration_file))
        if self.calibration.policy is None and self.calibration.head_fractions is None:
            return "uniform"  # an unrecorded policy of per-layer fractions: a layer-wise one (the static budgets)
        return self.calibration.policy

    def layer_fractions(self, num_layers: int) -> list[float]:
        """Per-layer kept fractions of the calibration parsed when the config was built (never re-read)."""
        fractions = self.calibration.layer_fractions if self.calibration is not None else None
        if fractions is None or len(fractions) != num_layers:
            raise ConfigError(
                f"calibration file {self.calibration_file}: expected {{'layer_fractions': [...]}} with "
                f"{num_layers} numbers in (0, 1], one per layer of this model; it holds "
                f"{'none' if fractions is None else len(fractions)}")
        return list(fractions)

    def head_calibration(self, num_layers: int | None = None,
                         num_kv_heads: int | None = None) -> tuple[list[list[float]], list[list[bool]]]:
        """(kept fraction, int8 storage) per layer and KV head of the parsed head-wise calibration.

        Shapes are checked against the model when `num_layers` / `num_kv_heads` are given (ConfigError)."""
        cal = self.calibration
        shape = f"[{num_layers or 'layers'}][{num_kv_heads or 'kv heads'}]"
        if (cal is None or cal.head_fractions is None or len(cal.head_fractions) != (num_layers or len(cal.head_fractions))
                or len(cal.head_fractions[0]) != (num_kv_heads or len(cal.head_fractions[0]))):
            raise ConfigError(f"calibration file {self.calibration_file}: expected {_HEAD_TABLES.format(shape=shape)}")
        return [list(row) for row in cal.head_fractions], [list(row) for row in cal.int8_heads]


# Every field's default, to tell a value given from one left out (a composition owns some fields).
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EntropyKVConfig)}
