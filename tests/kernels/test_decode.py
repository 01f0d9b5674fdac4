"""Decode attention kernel (bf16/fp16/fp32 and int8 storage) vs `entropykv::attention` / `attention_int8`."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, GPU, OUT_TOL, compressed_positions, randn, rel_err, seed

from entropykv_fx import kernels, ops
from entropykv_fx.kernels import decode

SHAPES = [  # B, Hq, Hkv, L, S, D, splits (None: the heuristic)
    (1, 1, 1, 1, 1, 16, None),  # one slot
    (2, 3, 1, 1, 70, 32, 2),  # GQA 3, S not a multiple of the block
    (2, 8, 2, 1, 200, 64, 3),  # GQA 4
    (2, 4, 4, 1, 33, 128, None),  # MHA, head_dim 128
    (1, 4, 2, 3, 50, 32, 2),  # three new tokens at once
]
if GPU:
    SHAPES += [(1, 32, 8, 1, 32771, 128, None), (16, 32, 8, 1, 4000, 128, None), (4, 9, 3, 1, 10000, 64, None),
               (2, 32, 8, 2, 3000, 128, None)]


def decode_inputs(shape, dtype):
    b, hq, hkv, length, s, d, _ = shape
    q = randn(b, length, hq, d, dtype=dtype).transpose(1, 2)  # as transformers lays out q: non-contiguous
    k, v = randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    k_pos = compressed_positions(b, s)
    q_pos = k_pos.max(-1, keepdim=True).values + 1 + torch.arange(length, device=DEVICE)
    return q, k, v, q_pos, k_pos


def cpu(*ts):
    return [t.cpu() for t in ts]


@pytest.mark.parametrize("window", [0, 25])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_matches_reference(shape, dtype, window):
    seed(shape, dtype, window)
    q, k, v, q_pos, k_pos = decode_inputs(shape, dtype)
    scale = q.shape[-1] ** -0.5
    out = kernels.attention(q, k, v, q_pos, k_pos, scale, window, splits=shape[-1])
    exact = ops.attention(*[t.float() for t in cpu(q, k, v)], *cpu(q_pos, k_pos), scale, window)
    assert out.dtype == dtype and out.shape == exact.shape
    assert rel_err(out, exact) < OUT_TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_decode_int8_matches_reference(shape, dtype):
    seed(shape, dtype, "int8")
    q, k, v, q_pos, k_pos = decode_inputs(shape, dtype)
    everything = torch.arange(k.shape[2], device=DEVICE)[None].expand(k.shape[0], -1)
    k_q, k_scale, v_q, v_scale = ops.gather_int8(k, v, everything)
    scale = q.shape[-1] ** -0.5
    out = kernels.attention(q, k_q, v_q, q_pos, k_pos, scale, 0, k_scale, v_scale, splits=shape[-1])
    ref = ops.attention_int8(*cpu(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos), scale, 0)
    assert out.dtype == dtype
    assert rel_err(out, ref.float()) < OUT_TOL[dtype]


def test_decode_rows_that_see_nothing_are_zero():
    """A pad query (position -1) and a query whose window holds no cached token both give zeros."""
    seed("empty rows")
    q, k, v, q_pos, k_pos = decode_inputs((2, 4, 2, 1, 40, 16, None), torch.float32)
    q_pos[0] = -1
    out = kernels.attention(q, k, v, q_pos, k_pos, 0.25, 0)
    assert torch.equal(out[0].cpu(), torch.zeros_like(out[0].cpu()))
    out = kernels.attention(q, k, v, q_pos + 1000, k_pos, 0.25, 10)
    assert torch.equal(out.cpu(), torch.zeros_like(out.cpu()))


@pytest.mark.parametrize(("groups", "length", "calls"), [
    (4, 1, 1), (4, 16, 1), (4, 17, 2), (3, 22, 2), (1, 64, 1), (1, 65, 2), (4, 256, 16), (4, 257, None),
    (65, 1, None)])
def test_query_blocks_split_a_continuation_into_kernel_calls(groups, length, calls):
    assert decode.query_blocks(groups, length) == calls


@pytest.mark.parametrize("layout", ["plain", "int8", "packed"])
def test_a_continuation_of_many_tokens_runs_in_query_blocks(layout, monkeypatch):
    """The ops' CUDA entry points: 70 new tokens of 3 query heads per KV head take 4 kernel calls, which together
    give every query row the reference's output (pads, a position hole and a later query seeing the new slots)."""
    seed("query blocks", layout)
    b, hq, hkv, length, s, d = 2, 6, 2, 70, 150, 32
    calls, kernel = [], decode.attention
    monkeypatch.setattr(decode, "attention", lambda q, *args, **kw: calls.append(q.shape[2]) or kernel(q, *args, **kw))
    q, k, v, q_pos, k_pos = decode_inputs((b, hq, hkv, length, s, d, None), torch.float32)
    k_pos[:, -length:] = q_pos  # the new tokens' own slots: each query sees those up to its position
    q_pos[1, :5] = -1  # pad rows give zeros
    scale = d ** -0.5
    if layout == "plain":
        out = decode._attention_cuda(q, k, v, q_pos, k_pos, scale, 40)
        ref = ops.attention(*cpu(q, k, v, q_pos, k_pos), scale, 40)
    elif layout == "int8":
        everything = torch.arange(s, device=DEVICE)[None].expand(b, -1)
        cache = ops.gather_int8(k, v, everything)
        out = decode._attention_int8_cuda(q, *cache, q_pos, k_pos, scale, 40)
        ref = ops.attention_int8(*cpu(q, *cache, q_pos, k_pos), scale, 40)
    else:  # the two KV heads' slots one after the other, the second head holding the first 90 of its slots
        keys, values = torch.cat([k[:, 0], k[:, 1, :90]], 1), torch.cat([v[:, 0], v[:, 1, :90]], 1)
        positions = torch.cat([k_pos, k_pos[:, :90]], 1)
        starts = torch.tensor([0, s, s + 90], device=DEVICE)
        out = decode._attention_packed_cuda(q, keys, values, q_pos, positions, starts, scale, 40)
        ref = ops.attention_packed(*cpu(q, keys, values, q_pos, positions, starts), scale, 40)
    assert calls == [21, 21, 21, 7]  # MAX_ROWS // 3 tokens a call
    assert out.shape == ref.shape == (b, hq, length, d) and out.is_contiguous()
    assert rel_err(out, ref) < OUT_TOL[torch.float32]
    assert not out[1, :, :5].any()


def test_attention_int8_opcheck():
    seed("opcheck")
    q, k, v, q_pos, k_pos = decode_inputs((2, 4, 2, 1, 24, 16, None), torch.float32)
    cache = ops.gather_int8(k, v, torch.arange(24, device=DEVICE)[None].expand(2, -1))
    torch.library.opcheck(ops.attention_int8, (*cpu(q, *cache, q_pos, k_pos), 0.25, 0))
    if GPU:
        torch.library.opcheck(ops.attention_int8, (q, *cache, q_pos, k_pos, 0.25, 0))


@pytest.mark.skipif(not GPU, reason="the ops dispatch to Triton for CUDA tensors only")
def test_ops_dispatch_decode_to_triton_and_prefill_to_sdpa():
    q, k, v, q_pos, k_pos = decode_inputs((2, 32, 8, 1, 3000, 128, None), torch.bfloat16)
    assert torch.equal(ops.attention(q, k, v, q_pos, k_pos, 0.1, 0), kernels.attention(q, k, v, q_pos, k_pos, 0.1, 0))
    cache = ops.gather_int8(k, v, torch.arange(3000, device=DEVICE)[None].expand(2, -1))
    assert torch.equal(ops.attention_int8(q, *cache, q_pos, k_pos, 0.1, 0),
                       kernels.attention(q, cache[0], cache[2], q_pos, k_pos, 0.1, 0, cache[1], cache[3]))
    q, k, v, q_pos, k_pos = decode_inputs((1, 8, 8, 1100, 1100, 64, None), torch.bfloat16)  # prefill: reference
    assert rel_err(ops.attention(q, k, v, q_pos, k_pos, 0.1, 0),
                   ops.attention(*cpu(q, k, v, q_pos, k_pos), 0.1, 0)) < OUT_TOL[torch.bfloat16]
