"""UNComp (Xiong et al. 2024, `seeds/002`): truncated matrix entropy of each head's states groups heads and layers
into budget tiers.

During prefill, each head's query states (or key states, `matrix_states="key"`) Z [n, D] over the prompt, rows
L2-normalised, give Sigma = Z^T Z / n; its eigenvalues divided by the trace form a spectrum, and the entropy of its
top `matrix_rank` (32) eigenvalues, divided by log(D), measures how many directions the head really uses. It is
computed with torch on the model's device in the prefill pass (`truncated_matrix_entropy`).
Layers are ranked by their mean head entropy into `layer_groups` stages, and within each layer the KV heads into
`head_groups` groups (default two); a stage or group g of G gets a weight 1 + SPREAD x (2g / (G - 1) - 1), lowest
entropy first, so with two groups the low-information half keeps half the mean budget and the other half 1.5x.
Layer totals (layers x Hkv x budget head-slots overall) and head budgets are split in proportion to those weights;
tokens are chosen per head by SnapKV's pooled window scores.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import HeadPlan, Policy, budget_bounds, distribute, pooled_head_scores

SPREAD = 0.5
CHUNK = 4096  # prompt rows per step: Z^T Z is accumulated so no float32 copy of all the states is ever held


def truncated_matrix_entropy(states: Tensor, valid: Tensor, rank: int) -> Tensor:
    """states [B, H, L, D], valid [B, L] bool -> float32 [B, H] entropy of the top-`rank` normalised spectrum / log D."""
    d = states.shape[-1]
    sigma = states.new_zeros(*states.shape[:2], d, d, dtype=torch.float32)
    for start in range(0, states.shape[2], CHUNK):
        rows = slice(start, start + CHUNK)
        z = torch.nn.functional.normalize(states[:, :, rows].float(), dim=-1) * valid[:, None, rows, None]
        sigma += z.transpose(-1, -2) @ z
    sigma /= valid.sum(-1).clamp(min=1)[:, None, None, None]
    eig = torch.linalg.eigvalsh(sigma).flip(-1).clamp(min=0)  # descending; clamp round-off negatives
    p = eig / eig.sum(-1, keepdim=True).clamp(min=1e-30)
    top = p[..., :min(rank, d)]
    return -(top * torch.log(top.clamp(min=1e-30))).sum(-1) / math.log(d)


def prefill_statistic(query: Tensor, key: Tensor, q_pos: Tensor, config) -> Tensor:
    """Per-head matrix entropy of this layer's prompt states: [B, Hq] (queries) or [B, Hkv] (keys)."""
    return truncated_matrix_entropy(query if config.matrix_states == "query" else key, q_pos >= 0, config.matrix_rank)


def group_weights(values: list[float], groups: int) -> list[float]:
    """Weight of each item by the rank of its value: `groups` equal-sized groups, lowest values lightest."""
    n = len(values)
    order = sorted(range(n), key=lambda i: (values[i], i))
    weights = [1.0] * n
    if groups > 1:
        for rank, i in enumerate(order):
            g = min(groups - 1, rank * groups // n)
            weights[i] = 1.0 + SPREAD * (2 * g / (groups - 1) - 1)
    return weights


def kv_head_entropy(layer) -> list[float]:
    """The layer's matrix entropy per KV head (a GQA group's query heads averaged), over the batch."""
    stat = layer.stats.head_statistic
    b, hkv = layer.stats.kv_scores.shape[:2]
    return stat.reshape(b, hkv, -1).mean(dim=(0, 2)).tolist()


def plan_heads(layers, n_tokens, config) -> HeadPlan:
    forced, mean, ceiling = budget_bounds(n_tokens, config)
    per_head = [kv_head_entropy(layer) for layer in layers]
    hkv = len(per_head[0])
    stage = group_weights([sum(e) / len(e) for e in per_head], config.layer_groups)
    totals = distribute(stage, len(layers) * hkv * mean, hkv * forced, hkv * ceiling)
    budgets, scores = [], []
    for layer, entropies, total in zip(layers, per_head, totals):
        s = pooled_head_scores(layer, config)
        heads = distribute(group_weights(entropies, config.head_groups), total, forced, ceiling)
        budgets.append(torch.tensor(heads, device=s.device).expand(s.shape[0], -1))
        scores.append(s)
    return HeadPlan(budgets, [[False] * hkv for _ in layers], scores)


POLICY = Policy("matrix_entropy", None, needs_scores=True, plan_heads=plan_heads, prefill_statistic=prefill_statistic,
                summary="heads and layers grouped into budget tiers by truncated matrix entropy of query states (UNComp)")
