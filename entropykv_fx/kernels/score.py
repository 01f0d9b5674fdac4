"""Fused entropy scoring (`entropykv::score` on CUDA): the window's attention over all keys, never stored.

Reference: `entropykv_fx.ops.score`. Two passes over K, each split over the sequence:
  1. per query row and chunk of keys: running max m, sum of exp l, and sum of exp * logit t (online softmax);
     a small kernel merges the chunks into log Z per row and the entropy H = log Z - E_p[logit], averaged
     over the valid window queries of each head;
  2. per key block: p = exp(logit - log Z) summed over every row of the KV-head group -> kv_scores (or, for
     `entropykv::max_attention`, its largest value over the rows).
Only per-row statistics and [S] scores reach global memory, never the window x S matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import INTERPRET, LOG2E, block, dot_precision, load_rows, logits_block, splits_for

BLOCK_N = 64


@triton.jit
def _score_stats(q_ptr, k_ptr, qpos_ptr, kpos_ptr, stats_ptr, scale_log2, window, G, W, S, D, HKV, ROW_BLOCKS,
                 SPLITS, chunk, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d, sqp_b, sqp_l, skp_b, skp_s,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                 PRECISION: tl.constexpr):
    pid, split = tl.program_id(0), tl.program_id(1)
    bh, rb = pid // ROW_BLOCKS, pid % ROW_BLOCKS
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    q, qp = load_rows(q_ptr + b * sq_b + h * G * sq_h, qpos_ptr + b * sqp_b, rows, G, W, D, sq_h, sq_l, sq_d,
                      sqp_l, BLOCK_D, UPCAST)
    m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite, so fully hidden blocks give exp2(-inf - m) = 0, not NaN
    l = tl.zeros([BLOCK_M], tl.float32)
    t = tl.zeros([BLOCK_M], tl.float32)
    lo = split * chunk
    for start in range(lo, tl.minimum(lo + chunk, S), BLOCK_N):
        s, seen = logits_block(q, qp, k_ptr + b * sk_b + h * sk_h, kpos_ptr + b * skp_b, kpos_ptr, start, S, D,
                               window, scale_log2, sk_s, sk_d, skp_s, 0, BLOCK_N, BLOCK_D, False, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        t = t * alpha + tl.sum(p * tl.where(seen, s, 0.0), 1)  # where: 0 * -inf would be NaN
        m = m_new
    # stats [3, B * HKV, SPLITS, ROW_BLOCKS * BLOCK_M]
    out = stats_ptr + (bh * SPLITS + split) * ROW_BLOCKS * BLOCK_M + rows
    plane = tl.num_programs(0) // ROW_BLOCKS * SPLITS * ROW_BLOCKS * BLOCK_M
    tl.store(out, m)
    tl.store(out + plane, l)
    tl.store(out + 2 * plane, t)


@triton.jit
def _score_merge(stats_ptr, lse_ptr, ent_ptr, G, W, SPLITS, ROW_BLOCKS,
                 BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr):
    """One program per (batch, KV head): merge the chunks' (m, l, t) of every row; write lse and the entropy."""
    bh = tl.program_id(0)
    plane = tl.num_programs(0) * SPLITS * ROW_BLOCKS * BLOCK_M
    heads = tl.arange(0, BLOCK_G)
    ent_sum = tl.zeros([BLOCK_G], tl.float32)
    valid_queries = tl.zeros([BLOCK_M], tl.float32)
    for rb in range(0, ROW_BLOCKS):
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        m = tl.full([BLOCK_M], -1e30, tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        t = tl.zeros([BLOCK_M], tl.float32)
        for s0 in range(0, SPLITS, BLOCK_S):  # online merge, BLOCK_S chunks at a time
            sp = s0 + tl.arange(0, BLOCK_S)
            at = stats_ptr + (bh * SPLITS + sp[:, None]) * ROW_BLOCKS * BLOCK_M + rows[None, :]
            ok = (sp < SPLITS)[:, None]
            ms = tl.load(at, mask=ok, other=-1e30)
            m_new = tl.maximum(m, tl.max(ms, 0))
            w = tl.exp2(ms - m_new[None, :])
            alpha = tl.exp2(m - m_new)
            l = l * alpha + tl.sum(tl.load(at + plane, mask=ok, other=0.0) * w, 0)
            t = t * alpha + tl.sum(tl.load(at + 2 * plane, mask=ok, other=0.0) * w, 0)
            m = m_new
        valid = l > 0  # the row sees at least one key
        lse = tl.where(valid, m + tl.log2(tl.where(valid, l, 1.0)), 0.0)
        tl.store(lse_ptr + bh * ROW_BLOCKS * BLOCK_M + rows, lse)
        ent = tl.where(valid, (lse - t / tl.where(valid, l, 1.0)) * 0.6931471805599453, 0.0)  # log2 -> nats
        head = tl.where(rows < G * W, rows // W, BLOCK_G)  # padding rows match no head
        ent_sum += tl.sum(tl.where(head[None, :] == heads[:, None], ent[None, :], 0.0), 1)
        valid_queries += (valid & (rows < W)).to(tl.float32)  # head 0's rows: validity is per query, not head
    # entropy [B, Hq] with Hq = HKV * G: head g of group bh is element bh * G + g
    tl.store(ent_ptr + bh * G + heads, ent_sum / tl.maximum(tl.sum(valid_queries, 0), 1.0), mask=heads < G)


@triton.jit
def _score_tokens(q_ptr, k_ptr, qpos_ptr, kpos_ptr, lse_ptr, out_ptr, scale_log2, window, G, W, S, D, HKV,
                  ROW_BLOCKS, chunk, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d, sqp_b, sqp_l, skp_b, skp_s,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, REDUCE_MAX: tl.constexpr):
    """Per key slot: the sum (or, with REDUCE_MAX, the largest) of p over every row of the KV-head group; S here is
    the number of slots scored (the first S), lse normalizes over all the slots each row sees."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    lo = split * chunk
    for rb in range(0, ROW_BLOCKS):  # usually one block: the group's G * W rows fit in BLOCK_M
        rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
        q, qp = load_rows(q_ptr + b * sq_b + h * G * sq_h, qpos_ptr + b * sqp_b, rows, G, W, D, sq_h, sq_l, sq_d,
                          sqp_l, BLOCK_D, UPCAST)
        lse = tl.load(lse_ptr + bh * ROW_BLOCKS * BLOCK_M + rows)
        for start in range(lo, tl.minimum(lo + chunk, S), BLOCK_N):
            s, seen = logits_block(q, qp, k_ptr + b * sk_b + h * sk_h, kpos_ptr + b * skp_b, kpos_ptr, start, S,
                                   D, window, scale_log2, sk_s, sk_d, skp_s, 0, BLOCK_N, BLOCK_D, False, PRECISION)
            p = tl.where(seen, tl.exp2(s - lse[:, None]), 0.0)
            j = start + tl.arange(0, BLOCK_N)
            dst = out_ptr + bh * S + j  # this program owns these slots: no atomics
            if REDUCE_MAX:
                total = tl.max(p, 0)
                if rb > 0:
                    total = tl.maximum(total, tl.load(dst, mask=j < S))
            else:
                total = tl.sum(p, 0)
                if rb > 0:
                    total += tl.load(dst, mask=j < S)
            tl.store(dst, total, mask=j < S)


def _scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
            sliding_window: int, slots: int, reduce_max: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(entropy [B, Hq], per-slot sum or max of p over the group's rows [B, Hkv, slots]) for the first `slots`."""
    b, hq, w, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    block_m = min(128, block(g * w))
    row_blocks = triton.cdiv(g * w, block_m)
    splits, chunk = splits_for(b * hkv * row_blocks, s, BLOCK_N, q.device)
    block_d = block(d)
    num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    meta = dict(BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block_d, UPCAST=INTERPRET,
                PRECISION=dot_precision(q.dtype), num_warps=num_warps)
    strides = (*q.stride(), *k.stride(), *q_pos.stride(), *k_pos.stride())

    stats = torch.empty(3, b, hkv, splits, row_blocks * block_m, device=q.device, dtype=torch.float32)
    _score_stats[(b * hkv * row_blocks, splits)](q, k, q_pos, k_pos, stats, scale * LOG2E, sliding_window, g, w, s, d,
                                                 hkv, row_blocks, splits, chunk, *strides, **meta)
    lse = torch.empty(b, hkv, row_blocks * block_m, device=q.device, dtype=torch.float32)
    entropy = torch.empty(b, hq, device=q.device, dtype=torch.float32)
    _score_merge[(b * hkv,)](stats, lse, entropy, g, w, splits, row_blocks, BLOCK_M=block_m,
                             BLOCK_S=min(32, block(splits, 1)), BLOCK_G=block(g, 1))
    # The slot pass has no row blocks to spread over: it splits the slots as finely as the GPU needs.
    slot_splits, slot_chunk = splits_for(b * hkv, slots, BLOCK_N, q.device)
    out = torch.empty(b, hkv, slots, device=q.device, dtype=torch.float32)
    _score_tokens[(b * hkv, slot_splits)](q, k, q_pos, k_pos, lse, out, scale * LOG2E, sliding_window, g, w, slots, d,
                                          hkv, row_blocks, slot_chunk, *strides, **meta, REDUCE_MAX=reduce_max)
    return entropy, out


def score(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
          sliding_window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `entropykv::score`: (entropy [B, Hq], kv_scores [B, Hkv, S], layer_scores [B, S]), float32."""
    ops._check_qkv("entropykv.score", q, k, None, q_pos, k_pos)
    entropy, kv_scores = _scores(q, k, q_pos, k_pos, scale, sliding_window, k.shape[2], reduce_max=False)
    return entropy, kv_scores, kv_scores.sum(1)


def max_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                  sliding_window: int, slots: int) -> torch.Tensor:
    """Triton `entropykv::max_attention`: [B, Hkv, slots] float32, the same two passes with a max over rows."""
    ops._check_max_attention(q, k, q_pos, k_pos, slots)
    if slots == 0:
        return torch.empty(q.shape[0], k.shape[1], 0, device=q.device, dtype=torch.float32)
    return _scores(q, k, q_pos, k_pos, scale, sliding_window, slots, reduce_max=True)[1]
