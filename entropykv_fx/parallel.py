"""Tensor parallelism: `optimize()` on a model loaded with transformers' `tp_plan="auto"` under `torchrun`.

Each rank holds some of every layer's attention heads, so its prefill measures only their entropies and token scores;
budgets and selections made from those would differ between ranks, and a rank keeping other tokens than its peers
corrupts the output. `combine_prefill_stats` therefore gives every rank the statistics of all heads before any budget
or selection is made: each layer's per-head entropies are gathered, its token scores reduced the way the scorer
combines heads (summed, or the largest). Every rank then computes the same budgets and keeps the same positions for
the heads it holds. That is two collectives per layer, once per prefill; decoding needs none of ours.
`check_same_positions` verifies the outcome (`optimize(..., verify_ranks=True)`).

Head-wise policies (one token set per KV head) plan over all heads: the per-KV-head token scores (and a policy's own
per-head statistic) are gathered too, every rank makes the same plan for every head, and keeps the share of the
heads it holds (`local_heads`; `compress.compress_cache(heads=...)`). Their outcome is verified on the statistics
(`check_same_stats`): the plan is a deterministic function of them, and the ranks hold different heads.

Supported: every policy with the attention scorers (`window`, `last_query`, `reconstruct`). Refused at `optimize()`:
`key_norm` (its scores come from each rank's keys at compression), and KV-head counts that do not divide by the
number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .cache import EntropyKVCache, PrefillStats
from .errors import EntropyKVError


class RankDivergenceError(EntropyKVError, RuntimeError):
    """Tensor-parallel ranks kept different token positions (`verify_ranks=True`)."""


def tensor_parallel_group(model: nn.Module) -> dist.ProcessGroup | None:
    """The process group the model's weights are sharded over by transformers' tensor parallelism (the mesh's
    "tp" dimension), found from its DTensor parameters; None when the model is not sharded."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.tensor import DTensor

    for p in model.parameters():
        if isinstance(p, DTensor):
            mesh = p.device_mesh
            group = mesh.get_group("tp") if "tp" in (mesh.mesh_dim_names or ()) else mesh.get_group()
            return group if dist.get_world_size(group) > 1 else None
    return None


def _gathered(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Every rank's `t` [B, H_rank, ...] concatenated along dim 1 in rank order: the tensor over all heads."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, 1)


def combine_prefill_stats(cache: EntropyKVCache, group: dist.ProcessGroup, combine: str, heads: bool = False) -> None:
    """Replace every scored layer's statistics by those of all heads of the group: entropy [B, Hq] gathered in rank
    order (rank r holds heads r * Hq/ranks onwards), layer_scores [B, S] reduced by `combine` ("sum" or "max").
    With `heads` (a head-wise policy) kv_scores [B, Hkv, S] and the per-head statistic are gathered as well; else
    they stay this rank's."""
    op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[combine]
    for layer in cache.layers:
        st = layer.stats
        if st is None:
            continue
        scores = st.layer_scores.contiguous().clone()
        dist.all_reduce(scores, op=op, group=group)
        kv_scores, statistic = st.kv_scores, st.head_statistic
        if heads:
            kv_scores = _gathered(kv_scores, group)
            statistic = None if statistic is None else _gathered(statistic, group)
        layer.stats = PrefillStats(_gathered(st.entropy, group), kv_scores, scores, statistic)


def local_heads(cache: EntropyKVCache, group: dist.ProcessGroup) -> slice:
    """The KV heads of a plan over all heads that this rank's cache holds (rank r: the r-th equal share)."""
    held = cache.layers[0].keys.shape[1]
    start = dist.get_rank(group) * held
    return slice(start, start + held)


def check_same_stats(cache: EntropyKVCache, group: dist.ProcessGroup) -> None:
    """RankDivergenceError unless every rank's combined statistics equal rank 0's, layer by layer (before a
    head-wise plan is made from them)."""
    differ = []
    for i, layer in enumerate(cache.layers):
        st = layer.stats
        if st is None:
            continue
        mine = torch.cat([t.flatten().float() for t in (st.entropy, st.kv_scores, st.layer_scores) +
                          ((st.head_statistic,) if st.head_statistic is not None else ())])
        if _differs(mine, group):
            differ.append(i)
    if differ:
        raise RankDivergenceError(f"entropykv: tensor-parallel ranks decide from different statistics in layers "
                                  f"{differ}; their head-wise plans, hence their outputs, would be corrupt")


def _differs(mine: Tensor, group: dist.ProcessGroup) -> bool:
    """Whether any rank's `mine` differs from rank 0's (shape or values)."""
    ranks = dist.get_world_size(group)
    shapes = [None] * ranks
    dist.all_gather_object(shapes, tuple(mine.shape), group=group)
    if len(set(shapes)) > 1:
        return True
    parts = [torch.empty_like(mine) for _ in range(ranks)]
    dist.all_gather(parts, mine.contiguous(), group=group)
    return any(not torch.equal(parts[0], p) for p in parts[1:])


def check_same_positions(cache: EntropyKVCache, group: dist.ProcessGroup) -> None:
    """RankDivergenceError unless every rank's layers hold the same positions as rank 0's (after compression)."""
    differ = [i for i, layer in enumerate(cache.layers) if _differs(layer.positions, group)]
    if differ:
        raise RankDivergenceError(f"entropykv: tensor-parallel ranks kept different token positions in layers "
                                  f"{differ}; their outputs would be corrupt")
