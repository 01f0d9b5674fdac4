"""A decode step's cache write (`entropykv::write_in_place` on CUDA): one kernel per layer.

Reference: `entropykv_fx.ops.write_in_place` (argmin over the positions, then three scatters: four kernels and a
multi-block reduction per layer, about 20 µs of a step's layer on the H200, `results/profile_step_h200_128k.md`).
Here one program per row scans its positions for the slot of lowest position (the first of equal minima, as
`torch.argmin` picks) and writes the row's new key, value and position there, for all heads at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import ops
from .common import block

_NEVER = 2**62  # larger than any position: what masked-off lanes hold in the search


@triton.jit
def _write_in_place(k_ptr, v_ptr, pos_ptr, kn_ptr, vn_ptr, np_ptr, S, H, DK, DV,
                    sk_b, sk_h, sk_s, sk_d, sv_b, sv_h, sv_s, sv_d, sp_b, sp_s,
                    skn_b, skn_h, skn_d, svn_b, svn_h, svn_d, snp_b,
                    NEVER: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
                    BLOCK_DV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)  # int64: b * stride can pass 2**31
    lanes = tl.arange(0, BLOCK_S)
    lowest = tl.full([BLOCK_S], NEVER, tl.int64)
    where = tl.full([BLOCK_S], 0, tl.int64)
    for start in range(0, S, BLOCK_S):
        j = start + lanes
        p = tl.load(pos_ptr + b * sp_b + j * sp_s, mask=j < S, other=NEVER)
        lower = p < lowest  # strict: each lane keeps its earliest minimum
        lowest = tl.where(lower, p, lowest)
        where = tl.where(lower, j, where)
    least = tl.min(lowest, 0)
    slot = tl.min(tl.where(lowest == least, where, S), 0)  # the earliest among the lanes' minima
    h = tl.arange(0, BLOCK_H)
    dk, dv = tl.arange(0, BLOCK_DK), tl.arange(0, BLOCK_DV)
    mk = (h[:, None] < H) & (dk[None, :] < DK)
    mv = (h[:, None] < H) & (dv[None, :] < DV)
    k = tl.load(kn_ptr + b * skn_b + h[:, None] * skn_h + dk[None, :] * skn_d, mask=mk)
    v = tl.load(vn_ptr + b * svn_b + h[:, None] * svn_h + dv[None, :] * svn_d, mask=mv)
    tl.store(k_ptr + b * sk_b + slot * sk_s + h[:, None] * sk_h + dk[None, :] * sk_d, k, mask=mk)
    tl.store(v_ptr + b * sv_b + slot * sv_s + h[:, None] * sv_h + dv[None, :] * sv_d, v, mask=mv)
    tl.store(pos_ptr + b * sp_b + slot * sp_s, tl.load(np_ptr + b * snp_b))


def write_in_place(keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, k_new: torch.Tensor,
                   v_new: torch.Tensor, new_pos: torch.Tensor, layer: int) -> None:
    """Triton `ops.write_in_place`: k_new [B, H, 1, Dk], v_new [B, H, 1, Dv] and new_pos [B, 1] into each row's
    slot of lowest position of keys [B, H, S, Dk], values, positions [B, S]."""
    ops._check_append(keys, values, positions, k_new, v_new, new_pos)
    ops._check(k_new.shape[2] == 1, f"entropykv.write_in_place: writes one entry per row, got {k_new.shape[2]}")
    b, h, s, dk = keys.shape
    dv = values.shape[-1]
    _write_in_place[(b,)](keys, values, positions, k_new, v_new, new_pos, s, h, dk, dv, *keys.stride(),
                          *values.stride(), *positions.stride(), k_new.stride(0), k_new.stride(1), k_new.stride(3),
                          v_new.stride(0), v_new.stride(1), v_new.stride(3), new_pos.stride(0), NEVER=_NEVER,
                          BLOCK_S=min(1024, block(s)), BLOCK_H=block(h, 1), BLOCK_DK=block(dk), BLOCK_DV=block(dv),
                          num_warps=4)
