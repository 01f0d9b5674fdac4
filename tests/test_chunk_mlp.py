"""`entropykv::gated_mlp` and the pass that puts it in prefill graphs (`passes/chunk_mlp.py`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS, left_padded, random_prompt, tiny_model
from torch import fx, nn

import entropykv_fx
from entropykv_fx import hf, ops
from entropykv_fx.passes.chunk_mlp import chunk_mlp


def unchunked(x, gate, up, down, activation):
    return F.linear(ops.GATED_ACTIVATIONS[activation](F.linear(x, gate)) * F.linear(x, up), down)


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 9), min_size=1, max_size=3), hidden=st.integers(1, 12), inner=st.integers(1, 20),
       out=st.integers(1, 12), chunk=st.integers(1, 30), activation=st.sampled_from(sorted(ops.GATED_ACTIVATIONS)),
       seed=st.integers(0, 2**16))
def test_every_chunking_gives_each_row_the_unchunked_mlp(lead, hidden, inner, out, chunk, activation, seed):
    gen = torch.Generator().manual_seed(seed)
    x, gate, up = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in
                   ((*lead, hidden), (inner, hidden), (inner, hidden)))
    down = torch.randn(out, inner, generator=gen, dtype=torch.float64)
    result = ops.gated_mlp(x, gate, up, down, activation, chunk)
    assert result.shape == (*lead, out)
    torch.testing.assert_close(result, unchunked(x, gate, up, down, activation), rtol=1e-12, atol=1e-12)


def test_gated_mlp_opcheck():
    x, gate, up, down = torch.randn(2, 5, 8), torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
    torch.library.opcheck(ops.gated_mlp, (x, gate, up, down, "silu", 3))


@pytest.mark.parametrize(("change", "match"), [
    (dict(activation="relu"), r"activation 'relu' is not one of \['gelu_tanh', 'silu'\]"),
    (dict(chunk=0), "chunk must be >= 1 token, got 0"),
    (dict(up=torch.randn(12, 7)), r"weights gate \(12, 8\), up \(12, 7\), down \(8, 12\) must be"),
    (dict(down=torch.randn(8, 11)), r"must be \[I, 8\], \[I, 8\], \[H_out, I\]"),
])
def test_gated_mlp_refuses_bad_arguments(change, match):
    args = dict(x=torch.randn(2, 5, 8), gate=torch.randn(12, 8), up=torch.randn(12, 8), down=torch.randn(8, 12),
                activation="silu", chunk=3) | change
    with pytest.raises(ValueError, match=match):
        ops.gated_mlp(args["x"], args["gate"], args["up"], args["down"], args["activation"], args["chunk"])


class GatedMLP(nn.Module):
    """A Llama MLP as Dynamo's graphs hold it (functional linears), or a variation the pass must leave alone."""

    def __init__(self, swapped=False, bias=False, reuse_gate=False, act=F.silu, keyword_mul=False):
        super().__init__()
        self.w_gate, self.w_up, self.w_down = (nn.Parameter(torch.randn(*s)) for s in ((12, 8), (12, 8), (8, 12)))
        self.b_gate = nn.Parameter(torch.randn(12)) if bias else None
        self.swapped, self.reuse_gate, self.act, self.keyword_mul = swapped, reuse_gate, act, keyword_mul

    def forward(self, x):
        g, u = F.linear(x, self.w_gate, self.b_gate), F.linear(x, self.w_up)
        if self.keyword_mul:
            product = torch.mul(self.act(g), other=u)
        else:
            product = u * self.act(g) if self.swapped else self.act(g) * u
        out = F.linear(product, self.w_down)
        return out + g.sum() if self.reuse_gate else out


@pytest.mark.parametrize(("module", "expected"), [
    (GatedMLP(), 1), (GatedMLP(swapped=True), 1), (GatedMLP(act=lambda g: F.gelu(g, approximate="tanh")), 1),
    (GatedMLP(bias=True), 0), (GatedMLP(reuse_gate=True), 0), (GatedMLP(act=F.relu), 0),
    (GatedMLP(keyword_mul=True), 0)])
def test_the_pass_rewrites_gated_mlps_only(module, expected):
    gm = fx.symbolic_trace(module)
    x = torch.randn(3, 10, 8)
    before = module(x)
    assert chunk_mlp(gm, chunk=4) == expected
    torch.testing.assert_close(gm(x), before)
    calls = [n for n in gm.graph.nodes if n.target is torch.ops.entropykv.gated_mlp.default]
    assert len(calls) == expected


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 tokens (MLPs and norms), so that the tiny prompts are cut into several."""
    monkeypatch.setattr(hf, "PREFILL_CHUNK_TOKENS", 7)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_a_prefill_in_token_chunks_generates_the_unmodified_tokens(arch, small_chunks):
    ids = random_prompt(40, seed=3)
    with torch.no_grad():
        reference = tiny_model(arch).generate(ids, max_new_tokens=6, do_sample=False)
        model = entropykv_fx.optimize(tiny_model(arch), policy="full")
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), reference)
    layers = model.config.num_hidden_layers
    norms = sum(type(m).__name__.endswith("RMSNorm") for m in model.modules())  # q/k norms of Qwen3 too
    assert [(g.prefill, g.chunked_mlps, g.chunked_norms) for g in model.entropykv.graphs] == [(True, layers, norms),
                                                                                              (False, 0, 0)]


def test_a_padded_batch_in_mlp_chunks_gives_each_row_its_own_tokens(small_chunks):
    prompts = [random_prompt(30, seed=4)[0], random_prompt(19, seed=5)[0]]
    ids, mask = left_padded(prompts)
    model = entropykv_fx.optimize(tiny_model(), policy="cache_topk", budget=0.5)
    with torch.no_grad():
        batch = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)[:, ids.shape[1]:]
        alone = [model.generate(p[None], max_new_tokens=5, do_sample=False)[0, p.numel():] for p in prompts]
    assert all(torch.equal(b, a) for b, a in zip(batch, alone))
    assert model.entropykv.graphs[0].chunked_mlps == model.config.num_hidden_layers


def test_a_prefill_run_with_gradients_enabled_keeps_the_model_s_mlps_and_norms():
    """The ops have no backward formula, so a graph compiled while gradients are recorded is left as it was."""
    model = entropykv_fx.optimize(tiny_model(), policy="full")
    model(random_prompt(20), use_cache=True)
    assert model.entropykv.graphs[0].prefill
    assert (model.entropykv.graphs[0].chunked_mlps, model.entropykv.graphs[0].chunked_norms) == (0, 0)
