"""Budget policies: small pure functions from prefill statistics to KV budgets.

A layer-wise policy maps the per-layer mean head entropies of a prompt (and the config) to how many tokens each
layer keeps. Token choice is shared: the layer's pooled attention scores go through `entropykv::select`.
A head-wise policy (`plan_heads`) decides per KV head instead: budgets, int8 storage and token ranking for every
head of every layer (`HeadPlan`); the cache then takes the ragged head-wise layout (`entropykv_fx.headwise`).
Adding a policy is one new module exposing a `POLICY` and one line in `POLICIES` below; `docs/policies.md`
describes each one.
"""

from __future__ import annotations

import math
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import BudgetFloorWarning

if TYPE_CHECKING:

    from ..cache import CompressedLayer
    from ..config import EntropyKVConfig

Allocate = Callable[[Sequence[float], int, "EntropyKVConfig"], list[int]]
TokenScores = Callable[["CompressedLayer", "EntropyKVConfig"], "Tensor"]
PlanHeads = Callable[[Sequence["CompressedLayer"], int, "EntropyKVConfig"], "HeadPlan"]
PlanLayers = Callable[[Sequence["CompressedLayer"], int, "EntropyKVConfig"], list[int]]
# (query [B,Hq,L,D], key [B,Hkv,S,D], query positions [B,L], config) -> a per-head statistic of the prefill
HeadStatistic = Callable[["Tensor", "Tensor", "Tensor", "EntropyKVConfig"], "Tensor"]


@dataclass(frozen=True)
class Policy:
    name: str
    allocate: Allocate | None  # per-layer budgets from entropies; None: plan_heads or plan_layers decides
    needs_scores: bool  # False: prefill runs without the scoring op (entropies are then nan)
    summary: str
    token_scores: TokenScores | None = None  # which tokens to keep; None: pooled window attention scores
    evicts: bool = True  # False: the cache is left whole
    plan_heads: PlanHeads | None = None  # set: per-KV-head budgets and the ragged head-wise layout
    prefill_statistic: HeadStatistic | None = None  # set: stored as `PrefillStats.head_statistic` at prefill
    scorers: tuple[str, ...] | None = None  # the scorers it accepts (`EntropyKVConfig` refuses others); None: all
    plan_layers: PlanLayers | None = None  # set: per-layer budgets from the scored layers, not from entropies alone
    scorer: str = "window"  # its own token scorer, used when the config names none (`entropykv_fx.scorers`)
    budgets_from_length: bool = False  # `allocate` reads the prompt length and config only, never the entropies
    # (n_tokens, config) -> the most tokens `allocate` can grant one layer, known before any statistic (its clamp)
    layer_ceiling: Callable[[int, EntropyKVConfig], int] | None = None
    # True: every (layer, head, token) score competes in one top-k over the whole cache (KVzip's allocation), so an
    # entry below the k-th best of the layers prefilled so far can never be kept (`compress.CacheTopKBound`)
    cache_wide_topk: bool = False

    @property
    def headwise(self) -> bool:
        return self.plan_heads is not None


def budget_bounds(n_tokens: int, config: EntropyKVConfig) -> tuple[int, int, int]:
    """(floor, mean, ceiling) per-layer budgets in tokens for a prompt of `n_tokens`.

    The floor is what is always kept (sinks + window); a requested mean below it is raised to it, with a
    warning, so a short prompt is compressed less rather than losing its window.
    """
    floor = min(n_tokens, config.sink_tokens + config.window)
    b = config.budget
    mean = min(n_tokens, b if isinstance(b, int) else round(b * n_tokens))
    if mean < floor:
        warnings.warn(f"entropykv: budget {b!r} gives {mean} tokens for a {n_tokens}-token prompt, below the "
                      f"{floor} always-kept sink+window tokens; keeping {floor} per layer", BudgetFloorWarning,
                      stacklevel=3)
        mean = floor
    return floor, mean, n_tokens


def distribute(weights: Sequence[float], total: int, lo: int, hi: int) -> list[int]:
    """Integers proportional to `weights`, each in [lo, hi], summing to `total` where that is feasible.

    Water-filling: layers hitting a bound are pinned there and the rest is shared again in proportion;
    then largest-remainder rounding keeps the sum exact.
    """
    n = len(weights)
    if n == 0:
        return []
    total = max(n * lo, min(n * hi, total))
    alloc: list[float | None] = [None] * n
    remaining = float(total)
    while True:
        free = [i for i in range(n) if alloc[i] is None]
        if not free:
            break
        wsum = sum(max(weights[i], 0.0) for i in free)
        share = {i: remaining * (max(weights[i], 0.0) / wsum if wsum > 0 else 1.0 / len(free)) for i in free}
        low = [i for i in free if share[i] < lo]
        high = [i for i in free if share[i] > hi]
        if not low and not high:
            for i in free:
                alloc[i] = share[i]
            break
        # Pin the side that overshoots more; pinning both at once can overshoot the total.
        pin, value = (low, lo) if sum(lo - share[i] for i in low) >= sum(share[i] - hi for i in high) else (high, hi)
        for i in pin:
            alloc[i] = float(value)
            remaining -= value
    ints = [min(hi, max(lo, math.floor(a))) for a in alloc]
    order = sorted(range(n), key=lambda i: (ints[i] - alloc[i], i))  # largest remainder first, then layer order
    short = total - sum(ints)
    for i in order:
        if short <= 0:
            break
        if ints[i] < hi:
            ints[i] += 1
            short -= 1
    return ints



# ------------------------------------------------------------------ scoring machinery shared by the policies
def pool_scores(scores: Tensor, pooling: str, kernel: int) -> Tensor:
    """Smooth scores [..., S] along the sequence so a kept token keeps its neighbours' context."""
    if pooling == "none" or kernel == 1:
        return scores
    flat = scores.reshape(-1, 1, scores.shape[-1])
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    pooled = pool(flat, kernel, stride=1, padding=kernel // 2)
    return pooled.reshape(scores.shape)


def pooled_head_scores(layer: CompressedLayer, config: EntropyKVConfig) -> Tensor:
    """The ranking of each KV head's tokens [B, Hkv, S] by the configured scorer (`entropykv_fx.scorers`); for
    the default `window` scorer, its window attention mass (GQA group summed), pooled."""
    from ..scorers import SCORERS

    return SCORERS[config.scorer].head_scores(layer, config)


@dataclass
class HeadPlan:
    """What a head-wise policy decided, per layer: budgets [B, Hkv] (tokens kept per row and KV head), which
    KV heads store int8, and the scores [B, Hkv, S] that rank each head's tokens (-inf: never kept)."""

    budgets: list[Tensor]
    int8_heads: list[list[bool]]
    scores: list[Tensor]

    def heads(self, kept: slice) -> HeadPlan:
        """The plan of KV heads `kept` only (a tensor-parallel rank's share of a plan made over all heads)."""
        return HeadPlan([b[:, kept] for b in self.budgets], [row[kept] for row in self.int8_heads],
                        [s[:, kept] for s in self.scores])

def per_head(layer_policy: Policy, name: str, summary: str) -> Policy:
    """`layer_policy`'s per-layer budgets with every KV head of a layer keeping its own top tokens by the scorer's
    per-head scores (the head-wise layout): SnapKV's per-head selection under any layer allocation."""

    def plan_heads(layers, n_tokens, config) -> HeadPlan:
        entropies = [float(layer.stats.entropy.mean()) for layer in layers]
        scores = [pooled_head_scores(layer, config) for layer in layers]
        budgets = [torch.full(s.shape[:2], b, dtype=torch.int64, device=s.device)
                   for s, b in zip(scores, layer_policy.allocate(entropies, n_tokens, config))]
        return HeadPlan(budgets, [[False] * s.shape[1] for s in scores], scores)

    return Policy(name, None, needs_scores=True, plan_heads=plan_heads, scorers=layer_policy.scorers,
                  scorer=layer_policy.scorer, summary=summary)


# (the modules use the helpers above)
from . import (  # noqa: E402
    adakv,
    cache_topk,
    entropy,
    entropy_focus,
    entropy_head,
    full,
    matrix_entropy,
    pyramidkv,
    snapkv,
    streaming,
    uniform,
)

POLICIES: dict[str, Policy] = {p.name: p for p in (
    entropy.POLICY, uniform.POLICY, pyramidkv.POLICY, streaming.POLICY, full.POLICY,
    snapkv.POLICY, adakv.POLICY, cache_topk.POLICY, cache_topk.LAYER_POLICY, entropy_head.POLICY, matrix_entropy.POLICY,
    entropy.HEAD_POLICY, pyramidkv.HEAD_POLICY, entropy_focus.POLICY, entropy_focus.HEAD_POLICY)}


def policies() -> dict[str, str]:
    """Name -> one-line summary of every available policy."""
    return {name: p.summary for name, p in POLICIES.items()}


class _PoliciesModule(types.ModuleType):
    """`entropykv_fx.policies()` lists the policies whether or not this subpackage has been imported yet (importing
    it rebinds the package attribute `policies` to this module; the package imports it lazily, so that
    `import entropykv_fx` and `entropykv-fx --help` do not load torch)."""

    def __call__(self) -> dict[str, str]:
        return policies()


sys.modules[__name__].__class__ = _PoliciesModule
