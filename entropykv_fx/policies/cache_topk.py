"""KVzip's allocation (Kim et al. 2025, arXiv 2505.23416, §3.3): one top-k over every layer's and KV head's scores.

The cache keeps `layers x Hkv x budget` head-slots in all, like snapkv and adakv, but nothing fixes how they are
shared: every (layer, KV head, token) score of a sequence competes in one top-k, so a head or a layer whose
attention is concentrated on a few tokens keeps few, and one that spreads it keeps many. Each head's sinks and
window rank +inf and are always kept. This needs scores that mean the same in every layer and head: attention
probabilities do (the `window`, `last_query` and `reconstruct` scorers); key norms (`key_norm`) do not, and are
refused. KVzip pairs it with context-reconstruction scores (`scorer="reconstruct"`); here it composes with any
attention scorer. Budgets are per sequence of a batch.

`head_share` (ours, not KVzip's) keeps those budgets but lets each head fill its own with the tokens its layer's
other heads value too (`shared_scores`): the head that scored a token while the model re-read the prompt is not
always the one that retrieves it when a question comes.

`cache_topk_layer` is the same allocation at layer granularity: each layer ranks tokens by its layer scores (the
heads' scores combined as the scorer says: summed, or max for `reconstruct`), one top-k over all layers sets each
layer's budget, and every KV head of a layer keeps the same tokens (the layer-wise layout, so decode keeps one
attention call per layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from . import HeadPlan, Policy, budget_bounds, pooled_head_scores


def cache_budgets(ranked: list[Tensor], mean: int) -> list[Tensor]:
    """Per layer [B, Hkv] token budgets from one top-k per row over all of `ranked` (per layer [B, Hkv, S_l],
    as `ops.selection_ranks` gives). Each row's total is the sum over layers of Hkv x min(mean, S_l)."""
    flat = torch.cat([r.flatten(1) for r in ranked], 1)  # [B, sum_l Hkv * S_l]
    total = sum(r.shape[1] * min(mean, r.shape[2]) for r in ranked)
    lengths = torch.tensor([r.shape[2] for r in ranked for _ in range(r.shape[1])], device=flat.device)
    owner = torch.arange(len(lengths), device=flat.device).repeat_interleave(lengths)  # (layer, head) of each entry
    top = flat.topk(total, dim=-1).indices
    won = torch.zeros(flat.shape[0], len(lengths), dtype=torch.int64, device=flat.device)
    won.scatter_add_(1, owner[top], torch.ones_like(top))
    return list(won.split([r.shape[1] for r in ranked], dim=1))


def _ranked(scores: list[Tensor], layers, config) -> list[Tensor]:
    return [ops.selection_ranks(s, layer.positions, config.sink_tokens, config.window) for s, layer in zip(scores, layers)]


def plan_layers(layers, n_tokens, config) -> list[int]:
    from ..scorers import SCORERS  # late import: scorers import this package

    _, mean, _ = budget_bounds(n_tokens, config)
    scores = [SCORERS[config.scorer].layer_scores(layer, config) for layer in layers]
    budgets = cache_budgets([r[:, None] for r in _ranked(scores, layers, config)], mean)
    return [int(b.amax()) for b in budgets]  # one sequence at a time (`compress_cache` splits batches)


def shared_scores(scores: Tensor, share: float) -> Tensor:
    """[B, Hkv, S] head scores where each head also values, at `share` of its worth, what any head of the layer
    values most: max(own, share x max over heads). Only the choice of tokens inside a head's budget uses them:
    allocating budgets by them too (tried first) gave every head of a layer the layer's budget at share 1, and at
    10% kept that lost most questions (`benchmarks/results/sweep_cpu_share.md`)."""
    return scores if share == 0 else torch.maximum(scores, share * scores.amax(1, keepdim=True))


def plan_heads(layers, n_tokens, config) -> HeadPlan:
    """Budgets from the heads' own scores (KVzip); each head fills its budget by the `head_share`d scores."""
    _, mean, _ = budget_bounds(n_tokens, config)
    own = [pooled_head_scores(layer, config) for layer in layers]
    shared = [shared_scores(s, config.head_share) for s in own]
    return HeadPlan(cache_budgets(_ranked(own, layers, config), mean), [[False] * s.shape[1] for s in own], shared)


ATTENTION_SCORERS = ("window", "last_query", "reconstruct")  # attention probabilities: comparable everywhere
POLICY = Policy("cache_topk", None, needs_scores=True, plan_heads=plan_heads, scorers=ATTENTION_SCORERS,
                cache_wide_topk=True, scorer="reconstruct",
                summary="per-(layer, KV head) budgets from one top-k over the whole cache's scores (KVzip's allocation)")
LAYER_POLICY = Policy("cache_topk_layer", None, needs_scores=True, plan_layers=plan_layers, scorers=ATTENTION_SCORERS,
                      cache_wide_topk=True, scorer="reconstruct",
                      summary="per-layer budgets from one top-k over every layer's scores; one token set per layer")
