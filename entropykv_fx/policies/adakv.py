"""AdaKV (Feng et al. 2024), on SnapKV's scoring: one top-k over all heads of a layer decides each head's budget.

Every layer keeps `Hkv x budget` head-slots, as in snapkv. Each KV head first gets a floor: its own best
`max(ALPHA x budget, sinks + window)` tokens (ALPHA = 0.2, the paper's safeguard). The rest of the layer's slots go to
the best remaining (head, token) scores of the whole layer, whichever heads they belong to, so heads whose
attention is spread out get more slots and concentrated heads fewer. Scores are comparable across heads because
each head's window attention sums to the same mass.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import ops
from . import HeadPlan, Policy, budget_bounds, pooled_head_scores

ALPHA = 0.2


def head_budgets(ranked: Tensor, mean: int, floor: int) -> Tensor:
    """[B, Hkv] budgets summing to Hkv x mean per row: `floor` each, the rest by one top-k over the layer. A layer
    holding fewer slots than `mean` (a sliding window's) keeps them all."""
    b, hkv, s = ranked.shape
    mean, floor = min(mean, s), min(floor, s)
    rest = ranked.sort(dim=-1, descending=True).values[:, :, floor:]  # what each head has beyond its floor
    top = rest.reshape(b, -1).topk(hkv * (mean - floor), dim=-1).indices
    won = torch.zeros(b, hkv, dtype=torch.int64, device=ranked.device)
    won.scatter_add_(1, top // (s - floor), torch.ones_like(top))
    return floor + won


def plan_heads(layers, n_tokens, config) -> HeadPlan:
    forced, mean, _ = budget_bounds(n_tokens, config)
    floor = min(mean, max(forced, math.ceil(ALPHA * mean)))
    scores = [pooled_head_scores(layer, config) for layer in layers]
    budgets = [head_budgets(ops.selection_ranks(s, layer.positions, config.sink_tokens, config.window), mean, floor)
               for s, layer in zip(scores, layers)]
    return HeadPlan(budgets, [[False] * s.shape[1] for s in scores], scores)


POLICY = Policy("adakv", None, needs_scores=True, plan_heads=plan_heads,
                summary="per-head budgets from one top-k over all heads of a layer, floor 0.2 x budget (AdaKV)")
