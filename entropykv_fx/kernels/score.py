"""Fused entropy scoring (`entropykv::score` on CUDA): the window's attention over all keys, never stored.

Reference: `entropykv_fx.ops.score`. Two passes over K, each split over the sequence:
  1. per query row and chunk of keys: running max m, sum of exp l, and sum of exp * logit t (online softmax);
     a small kernel merges the chunks into log Z per row and the entropy H = log Z - E_p[logit], averaged
     over the valid window queries of each head. Key blocks that no row of the block can see (keys at later
     positions than every row's query) are skipped: a causal prefill's reconstruction queries see 3/4 of them;
  2. per key block, held while every row of the KV-head group streams past it: p = exp(logit - log Z) summed
     over the rows -> kv_scores; for `entropykv::max_attention` the largest logit - log Z over the rows, and one
     exp per slot at the end (exp is monotonic), so this pass spends no exp per row.
Only per-row statistics and [S] scores reach global memory, never the window x S matrix.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import INTERPRET, LOG2E, block, dot_precision, load_rows, logits_block, splits_for, visible

BLOCK_N = 64
# The slot pass holds a key block while row blocks stream past: wide key blocks and short row blocks keep
# the bytes loaded per multiply low (a [64 x D] row block per [64 x 128] dot).
SLOT_BLOCK_M, SLOT_BLOCK_N = 64, 128


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
    last_query = tl.max(qp)  # padding rows hold -1
    lo = split * chunk
    for start in range(lo, tl.minimum(lo + chunk, S), BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        kp = tl.load(kpos_ptr + b * skp_b + j * skp_s, mask=j < S, other=-1)
        if tl.min(tl.where(kp >= 0, kp, last_query + 1)) <= last_query:  # else no row sees any key of the block
            s, seen = logits_block(q, qp, k_ptr + b * sk_b + h * sk_h, kpos_ptr + b * skp_b, kpos_ptr, start, S,
                                   D, window, scale_log2, sk_s, sk_d, skp_s, 0, BLOCK_N, BLOCK_D, False, PRECISION)
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
        lse = tl.where(valid, m + tl.log2(tl.where(valid, l, 1.0)), float("-inf"))
        tl.store(lse_ptr + bh * ROW_BLOCKS * BLOCK_M + rows, lse)
        ent = tl.where(valid, (lse - t / tl.where(valid, l, 1.0)) * 0.6931471805599453, 0.0)  # log2 -> nats
        head = tl.where(rows < G * W, rows // W, BLOCK_G)  # padding rows match no head
        ent_sum += tl.sum(tl.where(head[None, :] == heads[:, None], ent[None, :], 0.0), 1)
        valid_queries += (valid & (rows < W)).to(tl.float32)  # head 0's rows: validity is per query, not head
    # entropy [B, Hq] with Hq = HKV * G: head g of group bh is element bh * G + g
    tl.store(ent_ptr + bh * G + heads, ent_sum / tl.maximum(tl.sum(valid_queries, 0), 1.0), mask=heads < G)


@triton.jit
def _score_tokens(q_ptr, k_ptr, qpos_ptr, kpos_ptr, lse_ptr, out_ptr, scale_log2, window, G, W, S, D, HKV,
                  LSE_ROWS, chunk, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d, sqp_b, sqp_l, skp_b, skp_s,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr,
                  PRECISION: tl.constexpr, REDUCE_MAX: tl.constexpr):
    """Per key slot: the sum (or, with REDUCE_MAX, the largest) of p over every row of the KV-head group; S here is
    the number of slots scored (the first S), lse (log2 units) normalizes over all the slots each row sees.

    Each key block is loaded once and every row block streams past it, so the reduction stays in registers."""
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    d = tl.arange(0, BLOCK_D)
    lo = split * chunk
    for start in range(lo, tl.minimum(lo + chunk, S), BLOCK_N):
        j = start + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + b * sk_b + h * sk_h + j[:, None] * sk_s + d[None, :] * sk_d,
                    mask=(j[:, None] < S) & (d[None, :] < D), other=0)
        kp = tl.load(kpos_ptr + b * skp_b + j * skp_s, mask=j < S, other=-1)
        k_t = tl.trans(k.to(tl.float32 if UPCAST else k.dtype))
        # REDUCE_MAX: the largest logit - lse (log2 p), so exp2 once per slot at the end; else the sum of p
        total = tl.full([BLOCK_N], float("-inf") if REDUCE_MAX else 0.0, tl.float32)
        for r0 in range(0, G * W, BLOCK_M):  # noqa: PIE808 (triton.jit takes positional bounds)
            rows = r0 + tl.arange(0, BLOCK_M)
            q, qp = load_rows(q_ptr + b * sq_b + h * G * sq_h, qpos_ptr + b * sqp_b, rows, G, W, D, sq_h, sq_l,
                              sq_d, sqp_l, BLOCK_D, UPCAST)
            lse = tl.load(lse_ptr + bh * LSE_ROWS + rows, mask=rows < G * W, other=0.0)
            s = tl.dot(q, k_t, input_precision=PRECISION) * scale_log2 - lse[:, None]
            seen = visible(qp, kp, window)
            if REDUCE_MAX:
                total = tl.maximum(total, tl.max(tl.where(seen, s, float("-inf")), 0))
            else:
                total += tl.sum(tl.where(seen, tl.exp2(s), 0.0), 0)
        if REDUCE_MAX:
            total = tl.exp2(total)  # exp2(-inf) = 0: a slot no row sees
        tl.store(out_ptr + bh * S + j, total, mask=j < S)  # this program owns these slots: no atomics


def _launch_meta(q: torch.Tensor, k: torch.Tensor) -> dict:
    """Launch settings of the first pass; the slot pass narrows BLOCK_M and widens BLOCK_N."""
    g, w, d = q.shape[1] // k.shape[1], q.shape[2], q.shape[3]
    block_m = min(128, block(g * w))
    num_warps = 8 if block_m * block(d) >= 128 * 128 else 4
    return dict(BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_D=block(d), UPCAST=INTERPRET, PRECISION=dot_precision(q.dtype),
                num_warps=num_warps)


def _strides(q, k, q_pos, k_pos) -> tuple[int, ...]:
    return (*q.stride(), *k.stride(), *q_pos.stride(), *k_pos.stride())


def _normalizers(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                 sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First pass: (entropy [B, Hq], lse [B * Hkv, rows] in log2 units: row r of a KV-head group is query head
    g = r // L of the group and query l = r % L; -inf for a row that sees nothing; rows padded to whole blocks)."""
    b, hq, w, d = q.shape
    hkv, s = k.shape[1], k.shape[2]
    g = hq // hkv
    meta = _launch_meta(q, k)
    row_blocks = triton.cdiv(g * w, meta["BLOCK_M"])
    rows = row_blocks * meta["BLOCK_M"]
    splits, chunk = splits_for(b * hkv * row_blocks, s, BLOCK_N, q.device)
    stats = torch.empty(3, b, hkv, splits, rows, device=q.device, dtype=torch.float32)
    _score_stats[(b * hkv * row_blocks, splits)](q, k, q_pos, k_pos, stats, scale * LOG2E, sliding_window, g, w, s, d,
                                                 hkv, row_blocks, splits, chunk, *_strides(q, k, q_pos, k_pos), **meta)
    lse = torch.empty(b * hkv, rows, device=q.device, dtype=torch.float32)
    entropy = torch.empty(b, hq, device=q.device, dtype=torch.float32)
    _score_merge[(b * hkv,)](stats, lse, entropy, g, w, splits, row_blocks, BLOCK_M=meta["BLOCK_M"],
                             BLOCK_S=min(32, block(splits, 1)), BLOCK_G=block(g, 1))
    return entropy, lse


def _slot_scores(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                 sliding_window: int, slots: int, lse: torch.Tensor, reduce_max: bool) -> torch.Tensor:
    """Second pass: per slot of the first `slots`, the sum (or largest) of p over the group's rows: [B, Hkv, slots]
    float32, from `_normalizers`' lse layout."""
    b, hq, w, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    # The slot pass has no row blocks to spread over: it splits the slots as finely as the GPU needs.
    splits, chunk = splits_for(b * hkv, slots, SLOT_BLOCK_N, q.device)
    out = torch.empty(b, hkv, slots, device=q.device, dtype=torch.float32)
    meta = dict(_launch_meta(q, k), BLOCK_M=min(SLOT_BLOCK_M, block(g * w)), BLOCK_N=SLOT_BLOCK_N)
    _score_tokens[(b * hkv, splits)](q, k, q_pos, k_pos, lse, out, scale * LOG2E, sliding_window, g, w, slots, d, hkv,
                                     lse.shape[1], chunk, *_strides(q, k, q_pos, k_pos), **meta, REDUCE_MAX=reduce_max)
    return out


def score(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
          sliding_window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Triton `entropykv::score`: (entropy [B, Hq], kv_scores [B, Hkv, S], layer_scores [B, S]), float32."""
    ops._check_qkv("entropykv.score", q, k, None, q_pos, k_pos)
    entropy, lse = _normalizers(q, k, q_pos, k_pos, scale, sliding_window)
    kv_scores = _slot_scores(q, k, q_pos, k_pos, scale, sliding_window, k.shape[2], lse, reduce_max=False)
    return entropy, kv_scores, kv_scores.sum(1)


def _group_rows(lse: torch.Tensor, hkv: int) -> torch.Tensor:
    """lse [B, Hq, L] (natural log) -> the kernels' [B * Hkv, G * L] rows in log2 units."""
    b, hq, length = lse.shape
    return (lse * LOG2E).reshape(b * hkv, hq // hkv * length)


def max_attention(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor, scale: float,
                  sliding_window: int, slots: int, lse: torch.Tensor | None = None) -> torch.Tensor:
    """Triton `entropykv::max_attention`: [B, Hkv, slots] float32; the slot pass with a max over rows, after the
    first pass unless the caller brings lse."""
    ops._check_max_attention(q, k, q_pos, k_pos, slots, lse)
    if slots == 0:
        return torch.empty(q.shape[0], k.shape[1], 0, device=q.device, dtype=torch.float32)
    rows = _normalizers(q, k, q_pos, k_pos, scale, sliding_window)[1] if lse is None else _group_rows(lse, k.shape[1])
    return _slot_scores(q, k, q_pos, k_pos, scale, sliding_window, slots, rows, reduce_max=True)


# (device, dtype, head dim) on which cuDNN's attention refused the inputs: FlashAttention-2 serves those
_CUDNN_REFUSED: set[tuple] = set()


def fused_lse_kernel(q: torch.Tensor) -> str:
    """Which fused kernel attention_lse runs for queries like `q` on an unpadded causal prefill: 'cudnn', or
    'flash' once cuDNN has refused such inputs."""
    return "flash" if (q.device, q.dtype, q.shape[-1]) in _CUDNN_REFUSED else "cudnn"


def fused_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse [B, Hq, L] float32) of an unpadded causal prefill (`causal`), or of queries that see every key,
    from one fused kernel, GQA without expanding.

    cuDNN's attention where it takes the inputs: on an H100 at 32k tokens it ran in 55 ms against PyTorch's
    FlashAttention-2's 97 ms, with the same normalizers (`benchmarks/results/reconstruction_score_h100_cudnn.md`);
    FlashAttention-2 otherwise (no cuDNN, an older GPU, a head size it refuses).
    """
    key = (q.device, q.dtype, q.shape[-1])
    if key not in _CUDNN_REFUSED:
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False,
                                                                          scale=scale)[:2]
            return out.contiguous(), lse.reshape(q.shape[:3]).float().contiguous()  # the fake's layouts
        except RuntimeError:  # refused (build, GPU or shape): decided once per key
            _CUDNN_REFUSED.add(key)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[:2]
    return out.contiguous(), lse.contiguous()


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                  scale: float, sliding_window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CUDA `entropykv::attention_lse`: in bf16/fp16, an unpadded causal prefill, or queries that see every key,
    take the normalizers from the fused kernel that computes the attention (`fused_lse`); otherwise `attention`
    plus the first pass."""
    ops._check_qkv("entropykv.attention_lse", q, k, v, q_pos, k_pos)
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        if ops._is_plain_causal(q_pos, k_pos, sliding_window):
            return fused_lse(q, k, v, scale, causal=True)
        if ops._sees_every_key(q_pos, k_pos, sliding_window):
            return fused_lse(q, k, v, scale, causal=False)
    b, hq, length = q.shape[:3]
    rows = _normalizers(q, k, q_pos, k_pos, scale, sliding_window)[1][:, :hq // k.shape[1] * length]
    return ops.attention(q, k, v, q_pos, k_pos, scale, sliding_window), (rows / LOG2E).reshape(b, hq, length)
