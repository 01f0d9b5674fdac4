"""Gather and int8 quantizing gather kernels vs `entropykv::gather` / `entropykv::gather_int8`; opcheck."""

import pytest
import torch
from kernel_testing import DEVICE, DTYPES, GPU, randn, seed

from entropykv_fx import kernels, ops

SHAPES = [  # B, H, S, K, Dk, Dv, per_head
    (1, 1, 1, 1, 16, 16, False),  # S = 1
    (2, 3, 70, 17, 32, 32, False),  # layer-shared token set
    (2, 2, 100, 65, 64, 64, True),  # per-head token sets
    (1, 2, 30, 7, 128, 16, True),  # head_dim 128, narrower values
]
if GPU:
    SHAPES += [(16, 8, 8192, 2048, 128, 128, False), (1, 3, 33000, 8191, 64, 64, True)]


def kept_indices(b, h, s, kk, per_head):
    shape = (b, h) if per_head else (b,)
    return torch.stack([torch.randperm(s)[:kk].sort().values for _ in range(torch.Size(shape).numel())]) \
        .reshape(*shape, kk).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_exact(shape, dtype):
    seed(shape, dtype)
    b, h, s, kk, dk, dv, per_head = shape
    k, v = randn(b, h, s, dk, dtype=dtype), randn(b, h, s, dv, dtype=dtype)
    idx = kept_indices(b, h, s, kk, per_head)
    for o, r in zip(kernels.gather(k, v, idx), ops.gather(k.cpu(), v.cpu(), idx.cpu())):
        assert torch.equal(o.cpu(), r)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gather_int8(shape, dtype):
    seed(shape, dtype, "int8")
    b, h, s, kk, dk, dv, per_head = shape
    k, v = randn(b, h, s, dk, dtype=dtype) * 3, randn(b, h, s, dv, dtype=dtype)
    k[0, 0, 0] = 0  # an all-zero token: scale 0, no division by zero
    idx = kept_indices(b, h, s, kk, per_head)
    out = kernels.gather_int8(k, v, idx)
    ref = ops.gather_int8(k.cpu(), v.cpu(), idx.cpu())
    for x, (q8, sc), (q8_ref, sc_ref) in zip(ops.gather(k.cpu(), v.cpu(), idx.cpu()),
                                             (out[:2], out[2:]), (ref[:2], ref[2:])):
        assert q8.dtype == torch.int8 and sc.dtype == torch.float32
        torch.testing.assert_close(sc.cpu(), sc_ref, rtol=1e-6, atol=0)
        diff = (q8.cpu().int() - q8_ref.int()).abs()  # GPU division may round a .5 tie the other way
        assert diff.max() <= 1 and diff.float().mean() < 1e-3
        err = (ops.dequantize_int8(q8.cpu(), sc.cpu()) - x.float()).abs()
        assert (err <= sc.cpu()[..., None] * 0.5001 + 1e-12).all(), "off by more than half a step"


@pytest.mark.parametrize("per_head", [False, True])
def test_gather_int8_opcheck(per_head):
    seed("opcheck", per_head)
    k, v = randn(2, 3, 20, 16), randn(2, 3, 20, 16)
    idx = kept_indices(2, 3, 20, 6, per_head)
    torch.library.opcheck(ops.gather_int8, (k.cpu(), v.cpu(), idx.cpu()))
    if GPU:
        torch.library.opcheck(ops.gather_int8, (k, v, idx))
