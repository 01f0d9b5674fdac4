"""SnapKV (Li et al. 2024): every KV head keeps its own top tokens, with the same budget in every head and layer.

The last `window` (32) prompt queries score the prefix; each KV head ranks tokens by the attention mass its own
query heads give them (summed over the GQA group), max-pooled with kernel `pool_kernel` (7) so a kept token keeps
its neighbours, and keeps its top `budget` tokens (the window and the sinks always among them). Heads differ in
which tokens they keep, not in how many, so the cache takes the head-wise layout with equal lengths.
"""

from __future__ import annotations

import torch

from . import HeadPlan, Policy, budget_bounds, pooled_head_scores


def plan_heads(layers, n_tokens, config) -> HeadPlan:
    _, mean, _ = budget_bounds(n_tokens, config)
    scores = [pooled_head_scores(layer, config) for layer in layers]
    budgets = [torch.full(s.shape[:2], mean, dtype=torch.int64, device=s.device) for s in scores]
    return HeadPlan(budgets, [[False] * s.shape[1] for s in scores], scores)


POLICY = Policy("snapkv", None, needs_scores=True, plan_heads=plan_heads,
                summary="per-KV-head top tokens by pooled window attention, same budget everywhere (SnapKV)")
