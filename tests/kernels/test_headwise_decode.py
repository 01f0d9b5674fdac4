"""The Triton decode kernel over the head-wise layout: one launch per KV head, ragged lengths, int8 heads; and over
the packed decode layout (every head's slots on one axis, one launch per layer)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, OUT_TOL, compressed_positions, randn, rel_err, seed

from entropykv_fx import kernels, ops
from entropykv_fx.headwise import HeadSlots, HeadwiseLayer


def headwise_layer(b, lengths, int8_heads, d, dtype) -> HeadwiseLayer:
    heads = []
    for s, int8 in zip(lengths, int8_heads):
        k, v = randn(b, 1, s, d, dtype=dtype), randn(b, 1, s, d, dtype=dtype)
        pos = compressed_positions(b, s)
        if int8:
            (k_q, k_s), (v_q, v_s) = ops.quantize_int8(k), ops.quantize_int8(v)
            heads.append(HeadSlots(k_q, v_q, pos, k_s, v_s))
        else:
            heads.append(HeadSlots(k, v, pos))
    return HeadwiseLayer(heads, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("window", [0, 20])
def test_kernel_reads_each_heads_ragged_slots(dtype, window):
    seed(dtype, window)
    b, group, d = 2, 3, 32
    layer = headwise_layer(b, [70, 9, 33], [False, True, False], d, dtype)
    q = randn(b, 1, 3 * group, d, dtype=dtype).transpose(1, 2)  # [B, Hq, 1, D], non-contiguous like transformers
    q_pos = torch.stack([h.positions.max(-1).values for h in layer.heads]).amax(0)[:, None] + 1
    scale = d ** -0.5
    for h, head in enumerate(layer.heads):
        q_h = q[:, h * group:(h + 1) * group]
        out = kernels.attention(q_h, head.keys, head.values, q_pos, head.positions, scale, window, head.key_scales,
                                head.value_scales, splits=2)
        cpu = [t.cpu() if t is not None else None for t in (q_h.float(), q_pos, head.positions, head.keys,
                                                              head.values, head.key_scales, head.value_scales)]
        qf, qp, kp, k, v, ks, vs = cpu
        ref = (ops.attention_int8(qf, k, ks, v, vs, qp, kp, scale, window) if head.int8
               else ops.attention(qf, k.float(), v.float(), qp, kp, scale, window))
        assert out.dtype == dtype and rel_err(out, ref) < OUT_TOL[dtype], f"head {h}"


@pytest.mark.parametrize("quant", [False, True])
def test_gather_kernels_copy_one_heads_slice(quant):
    """Head-wise compression gathers each KV head from a [B, 1, S, D] view of the prefill cache."""
    seed("gather", quant)
    k, v = randn(2, 3, 50, 32, dtype=torch.bfloat16), randn(2, 3, 50, 32, dtype=torch.bfloat16)
    idx = torch.randperm(50, device=DEVICE)[:17].sort().values.repeat(2, 1)
    for h in range(3):
        view_k, view_v = k[:, h:h + 1], v[:, h:h + 1]
        got = (kernels.gather_int8 if quant else kernels.gather)(view_k, view_v, idx)
        ref = (ops.gather_int8 if quant else ops.gather)(view_k.cpu(), view_v.cpu(), idx.cpu())
        for g, r in zip(got, ref):  # int8 payloads may round the other way by one step (as in test_gather.py)
            assert g.dtype == r.dtype and g.shape == r.shape == (2, 1, 17) + r.shape[3:], f"head {h}"
            if g.dtype == torch.int8:
                assert (g.cpu().int() - r.int()).abs().max() <= 1, f"head {h}"
            else:
                torch.testing.assert_close(g.cpu(), r, rtol=1e-6, atol=0)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), caps=st.lists(st.integers(0, 300), min_size=1, max_size=5), group=st.sampled_from([1, 4]),
       window=st.sampled_from([0, 50]), splits=st.sampled_from([None, 1, 3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_kernel_over_packed_heads_equals_the_reference(b, caps, group, window, splits, dtype):
    """Chunks never cross a head's segment, however the segments fall against the chunk size (empty heads too)."""
    seed("packed kernel", b, caps, group, window, splits, dtype)
    t, d = sum(caps), 32
    keys, values = randn(b, t, d, dtype=dtype), randn(b, t, d, dtype=dtype)
    positions = torch.randint(0, 400, (b, t), device=DEVICE)
    positions[torch.rand(b, t, device=DEVICE) < 0.2] = -1
    starts = torch.tensor([0, *torch.tensor(caps).cumsum(0).tolist()], device=DEVICE)
    q = randn(b, group * len(caps), 1, d, dtype=dtype)
    q_pos = torch.full((b, 1), 400, device=DEVICE)
    out = kernels.attention(q, keys, values, q_pos, positions, d ** -0.5, window, splits=splits, starts=starts)
    cpu = [t.cpu() for t in (q.float(), keys.float(), values.float(), q_pos, positions, starts)]
    ref = ops.attention_packed(*cpu[:3], cpu[3], cpu[4], cpu[5], d ** -0.5, window)
    assert out.dtype == dtype
    if ref.norm() > 0:
        assert rel_err(out, ref) < OUT_TOL[dtype]
    else:
        assert not out.any()
