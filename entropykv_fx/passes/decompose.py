"""Lower the entropykv ops to standard torch ops, for engines that cannot call them (AOTInductor, ONNX).

`ep.run_decompositions(decompositions())` replaces every entropykv op of an exported program by the plain
math below: the same results as the references in `entropykv_fx.ops`, written without data-dependent Python
branches and with GQA as an explicit head repetition, so the program needs nothing but torch to run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops


def _repeat_heads(x: Tensor, heads: int) -> Tensor:
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sliding_window: int) -> Tensor:
    seen = ops.visibility(q_pos, k_pos, sliding_window)
    any_seen = seen.any(-1, keepdim=True)
    mask = (seen | ~any_seen)[:, None]  # a query that sees nothing (a pad) gets zeros, not NaN
    heads = q.shape[1]
    out = F.scaled_dot_product_attention(q, _repeat_heads(k, heads), _repeat_heads(v, heads), attn_mask=mask, scale=scale)
    return (out * any_seen[:, None].to(out.dtype)).contiguous()


def score(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
          sliding_window: int) -> tuple[Tensor, Tensor, Tensor]:
    b, hq, w, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    seen = ops.visibility(q_pos, k_pos, sliding_window)[:, None]  # [B, 1, W, S]
    valid_q = seen.any(-1)
    logits = (q.float() @ _repeat_heads(k, hq).float().transpose(-1, -2)) * scale
    logp = torch.log_softmax(logits.masked_fill(~seen, float("-inf")), dim=-1).masked_fill(~seen, 0.0)
    p = logp.exp() * seen
    entropy = (-(p * logp).sum(-1) * valid_q).sum(-1) / valid_q.sum(-1).clamp(min=1).float()
    kv_scores = (p * valid_q[..., None]).sum(2).view(b, hkv, hq // hkv, s).sum(2)
    return entropy, kv_scores, kv_scores.sum(1)


def select(scores: Tensor, k_pos: Tensor, budget: int, sink_tokens: int, window: int) -> Tensor:
    ranked = ops.selection_ranks(scores, k_pos, sink_tokens, window)
    kept = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., : min(budget, scores.shape[-1])]
    return kept.sort(dim=-1).values


def gather(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    per_head = idx if idx.dim() == 3 else idx[:, None].expand(-1, k.shape[1], -1)
    return (k.gather(2, per_head[..., None].expand(-1, -1, -1, k.shape[-1])),
            v.gather(2, per_head[..., None].expand(-1, -1, -1, v.shape[-1])))


def append(keys, values, positions, k_new, v_new, new_pos, layer):
    return torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2), torch.cat([positions, new_pos], 1)


def write(keys, values, positions, k_new, v_new, new_pos, slot, layer):
    idx = slot + torch.arange(k_new.shape[2], device=keys.device)
    return keys.index_copy(2, idx, k_new), values.index_copy(2, idx, v_new), positions.index_copy(1, idx, new_pos)


def decompositions() -> dict:
    """torch.export's default decompositions plus the entropykv ops lowered to plain torch."""
    table = torch.export.default_decompositions()
    eops = torch.ops.entropykv
    table.update({eops.attention.default: attention, eops.score.default: score, eops.select.default: select,
                  eops.gather.default: gather, eops.append.default: append, eops.write.default: write})
    return table
