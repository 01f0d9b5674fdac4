"""Budgeted gather (`entropykv::gather`, `entropykv::gather_int8` on CUDA): kept slots -> compressed layout.

Reference: `entropykv_fx.ops.gather` / `ops.gather_int8`. One program copies a block of kept slots of one
(batch, head) for K and V; the int8 variant quantizes each row (token) with its absmax scale in the same pass,
so the full-precision copy is never written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import block


@triton.jit
def _copy_rows(src_ptr, dst_ptr, scale_ptr, slots, kk, K, D, ss_s, ss_d, sd_k, sd_d, sc_k,
               BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr):
    d = tl.arange(0, BLOCK_D)
    mask = (kk[:, None] < K) & (d[None, :] < D)
    x = tl.load(src_ptr + slots[:, None] * ss_s + d[None, :] * ss_d, mask=mask, other=0.0)
    if QUANT:  # same arithmetic as ops.quantize_int8: x / absmax * 127, rounded half away from zero
        x = x.to(tl.float32)
        amax = tl.max(tl.abs(x), 1)
        y = x / tl.where(amax > 0, amax, 1.0)[:, None] * 127.0
        x = (y + tl.where(y >= 0, 0.5, -0.5)).to(tl.int8)  # float -> int truncates toward zero
        tl.store(scale_ptr + kk * sc_k, amax / 127.0, mask=kk < K)
    tl.store(dst_ptr + kk[:, None] * sd_k + d[None, :] * sd_d, x, mask=mask)


@triton.jit
def _gather(k_ptr, v_ptr, idx_ptr, ko_ptr, vo_ptr, ks_ptr, vs_ptr, H, K, DK, DV,
            sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, si_b, si_h, si_k,
            sko_b, sko_h, sko_k, sko_d, svo_b, svo_h, svo_k, svo_d, sc_b, sc_h, sc_k,
            BLOCK_K: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, QUANT: tl.constexpr):
    bh, kb = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H  # int64: b * stride can pass 2**31
    kk = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    slots = tl.load(idx_ptr + b * si_b + h * si_h + kk * si_k, mask=kk < K, other=0)  # si_h = 0: shared by heads
    scales = b * sc_b + h * sc_h
    _copy_rows(k_ptr + b * sk_b + h * sk_h, ko_ptr + b * sko_b + h * sko_h, ks_ptr + scales, slots, kk, K, DK,
               sk_s, sk_d, sko_k, sko_d, sc_k, BLOCK_K, BLOCK_DK, QUANT)
    _copy_rows(v_ptr + b * sv_b + h * sv_h, vo_ptr + b * svo_b + h * svo_h, vs_ptr + scales, slots, kk, K, DV,
               sv_s, sv_d, svo_k, svo_d, sc_k, BLOCK_K, BLOCK_DV, QUANT)


def _launch(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, quant: bool):
    ops._check_gather(k, v, idx)
    b, h, _, dk = k.shape
    dv, kept = v.shape[-1], idx.shape[-1]
    out_dtype = torch.int8 if quant else k.dtype
    ko = k.new_empty(b, h, kept, dk, dtype=out_dtype)
    vo = v.new_empty(b, h, kept, dv, dtype=out_dtype)
    if quant:
        ks, vs = (k.new_empty(b, h, kept, dtype=torch.float32) for _ in range(2))
    else:
        ks = vs = ko  # never read without QUANT
    si = (idx.stride(0), idx.stride(1) if idx.dim() == 3 else 0, idx.stride(-1))
    block_k = max(1, 8192 // block(max(dk, dv)))  # ~16 KB of bf16 per tensor per program
    _gather[(b * h, triton.cdiv(kept, block_k))](
        k, v, idx, ko, vo, ks, vs, h, kept, dk, dv, *k.stride(), *v.stride(), *si, *ko.stride(), *vo.stride(),
        *(ks.stride() if quant else (0, 0, 0)),
        BLOCK_K=block_k, BLOCK_DK=block(dk, 1), BLOCK_DV=block(dv, 1), QUANT=quant, num_warps=4)
    return (ko, ks, vo, vs) if quant else (ko, vo)


def gather(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton `entropykv::gather`: (k [B, H, K, D], v [B, H, K, Dv]) in the input dtype."""
    return _launch(k, v, idx, quant=False)


def gather_int8(k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor):
    """Triton `entropykv::gather_int8`: (k_q int8, k_scale [B, H, K] fp32, v_q int8, v_scale)."""
    return _launch(k, v, idx, quant=True)
