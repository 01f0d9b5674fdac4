"""Tensor parallelism: `optimize()` on a model loaded with transformers' `tp_plan="auto"` under `torchrun`.

Each rank holds some of every layer's attention heads, so its prefill measures only their entropies and token scores;
budgets and selections made from those would differ between ranks, and a rank keeping other tokens than its peers
corrupts the output. `combine_prefill_stats` therefore gives every rank the statistics of all heads before any budget
or selection is made: each layer's per-head entropies are gathered, its token scores reduced the way the scorer
combines heads (summed, or the largest). Every rank then computes the same budgets and keeps the same positions for
the heads it holds. That is two collectives per layer, once per prefill; decoding needs none of ours.
`check_same_positions` verifies the outcome (`optimize(..., verify_ranks=True)`).

Supported: layer-wise policies (one token set per layer) with the attention scorers (`window`, `last_query`,
`reconstruct`). Refused at `optimize()`: head-wise policies (each rank would keep its heads' share of a plan over all
heads: not built yet), `key_norm` (its scores come from each rank's keys at compression), and KV-head counts that do
not divide by the number of ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

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


def combine_prefill_stats(cache: EntropyKVCache, group: dist.ProcessGroup, combine: str) -> None:
    """Replace every scored layer's statistics by those of all heads of the group: entropy [B, Hq] gathered in rank
    order (rank r holds heads r * Hq/ranks onwards), layer_scores [B, S] reduced by `combine` ("sum" or "max").
    kv_scores and the per-head statistic stay this rank's (head-wise policies are refused under tensor parallelism)."""
    op = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[combine]
    ranks = dist.get_world_size(group)
    for layer in cache.layers:
        st = layer.stats
        if st is None:
            continue
        parts = [torch.empty_like(st.entropy) for _ in range(ranks)]
        dist.all_gather(parts, st.entropy.contiguous(), group=group)
        scores = st.layer_scores.contiguous().clone()
        dist.all_reduce(scores, op=op, group=group)
        layer.stats = PrefillStats(torch.cat(parts, 1), st.kv_scores, scores, st.head_statistic)


def check_same_positions(cache: EntropyKVCache, group: dist.ProcessGroup) -> None:
    """RankDivergenceError unless every rank's layers hold the same positions as rank 0's (after compression)."""
    ranks = dist.get_world_size(group)
    differ = []
    for i, layer in enumerate(cache.layers):
        mine = layer.positions.contiguous()
        shapes = [None] * ranks
        dist.all_gather_object(shapes, tuple(mine.shape), group=group)
        if len(set(shapes)) > 1:
            differ.append(i)
            continue
        parts = [torch.empty_like(mine) for _ in range(ranks)]
        dist.all_gather(parts, mine, group=group)
        if any(not torch.equal(parts[0], p) for p in parts[1:]):
            differ.append(i)
    if differ:
        raise RankDivergenceError(f"entropykv: tensor-parallel ranks kept different token positions in layers "
                                  f"{differ}; their outputs would be corrupt")
