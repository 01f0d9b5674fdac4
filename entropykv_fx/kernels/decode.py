"""Decode attention over the compressed cache (`entropykv::attention`, `entropykv::attention_int8` on CUDA).

Reference: `entropykv_fx.ops.attention` / `ops.attention_int8`. Flash-decoding: the slots are split into
chunks so that even batch 1 fills the GPU; each program runs an online softmax of one KV-head group's query
rows over one chunk (K and V read once for all G heads) and writes an unnormalised partial; a second kernel
merges the chunks. Visibility comes from positions, so pads and per-layer lengths need no extra metadata.
int8 storage: K and V are dequantized in registers (per-token scales applied to the logits and to p).
The kernel is for few query rows per group (decode, small chunks); longer prefills use the reference (SDPA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import INTERPRET, LOG2E, block, dot_precision, load_rows, logits_block, splits_for

MAX_ROWS = 64  # query rows (G * L) per program; more goes to the reference
# Launch settings for a bf16/fp16/fp32 cache and for an int8 one: the fastest of `benchmarks/kernels.py --sweep`
# on an H100 (benchmarks/results/kernels_h100.md); int8 needs twice the tokens per block for the same bytes.
CONFIG = {False: dict(BLOCK_N=64, num_warps=4, num_stages=3, waves=2),
          True: dict(BLOCK_N=128, num_warps=4, num_stages=2, waves=8)}


@triton.jit
def _decode_split(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, qpos_ptr, kpos_ptr, acc_ptr, ml_ptr, scale_log2, window,
                  G, L, S, D, DV, HKV, SPLITS, chunk, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d,
                  sv_b, sv_h, sv_s, sv_d, ss_b, ss_h, ss_s, sqp_b, sqp_l, skp_b, skp_s,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  QUANT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    rows = tl.arange(0, BLOCK_M)
    q, qp = load_rows(q_ptr + b * sq_b + h * G * sq_h, qpos_ptr + b * sqp_b, rows, G, L, D, sq_h, sq_l, sq_d,
                      sqp_l, BLOCK_D, UPCAST)
    k_ptr += b * sk_b + h * sk_h
    v_ptr += b * sv_b + h * sv_h
    ks_ptr += b * ss_b + h * ss_h
    vs_ptr += b * ss_b + h * ss_h
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully hidden block gives exp2(-inf - m) = 0
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo = split * chunk
    for start in range(lo, tl.minimum(lo + chunk, S), BLOCK_N):
        s, _ = logits_block(q, qp, k_ptr, kpos_ptr + b * skp_b, ks_ptr, start, S, D, window, scale_log2,
                            sk_s, sk_d, skp_s, ss_s, BLOCK_N, BLOCK_D, QUANT, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        j = start + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + j[:, None] * sv_s + dv[None, :] * sv_d, mask=(j[:, None] < S) & (dv[None, :] < DV),
                    other=0)
        if QUANT:
            p = p * tl.load(vs_ptr + j * ss_s, mask=j < S, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m = m_new
    # partials: acc [B * HKV, SPLITS, BLOCK_M, BLOCK_DV], ml [2, B * HKV, SPLITS, BLOCK_M]; only real rows
    part = (bh * SPLITS + split) * BLOCK_M + rows
    ok = rows < G * L
    tl.store(acc_ptr + part[:, None] * BLOCK_DV + dv[None, :], acc, mask=ok[:, None])
    tl.store(ml_ptr + part, m, mask=ok)
    tl.store(ml_ptr + tl.num_programs(0) * SPLITS * BLOCK_M + part, l, mask=ok)


@triton.jit
def _decode_merge(acc_ptr, ml_ptr, out_ptr, G, L, DV, HKV, SPLITS, so_b, so_h, so_l, so_d,
                  BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    bh, r = tl.program_id(0), tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    sp = tl.arange(0, BLOCK_S)
    dv = tl.arange(0, BLOCK_DV)
    part = (bh * SPLITS + sp) * BLOCK_M + r
    m = tl.load(ml_ptr + part, mask=sp < SPLITS, other=-float("inf"))
    l = tl.load(ml_ptr + tl.num_programs(0) * SPLITS * BLOCK_M + part, mask=sp < SPLITS, other=0.0)
    acc = tl.load(acc_ptr + part[:, None] * BLOCK_DV + dv[None, :], mask=(sp < SPLITS)[:, None], other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(l * w, 0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total > 0, total, 1.0)  # a row that sees nothing gives zeros
    g, lq = r // L, r % L
    tl.store(out_ptr + b * so_b + (h * G + g) * so_h + lq * so_l + dv * so_d, out, mask=dv < DV)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              scale: float, sliding_window: int, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None, splits: int | None = None) -> torch.Tensor:
    """Triton attention of q [B, Hq, L, D] over k, v [B, Hkv, S, D] (int8 with k_scale/v_scale [B, Hkv, S]).

    Needs (Hq / Hkv) * L <= MAX_ROWS; `splits` overrides the number of chunks (tests).
    """
    b, hq, length, d = q.shape
    hkv, s, dv = k.shape[1], k.shape[2], v.shape[-1]
    g = hq // hkv
    assert g * length <= MAX_ROWS, f"{g * length} query rows per KV head; use ops.attention for prefill"
    block_m = block(g * length)
    quant = k_scale is not None
    cfg = CONFIG[quant]
    block_n = cfg["BLOCK_N"]
    n, chunk = splits_for(b * hkv, s, block_n, q.device, cfg["waves"])
    if splits is not None:
        chunk = triton.cdiv(triton.cdiv(max(s, 1), splits), block_n) * block_n
        n = triton.cdiv(max(s, 1), chunk)
    acc = torch.empty(b * hkv, n, block_m, block(dv), device=q.device, dtype=torch.float32)
    ml = torch.empty(2, b * hkv, n, block_m, device=q.device, dtype=torch.float32)
    out = q.new_empty(b, hq, length, dv)
    scales = (k_scale, v_scale, *k_scale.stride()) if quant else (k, v, 0, 0, 0)
    _decode_split[(b * hkv, n)](
        q, k, v, scales[0], scales[1], q_pos, k_pos, acc, ml, scale * LOG2E, sliding_window, g, length, s, d, dv,
        hkv, n, chunk, *q.stride(), *k.stride(), *v.stride(), *scales[2:], *q_pos.stride(),
        *k_pos.stride(), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block(d), BLOCK_DV=block(dv), QUANT=quant,
        UPCAST=INTERPRET, PRECISION=dot_precision(q.dtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _decode_merge[(b * hkv, g * length)](acc, ml, out, g, length, dv, hkv, n, *out.stride(), BLOCK_M=block_m,
                                         BLOCK_S=block(n, 1), BLOCK_DV=block(dv), num_warps=4)
    return out


def _attention_cuda(q, k, v, q_pos, k_pos, scale, sliding_window):
    ops._check_qkv("entropykv.attention", q, k, v, q_pos, k_pos)
    if q.shape[1] // k.shape[1] * q.shape[2] > MAX_ROWS:
        return ops.attention._init_fn(q, k, v, q_pos, k_pos, scale, sliding_window)  # prefill: SDPA reference
    return attention(q, k, v, q_pos, k_pos, scale, sliding_window)


def _attention_int8_cuda(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos, scale, sliding_window):
    ops._check_int8_cache("entropykv.attention_int8", q, k_q, k_scale, v_q, v_scale, q_pos, k_pos)
    if q.shape[1] // k_q.shape[1] * q.shape[2] > MAX_ROWS:
        return ops.attention_int8._init_fn(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos, scale, sliding_window)
    return attention(q, k_q, v_q, q_pos, k_pos, scale, sliding_window, k_scale, v_scale)
