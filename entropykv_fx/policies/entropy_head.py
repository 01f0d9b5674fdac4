"""Entropy-tiered per-head compression (the entropy-adaptive KV compression article, `seeds/000`).

Each KV head's attention entropy (the mean over its query heads and the observation window, divided by
log(prompt length) so it lies in [0, 1] whatever the length) grades it into a tier, over all heads of the model:
  high   (entropy at or above the upper threshold): broad attention, keeps the most tokens, in the model's dtype;
  middle: keeps fewer tokens, stored int8 with one float32 scale per token and per K / V;
  low    (below the lower threshold): focused attention, sparsified hard, keeps only its top tokens.
`tier_thresholds` are quantiles of the heads' entropies (`tier_by="quantile"`, default a third of the heads each)
or normalised entropies (`tier_by="entropy"`). The compression rate is `budget`, a fraction of the full cache's
*bytes*: token counts follow TIER_TOKEN_WEIGHTS and are scaled together until the bytes they cost, counting int8
payloads and scales at their real size, fill the target. `crop_history` drops the oldest history: only the
sinks and the last `crop_history` prompt tokens may be kept.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import HeadPlan, Policy, budget_bounds, pooled_head_scores

LOW, MIDDLE, HIGH = 0, 1, 2
TIER_TOKEN_WEIGHTS = (0.25, 0.75, 1.0)  # relative tokens kept by a low, middle and high head
SCALE_BYTES = 4  # one float32 scale per token for K and one for V


def head_entropies(layers, n_tokens: int) -> Tensor:
    """[layers, Hkv] normalised attention entropy of each KV head (its GQA group's mean, over the batch)."""
    rows = []
    for layer in layers:
        b, hkv = layer.stats.kv_scores.shape[:2]
        rows.append(layer.stats.entropy.reshape(b, hkv, -1).mean(dim=(0, 2)))
    return torch.stack(rows).cpu() / math.log(max(n_tokens, 2))


def grade(entropy: Tensor, config) -> Tensor:
    """Tier (LOW / MIDDLE / HIGH) of every head, same shape as `entropy`."""
    lo, hi = config.tier_thresholds
    flat = entropy.flatten()
    if config.tier_by == "quantile":  # by rank, so that the tiers get round(q x heads) heads whatever the values
        rank = flat.argsort(stable=True).argsort()
        low, high = rank < round(lo * flat.numel()), rank >= round(hi * flat.numel())
    else:
        low, high = flat < lo, flat >= hi
    tiers = torch.full_like(flat, MIDDLE, dtype=torch.int64)
    return tiers.masked_fill(low, LOW).masked_fill(high, HIGH).reshape(entropy.shape)


def fit_tokens(weights: list[float], costs: list[int], lo: int, hi: int, target: int) -> list[int]:
    """Token counts floor(w x t) clamped to [lo, hi], with the largest scale t whose bytes sum(n x cost) fit `target`.

    When even `lo` tokens everywhere cost more than the target, every head keeps `lo` (the always-kept tokens).
    """
    def tokens(t: float) -> list[int]:
        return [min(hi, max(lo, math.floor(w * t))) for w in weights]

    fits, too_big = 0.0, hi / min(weights) + 1
    for _ in range(64):  # bisection: bytes grow with t in steps, so the largest fitting t is found to float precision
        t = (fits + too_big) / 2
        fits, too_big = (t, too_big) if sum(n * c for n, c in zip(tokens(t), costs)) <= target else (fits, t)
    return tokens(fits)


def plan_heads(layers, n_tokens, config) -> HeadPlan:
    forced, mean, _ = budget_bounds(n_tokens, config)
    tiers = grade(head_entropies(layers, n_tokens), config)
    dims = [layer.keys.shape[-1] + layer.values.shape[-1] for layer in layers]
    full_cost = [d * layers[0].keys.element_size() for d in dims]  # bytes of one token of one head, K + V
    costs = [d + 2 * SCALE_BYTES if t == MIDDLE else c
             for d, c, row in zip(dims, full_cost, tiers.tolist()) for t in row]
    target = mean * sum(c * tiers.shape[1] for c in full_cost)  # `budget` of the full cache's bytes
    candidates = n_tokens if config.crop_history is None else min(n_tokens, config.crop_history + config.sink_tokens)
    counts = fit_tokens([TIER_TOKEN_WEIGHTS[t] for t in tiers.flatten().tolist()], costs, forced, candidates, target)
    counts = torch.tensor(counts).reshape(tiers.shape)
    budgets, scores = [], []
    for i, layer in enumerate(layers):
        s = pooled_head_scores(layer, config)
        if config.crop_history is not None:  # older than the last crop_history positions: never kept (sinks excepted)
            last = layer.positions.max(-1, keepdim=True).values
            s = s.masked_fill((layer.positions <= last - config.crop_history)[:, None], float("-inf"))
        scores.append(s)
        budgets.append(counts[i].to(s.device).expand(s.shape[0], -1))
    return HeadPlan(budgets, [[t == MIDDLE for t in row] for row in tiers.tolist()], scores)


POLICY = Policy("entropy_head", None, needs_scores=True, plan_heads=plan_heads,
                summary="heads tiered by attention entropy: high keep most (model dtype), middle int8, low top tokens "
                        "only; budget is a bytes fraction (seeds/000)")
