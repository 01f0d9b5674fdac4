"""Fused scoring kernel vs the `entropykv::score` reference."""

import importlib

import pytest
import torch
from kernel_testing import DTYPES, GPU, SCORE_TOL, prompt_positions, randn, rel_err, seed

from entropykv_fx import kernels, ops

kernels_score = importlib.import_module("entropykv_fx.kernels.score")  # the module, not the `score` op it exports

SHAPES = [  # B, Hq, Hkv, W, S, D
    (1, 1, 1, 1, 1, 16),  # one token
    (2, 3, 1, 4, 70, 32),  # GQA 3, S not a multiple of the block
    (2, 8, 2, 8, 130, 64),  # GQA 4, several chunks
    (1, 2, 2, 3, 40, 128),  # MHA, head_dim 128
    (1, 8, 1, 24, 50, 16),  # 192 rows per KV head: two row blocks
]
if GPU:
    SHAPES += [(1, 32, 8, 32, 4099, 128), (2, 9, 3, 32, 5000, 64), (2, 32, 8, 64, 3000, 128)]


@pytest.mark.parametrize("window", [0, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_score_matches_reference(shape, dtype, window):
    seed(shape, dtype, window)
    b, hq, hkv, w, s, d = shape
    q, k = randn(b, hq, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    q = q[:, :, -w:]  # the window of a prompt: a non-contiguous view, as hf.py passes it
    k_pos = prompt_positions(b, s, [0, min(5, s - 1)][:b])
    q_pos = k_pos[:, -w:]
    scale = d ** -0.5
    out = kernels.score(q, k, q_pos, k_pos, scale, window)
    ref = ops.score(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), scale, window)
    for name, o, r in zip(("entropy", "kv_scores", "layer_scores"), out, ref):
        assert o.dtype == torch.float32 and o.shape == r.shape
        assert rel_err(o, r) < SCORE_TOL, name


def test_score_padded_window_queries():
    """A left-padded row whose window holds pad queries: they count for nothing (entropy mean over valid)."""
    seed("pads")
    b, hq, hkv, w, s, d = 2, 4, 2, 6, 20, 32
    q, k = randn(b, hq, w, d), randn(b, hkv, s, d)
    k_pos = prompt_positions(b, s, [0, 17])  # row 1: 3 real tokens, so 3 of its 6 window queries are pads
    q_pos = k_pos[:, -w:]
    out = kernels.score(q, k, q_pos, k_pos, 0.2, 0)
    ref = ops.score(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), 0.2, 0)
    for o, r in zip(out, ref):
        assert rel_err(o, r) < SCORE_TOL
    assert torch.allclose(out[1][1, :, :17].cpu(), torch.zeros(())), "pad slots receive no attention"


@pytest.mark.skipif(not GPU, reason="the op dispatches to Triton for CUDA tensors only")
def test_score_op_dispatches_to_triton():
    q, k = randn(1, 4, 8, 64), randn(1, 2, 100, 64)
    pos = prompt_positions(1, 100, [0])
    torch.testing.assert_close(ops.score(q, k, pos[:, -8:], pos, 0.125, 0),
                               kernels.score(q, k, pos[:, -8:], pos, 0.125, 0), rtol=0, atol=0)


MAX_SHAPES = [  # B, Hq, Hkv, L (queries), S, slots
    (1, 2, 1, 5, 40, 40),
    (2, 6, 2, 30, 70, 33),  # 180 rows per KV head: two row blocks; only the first 33 slots scored
    (2, 4, 4, 9, 130, 0),
]
if GPU:
    MAX_SHAPES += [(1, 32, 8, 600, 1300, 650), (2, 9, 3, 1000, 2100, 1000)]


@pytest.mark.parametrize("window", [0, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MAX_SHAPES, ids=str)
def test_max_attention_matches_reference(shape, dtype, window):
    """The reconstruction scorer's pass: queries in the middle of a left-padded prompt (the repetition's)."""
    seed("max", shape, dtype, window)
    b, hq, hkv, length, s, slots = shape
    d = 64
    q, k = randn(b, hq, length, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    k_pos = prompt_positions(b, s, [0, min(11, s - 1)][:b])
    q_pos = k_pos[:, s - length - 3:s - 3]
    out = kernels.max_attention(q, k, q_pos, k_pos, d ** -0.5, window, slots)
    ref = ops.max_attention(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, window, slots)
    lse = ops.log_normalizers(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, window).to(q.device)
    given = kernels.max_attention(q, k, q_pos, k_pos, d ** -0.5, window, slots, lse)  # the slot pass alone
    assert out.shape == given.shape == ref.shape == (b, hkv, slots) and out.dtype == torch.float32
    if slots:
        assert rel_err(out, ref) < SCORE_TOL and rel_err(given, ref) < SCORE_TOL


@pytest.mark.parametrize("window", [0, 17])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", MAX_SHAPES, ids=str)
def test_attention_lse_matches_reference(shape, dtype, window):
    """Left-padded queries in the middle of a prompt: the first pass's normalizers (or, for an unpadded causal
    half-precision prefill on a GPU, the flash kernel's), -inf for queries that see nothing."""
    seed("lse", shape, dtype, window)
    b, hq, hkv, length, s, _ = shape
    d = 64
    q, k, v = randn(b, hq, length, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype), randn(b, hkv, s, d, dtype=dtype)
    k_pos = prompt_positions(b, s, [0, min(11, s - 1)][:b])
    q_pos = k_pos[:, s - length - 3:s - 3]
    out, lse = kernels.attention_lse(q, k, v, q_pos, k_pos, d ** -0.5, window)
    want = ops.log_normalizers(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, window)
    assert lse.dtype == torch.float32 and lse.shape == want.shape
    assert torch.equal(lse.isinf().cpu(), want.isinf())
    seen = ~want.isinf()
    torch.testing.assert_close(lse.cpu()[seen], want[seen], atol=1e-3, rtol=1e-4)
    assert rel_err(out, ops.attention(q.cpu(), k.cpu(), v.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, window)) < 1e-2


@pytest.mark.skipif(not GPU, reason="the fused kernels' normalizers: CUDA only")
@pytest.mark.parametrize("fused", ["cudnn", "flash"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_lse_takes_the_fused_kernels_normalizers(dtype, fused, monkeypatch):
    """cuDNN's attention where it takes the inputs, FlashAttention-2 where it refused them: the same results."""
    seed("fused", dtype)
    q, k, v = randn(2, 32, 700, 128, dtype=dtype), randn(2, 8, 700, 128, dtype=dtype), randn(2, 8, 700, 128, dtype=dtype)
    pos = prompt_positions(2, 700, [0, 0])
    key = (q.device, dtype, 128)
    monkeypatch.setattr(kernels_score, "_CUDNN_REFUSED", {key} if fused == "flash" else set())
    out, lse = kernels.attention_lse(q, k, v, pos, pos, 128 ** -0.5, 0)
    assert kernels_score.fused_lse_kernel(q) == fused or fused == "cudnn", "the refusal stays recorded"
    if fused == "cudnn" and kernels_score.fused_lse_kernel(q) == "flash":
        pytest.skip("cuDNN's attention refused these inputs on this GPU and build (FlashAttention-2 ran)")
    want = ops.log_normalizers(q.cpu(), k.cpu(), pos.cpu(), pos.cpu(), 128 ** -0.5, 0)
    torch.testing.assert_close(lse.cpu(), want, atol=2e-3, rtol=1e-4)
    assert rel_err(out, ops.attention(q, k, v, pos, pos, 128 ** -0.5, 0)) < 1e-2


@pytest.mark.parametrize("reduce_max", [False, True], ids=["score", "max_attention"])
def test_scores_with_slots_in_any_order(reduce_max):
    """Slots need not hold increasing positions (a compressed cache, a reordered one): the first pass skips a key
    block only when no row of the block sees any of its keys, wherever the visible keys lie."""
    seed("shuffled", reduce_max)
    b, hq, hkv, w, s, d = 2, 8, 2, 40, 300, 32
    q, k = randn(b, hq, w, d), randn(b, hkv, s, d)
    k_pos = prompt_positions(b, s, [0, 23])
    q_pos = k_pos[:, 150:150 + w]  # queries in the middle: half of the keys lie in their future
    order = torch.randperm(s, generator=torch.Generator().manual_seed(0)).to(k_pos.device)
    k, k_pos = k[:, :, order], k_pos[:, order]
    if reduce_max:
        out = kernels.max_attention(q, k, q_pos, k_pos, d ** -0.5, 0, s)
        ref = ops.max_attention(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, 0, s)
    else:
        out = kernels.score(q, k, q_pos, k_pos, d ** -0.5, 0)[1]
        ref = ops.score(q.cpu(), k.cpu(), q_pos.cpu(), k_pos.cpu(), d ** -0.5, 0)[1]
    assert rel_err(out, ref) < SCORE_TOL
    hidden = (k_pos[:, None, :] > q_pos.max(-1).values[:, None, None]).expand_as(out)
    assert bool((out[hidden] == 0).all()) and bool((out[~hidden & (k_pos[:, None] >= 0)] > 0).all())
