"""`entropykv::rms_norm` and the pass that puts it in prefill graphs (`passes/chunk_norm.py`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from entropykv_fx import ops
from entropykv_fx.passes.chunk_norm import chunk_norm


def unchunked(x, weight, eps, dtype):
    """LlamaRMSNorm.forward's arithmetic."""
    x32 = x.to(torch.float32)
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=0, max_size=3), hidden=st.integers(1, 16), chunk=st.integers(1, 30),
       eps=st.sampled_from([0.0, 1e-6, 1e-2]), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 2**16))
def test_every_chunking_gives_each_row_the_unchunked_norm(lead, hidden, chunk, eps, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, hidden, generator=gen).to(dtype)
    weight = torch.randn(hidden, generator=gen).to(dtype)
    result = ops.rms_norm(x, weight, eps, dtype, chunk)
    expected = unchunked(x, weight, eps, dtype)
    assert result.shape == expected.shape and result.dtype == expected.dtype
    assert torch.equal(result, expected)  # row by row, the same operations on the same values


def test_rms_norm_opcheck():
    torch.library.opcheck(ops.rms_norm, (torch.randn(2, 5, 8), torch.randn(8), 1e-6, torch.float32, 3))
    torch.library.opcheck(ops.rms_norm, (torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(8), 1e-5,
                                         torch.bfloat16, 2))


@pytest.mark.parametrize(("change", "match"), [
    (dict(chunk=0), "chunk must be >= 1 token, got 0"),
    (dict(eps=-1e-6), "eps must be >= 0, got -1e-06"),
    (dict(weight=torch.randn(7)), r"weight \(7,\) must be \[8\] for x \(2, 5, 8\)"),
    (dict(weight=torch.randn(1, 8)), r"weight \(1, 8\) must be \[8\]"),
])
def test_rms_norm_refuses_bad_arguments(change, match):
    args = dict(x=torch.randn(2, 5, 8), weight=torch.randn(8), eps=1e-6, dtype=torch.float32, chunk=3) | change
    with pytest.raises(ValueError, match=match):
        ops.rms_norm(args["x"], args["weight"], args["eps"], args["dtype"], args["chunk"])


class RMSNorm(nn.Module):
    """LlamaRMSNorm as Dynamo's graphs hold it, or a variation the pass must leave alone."""

    def __init__(self, swapped=False, gemma=False, reuse=False, keepdim=True, scale_shape=(8,), eps_tensor=False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*scale_shape))
        if eps_tensor:  # a tensor the op's float argument cannot take
            self.register_buffer("eps", torch.tensor(1e-6))
        else:
            self.eps = 1e-6
        self.swapped, self.gemma, self.reuse, self.keepdim = swapped, gemma, reuse, keepdim

    def forward(self, x):
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=self.keepdim)
        if not self.keepdim:
            variance = variance[..., None]
        normed = (torch.rsqrt(variance + self.eps) * x32 if self.swapped else x32 * torch.rsqrt(variance + self.eps))
        if self.gemma:
            return (normed * (1.0 + self.weight.float())).to(torch.float32)
        out = normed.to(torch.float32) * self.weight if self.swapped else self.weight * normed.to(torch.float32)
        return out + variance.sum() if self.reuse else out


@pytest.mark.parametrize(("module", "expected"), [
    (RMSNorm(), 1), (RMSNorm(swapped=True), 1), (RMSNorm(gemma=True), 0), (RMSNorm(reuse=True), 0),
    (RMSNorm(keepdim=False), 0), (RMSNorm(scale_shape=(1, 8)), 0), (RMSNorm(eps_tensor=True), 0)])
def test_the_pass_rewrites_llama_rms_norms_only(module, expected):
    gm = fx.symbolic_trace(module)
    x = torch.randn(3, 10, 8)
    ShapeProp(gm).propagate(x)  # the pass reads the weight's shape from the graph's metadata
    before = module(x)
    assert chunk_norm(gm, chunk=4) == expected
    torch.testing.assert_close(gm(x), before, rtol=0, atol=0)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.entropykv.rms_norm.default]
    assert len(calls) == expected


def test_the_pass_leaves_a_norm_without_shape_metadata():
    """Without the weight's recorded shape it cannot tell a per-feature scale from another: it leaves the norm."""
    gm = fx.symbolic_trace(RMSNorm())
    assert chunk_norm(gm, chunk=4) == 0
