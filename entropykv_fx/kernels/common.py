"""Pieces shared by the scoring and decode kernels: query rows, position visibility, one block of logits.

Both kernels give one program all the query rows that share a KV head: row r is query head g = r // L of the
group and query l = r % L (L window queries for scoring, L new tokens for decode), so K and V are read once
per group (GQA without expanding). Logits are kept in log2 units (scale * log2(e) folded in) for exp2.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The interpreter (CPU, numpy) has no bf16 arithmetic: compute in fp32 there. Decided when kernels are built.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")
LOG2E = 1.4426950408889634


def block(n: int, least: int = 16) -> int:
    """Power-of-two block covering n; tl.dot needs every dimension >= 16."""
    return max(least, triton.next_power_of_2(n))


def splits_for(programs: int, length: int, block_n: int, device: torch.device, waves: int = 4) -> tuple[int, int]:
    """(splits, chunk): split `length` into chunks of whole blocks so about `waves` programs run per SM."""
    length = max(length, 1)  # an empty cache still gets one (empty) chunk, so every output row is written
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 2
    splits = max(1, min(triton.cdiv(waves * sms, programs), triton.cdiv(length, block_n)))
    chunk = triton.cdiv(triton.cdiv(length, splits), block_n) * block_n
    return triton.cdiv(length, chunk), chunk


def dot_precision(dtype: torch.dtype) -> str | None:
    """fp32 inputs get an exact fp32 dot (tf32 would lose ~3e-4); fp16/bf16 take the default (tensor cores)."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def load_rows(q_ptr, qpos_ptr, rows, G, L, D, sq_h, sq_l, sq_d, sqp_l,
              BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """q [BLOCK_M, BLOCK_D] and positions [BLOCK_M] of the rows; padding rows get position -1 (see nothing).

    q_ptr points at (batch, first query head of the group); qpos_ptr at the batch's positions.
    """
    d = tl.arange(0, BLOCK_D)
    ok = rows < G * L
    g, l = rows // L, rows % L
    q = tl.load(q_ptr + g[:, None] * sq_h + l[:, None] * sq_l + d[None, :] * sq_d,
                mask=ok[:, None] & (d[None, :] < D), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    qp = tl.load(qpos_ptr + l * sqp_l, mask=ok, other=-1)
    return q, qp


@triton.jit
def logits_block(q, qp, k_ptr, kpos_ptr, ks_ptr, start, S, D, window, scale_log2, sk_s, sk_d, skp_s, sks_s,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, PRECISION: tl.constexpr):
    """Logits (log2 units) of the rows against keys start..start+BLOCK_N, -inf where not visible; and the mask.

    Visibility is `visible`'s. With QUANT, k holds int8 and ks_ptr its per-token scales: the scale multiplies the
    logit, after the dot.
    """
    j = start + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    k = tl.load(k_ptr + j[:, None] * sk_s + d[None, :] * sk_d, mask=(j[:, None] < S) & (d[None, :] < D), other=0)
    kp = tl.load(kpos_ptr + j * skp_s, mask=j < S, other=-1)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * scale_log2
    if QUANT:
        s = s * tl.load(ks_ptr + j * sks_s, mask=j < S, other=0.0)[None, :]
    seen = visible(qp, kp, window)
    return tl.where(seen, s, float("-inf")), seen


@triton.jit
def visible(qp, kp, window):
    """[rows, keys] bool, the ops.visibility rule: 0 <= k_pos <= q_pos, and q_pos - k_pos < window when window > 0."""
    seen = (kp[None, :] >= 0) & (kp[None, :] <= qp[:, None]) & (qp[:, None] >= 0)
    return seen & ((window <= 0) | (qp[:, None] - kp[None, :] < window))
