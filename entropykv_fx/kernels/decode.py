"""Decode attention over the compressed cache (`entropykv::attention`, `entropykv::attention_int8` on CUDA).

Reference: `entropykv_fx.ops.attention` / `ops.attention_int8`. Flash-decoding: the slots are split into
chunks so that even batch 1 fills the GPU; each program runs an online softmax of one KV-head group's query
rows over one chunk (K and V read once for all G heads) and writes an unnormalised partial; a second kernel
merges the chunks. Visibility comes from positions, so pads and per-layer lengths need no extra metadata. A packed head-wise layer
(`ops.attention_packed`: every KV head's slots one after another on one axis) is cut into chunks that each lie
inside one head's segment, so work is spread by slots held, not by the longest head.
int8 storage: K and V are dequantized in registers (per-token scales applied to the logits and to p).
The kernel is for few query rows per group (decode; continuations of a few dozen tokens run as several calls);
prefills use the reference (SDPA).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import INTERPRET, LOG2E, block, dot_precision, load_rows, logits_block, splits_for

MAX_ROWS = 64  # query rows (G * L) per program; more run as several calls (`query_blocks`)
MAX_QUERY_BLOCKS = 16  # continuations of more tokens than this many calls hold go to the reference (SDPA)
# Launch settings for a bf16/fp16/fp32 cache and for an int8 one: the fastest of `benchmarks/kernels.py --sweep`
# on an H100 (benchmarks/results/kernels_h100.md); int8 needs twice the tokens per block for the same bytes.
CONFIG = {False: dict(BLOCK_N=64, num_warps=4, num_stages=3, waves=2),
          True: dict(BLOCK_N=128, num_warps=4, num_stages=2, waves=8)}


@triton.jit
def _decode_split(q_ptr, k_ptr, v_ptr, ks_ptr, vs_ptr, qpos_ptr, kpos_ptr, starts_ptr, acc_ptr, ml_ptr, scale_log2,
                  window, G, L, S, D, DV, HKV, SPLITS, chunk, sq_b, sq_h, sq_l, sq_d, sk_b, sk_h, sk_s, sk_d,
                  sv_b, sv_h, sv_s, sv_d, ss_b, ss_h, ss_s, sqp_b, sqp_l, skp_b, skp_s,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_H: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                  PACKED: tl.constexpr):
    bh, split = tl.program_id(0), tl.program_id(1)
    if PACKED:  # program (b, c): chunk c of the packed slot axis, inside one head's segment (`packed_chunks`)
        b = bh.to(tl.int64)
        h, lo, end = packed_chunk(starts_ptr, split, HKV, chunk, BLOCK_H)
    else:
        b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
        lo = split * chunk
        end = tl.minimum(lo + chunk, S)
    rows = tl.arange(0, BLOCK_M)
    q, qp = load_rows(q_ptr + b * sq_b + h * G * sq_h, qpos_ptr + b * sqp_b, rows, G, L, D, sq_h, sq_l, sq_d,
                      sqp_l, BLOCK_D, UPCAST)
    if not PACKED:  # packed heads share the slot axis (no head stride)
        k_ptr += h * sk_h
        v_ptr += h * sv_h
        ks_ptr += h * ss_h
        vs_ptr += h * ss_h
    k_ptr += b * sk_b
    v_ptr += b * sv_b
    ks_ptr += b * ss_b
    vs_ptr += b * ss_b
    dv = tl.arange(0, BLOCK_DV)
    m = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully hidden block gives exp2(-inf - m) = 0
    l = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(lo, end, BLOCK_N):
        s, _ = logits_block(q, qp, k_ptr, kpos_ptr + b * skp_b, ks_ptr, start, end, D, window, scale_log2,
                            sk_s, sk_d, skp_s, ss_s, BLOCK_N, BLOCK_D, QUANT, PRECISION)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, 1)
        j = start + tl.arange(0, BLOCK_N)
        v = tl.load(v_ptr + j[:, None] * sv_s + dv[None, :] * sv_d, mask=(j[:, None] < end) & (dv[None, :] < DV),
                    other=0)
        if QUANT:
            p = p * tl.load(vs_ptr + j * ss_s, mask=j < end, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        m = m_new
    # partials: acc [programs(0), SPLITS, BLOCK_M, BLOCK_DV], ml [2, programs(0), SPLITS, BLOCK_M]; only real rows
    part = (bh * SPLITS + split) * BLOCK_M + rows
    ok = rows < G * L
    tl.store(acc_ptr + part[:, None] * BLOCK_DV + dv[None, :], acc, mask=ok[:, None])
    tl.store(ml_ptr + part, m, mask=ok)
    tl.store(ml_ptr + tl.num_programs(0) * SPLITS * BLOCK_M + part, l, mask=ok)


@triton.jit
def packed_chunks(starts_ptr, HKV, chunk, BLOCK_H: tl.constexpr):
    """Per head of a packed layer (vectors over BLOCK_H >= HKV): its first slot, end slot, first chunk index and
    chunk count. Head h's segment starts[h]..starts[h+1]-1 is cut into ceil(length / chunk) chunks, numbered head
    after head, so no chunk spans two heads."""
    hs = tl.arange(0, BLOCK_H)
    lo = tl.load(starts_ptr + hs, mask=hs < HKV, other=0)
    hi = tl.load(starts_ptr + hs + 1, mask=hs < HKV, other=0)
    count = (hi - lo + chunk - 1) // chunk
    return hs, lo, hi, tl.cumsum(count, 0) - count, count


@triton.jit
def packed_chunk(starts_ptr, c, HKV, chunk, BLOCK_H: tl.constexpr):
    """(head, first slot, end slot) of chunk `c` of a packed layer; an empty range past the last chunk."""
    hs, lo, hi, first, count = packed_chunks(starts_ptr, HKV, chunk, BLOCK_H)
    h = tl.max(tl.where((first <= c) & (count > 0), hs, 0), 0)
    mine = hs == h
    start = tl.sum(tl.where(mine, lo + (c - first) * chunk, 0), 0)
    end = tl.minimum(start + chunk, tl.sum(tl.where(mine, hi, 0), 0))
    return h, start, tl.maximum(end, start)


@triton.jit
def _decode_merge(acc_ptr, ml_ptr, starts_ptr, out_ptr, G, L, DV, HKV, SPLITS, chunk, partials, so_b, so_h, so_l,
                  so_d, BLOCK_M: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_DV: tl.constexpr,
                  BLOCK_H: tl.constexpr, PACKED: tl.constexpr):
    bh, r = tl.program_id(0), tl.program_id(1)
    b, h = (bh // HKV).to(tl.int64), bh % HKV  # int64: b * stride can pass 2**31
    if PACKED:  # this head's chunks of row b's partials
        hs, _, _, first, count = packed_chunks(starts_ptr, HKV, chunk, BLOCK_H)
        lo = tl.sum(tl.where(hs == h, first, 0), 0)
        hi = lo + tl.sum(tl.where(hs == h, count, 0), 0)
        base = b * SPLITS
    else:
        lo, hi, base = 0, SPLITS, bh * SPLITS
    dv = tl.arange(0, BLOCK_DV)
    m = -float("inf")
    total = 0.0
    out = tl.zeros([BLOCK_DV], tl.float32)
    for tile in range(lo, hi, BLOCK_S):  # online merge of the partials, BLOCK_S at a time
        sp = tile + tl.arange(0, BLOCK_S)
        part = (base + sp) * BLOCK_M + r
        m_part = tl.load(ml_ptr + part, mask=sp < hi, other=-float("inf"))
        l_part = tl.load(ml_ptr + partials + part, mask=sp < hi, other=0.0)
        acc = tl.load(acc_ptr + part[:, None] * BLOCK_DV + dv[None, :], mask=(sp < hi)[:, None], other=0.0)
        m_new = tl.maximum(m, tl.max(m_part, 0))
        w = tl.exp2(m_part - m_new)
        alpha = tl.exp2(m - m_new)
        total = total * alpha + tl.sum(l_part * w, 0)
        out = out * alpha + tl.sum(acc * w[:, None], 0)
        m = m_new
    out = out / tl.where(total > 0, total, 1.0)  # a row that sees nothing gives zeros
    g, lq = r // L, r % L
    tl.store(out_ptr + b * so_b + (h * G + g) * so_h + lq * so_l + dv * so_d, out, mask=dv < DV)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
              scale: float, sliding_window: int, k_scale: torch.Tensor | None = None,
              v_scale: torch.Tensor | None = None, splits: int | None = None,
              starts: torch.Tensor | None = None) -> torch.Tensor:
    """Triton attention of q [B, Hq, L, D] over k, v [B, Hkv, S, D] (int8 with k_scale/v_scale [B, Hkv, S]), or,
    with `starts` [Hkv + 1], over a packed head-wise layer k, v [B, T, D] (`ops.attention_packed`).

    Needs (Hq / Hkv) * L <= MAX_ROWS; `splits` overrides the number of chunks (tests).
    """
    b, hq, length, d = q.shape
    packed = starts is not None
    hkv = starts.numel() - 1 if packed else k.shape[1]
    s, dv = k.shape[-2], v.shape[-1]
    g = hq // hkv
    assert g * length <= MAX_ROWS, f"{g * length} query rows per KV head; use ops.attention for prefill"
    block_m = block(g * length)
    quant = k_scale is not None
    cfg = CONFIG[quant]
    block_n = cfg["BLOCK_N"]
    programs = b if packed else b * hkv  # a packed layer's chunks are cut from all its heads' slots at once
    n, chunk = splits_for(programs, s, block_n, q.device, cfg["waves"])
    if splits is not None:
        chunk = triton.cdiv(triton.cdiv(max(s, 1), splits), block_n) * block_n
        n = triton.cdiv(max(s, 1), chunk)
    if packed:  # each head's segment rounds up to whole chunks: at most one more chunk per head
        n += hkv
        k_strides, v_strides = (k.stride(0), 0, *k.stride()[1:]), (v.stride(0), 0, *v.stride()[1:])
    else:
        k_strides, v_strides = k.stride(), v.stride()
    acc = torch.empty(programs, n, block_m, block(dv), device=q.device, dtype=torch.float32)
    ml = torch.empty(2, programs, n, block_m, device=q.device, dtype=torch.float32)
    out = q.new_empty(b, hq, length, dv)
    scales = (k_scale, v_scale, *k_scale.stride()) if quant else (k, v, 0, 0, 0)
    table = starts if packed else k_pos  # any pointer when not packed
    _decode_split[(programs, n)](
        q, k, v, scales[0], scales[1], q_pos, k_pos, table, acc, ml, scale * LOG2E, sliding_window, g, length, s, d,
        dv, hkv, n, chunk, *q.stride(), *k_strides, *v_strides, *scales[2:], *q_pos.stride(), *k_pos.stride(),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block(d), BLOCK_DV=block(dv), BLOCK_H=block(hkv, 2), QUANT=quant,
        UPCAST=INTERPRET, PRECISION=dot_precision(q.dtype), PACKED=packed, num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    _decode_merge[(b * hkv, g * length)](
        acc, ml, table, out, g, length, dv, hkv, n, chunk, programs * n * block_m, *out.stride(), BLOCK_M=block_m,
        BLOCK_S=block(n, 1) if not packed else min(64, block(n, 1)), BLOCK_DV=block(dv), BLOCK_H=block(hkv, 2),
        PACKED=packed, num_warps=4)
    return out


def query_blocks(groups: int, length: int) -> int | None:
    """Kernel calls that `length` new tokens take, MAX_ROWS // groups tokens a call; None when the reference (SDPA)
    serves them better: a prefill's thousands of tokens, or more query heads per KV head than a call holds.

    A continuation of a few dozen tokens over a cache (a question after a compressed document, a chat turn, the
    benchmarks' teacher-forced answers) needs a mask that SDPA with grouped heads can only apply in its math
    backend, which materializes float32 [B, Hq, L, S] scores: on an H100 that was 46 ms per layer call in the
    policy sweep (`benchmarks/results/sweep_h100_s37_shard0_profile.txt`). Each query row's output depends on its
    row alone, so blocks of rows give what one call would."""
    per_call = MAX_ROWS // groups
    if per_call == 0:
        return None
    calls = triton.cdiv(length, per_call)
    return calls if calls <= MAX_QUERY_BLOCKS else None


def _kernel_or_reference(q: torch.Tensor, q_pos: torch.Tensor, groups: int, kernel, reference) -> torch.Tensor:
    """kernel(q block [B, Hq, l, D], its positions [B, l]) over the blocks of `query_blocks`, joined along L (one
    call, no copy, for a decode step), or reference() when `query_blocks` leaves the tokens to SDPA."""
    if query_blocks(groups, q.shape[2]) is None:
        return reference()
    step = MAX_ROWS // groups
    if q.shape[2] <= step:
        return kernel(q, q_pos)
    return torch.cat([kernel(q[:, :, i:i + step], q_pos[:, i:i + step]) for i in range(0, q.shape[2], step)], 2)


def _attention_cuda(q, k, v, q_pos, k_pos, scale, sliding_window):
    ops._check_qkv("entropykv.attention", q, k, v, q_pos, k_pos)
    return _kernel_or_reference(q, q_pos, q.shape[1] // k.shape[1],
                                lambda qb, pb: attention(qb, k, v, pb, k_pos, scale, sliding_window),
                                lambda: ops.attention._init_fn(q, k, v, q_pos, k_pos, scale, sliding_window))


def _attention_int8_cuda(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos, scale, sliding_window):
    ops._check_int8_cache("entropykv.attention_int8", q, k_q, k_scale, v_q, v_scale, q_pos, k_pos)
    return _kernel_or_reference(
        q, q_pos, q.shape[1] // k_q.shape[1],
        lambda qb, pb: attention(qb, k_q, v_q, pb, k_pos, scale, sliding_window, k_scale, v_scale),
        lambda: ops.attention_int8._init_fn(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos, scale, sliding_window))


def _attention_packed_cuda(q, keys, values, q_pos, positions, starts, scale, sliding_window):
    ops._check_packed("entropykv.attention_packed", q, keys, values, q_pos, positions, starts)
    return _kernel_or_reference(
        q, q_pos, q.shape[1] // (starts.numel() - 1),
        lambda qb, pb: attention(qb, keys, values, pb, positions, scale, sliding_window, starts=starts),
        lambda: ops.attention_packed._init_fn(q, keys, values, q_pos, positions, starts, scale, sliding_window))
