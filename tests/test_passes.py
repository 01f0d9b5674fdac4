"""The attention-site finder on the three graph forms, on HF models, a gpt-fast-style model and plain math."""

from __future__ import annotations

import math

import pytest
import torch
from static_models import Attention
from tiny_models import ARCHS, random_prompt, tiny_model
from torch import nn

from entropykv_fx.passes import explain, find_attention_sites

pytestmark = pytest.mark.compat  # in the compatibility suite (scripts/test_transformers.sh)


def static_cache_attention() -> nn.Module:
    """gpt-fast style: static KV buffers written at input_pos, SDPA with a mask over the whole buffer."""
    return Attention(dim=32, heads=4, kv_heads=2, max_len=64, eager=False)


class MathAttention(nn.Module):
    def forward(self, q, k, v):
        w = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1)
        return w @ v


class NotAttention(nn.Module):
    def forward(self, x, y):
        return torch.softmax(x @ y, dim=1) @ y  # softmax over dim 1 and no transposed key: not attention


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_every_site_of_tiny_hf_models_is_found_in_dynamo_and_export_graphs(arch, impl):
    model = tiny_model(arch)
    model.set_attn_implementation(impl)
    ids = random_prompt(16)
    dynamo = explain(model, ids, use_cache=False)
    exported = explain(torch.export.export(model, (ids,), kwargs={"use_cache": False}, strict=False))
    for reports, form in ((dynamo, "sdpa" if impl == "sdpa" else "eager"),
                          (exported, "aten_sdpa" if impl == "sdpa" else "eager")):
        sites = [s for r in reports for s in r.sites]
        assert len(sites) == 3 and {s.form for s in sites} == {form}
        assert all(s.kv_source is not None for s in sites), "GQA repetition (4 query / 2 kv heads) seen through"
        assert all(s.scale == pytest.approx(model.model.layers[0].self_attn.scaling) for s in sites)


def test_gpt_fast_style_static_cache_site():
    module = static_cache_attention()
    x, pos = torch.randn(1, 5, 32), torch.arange(5)
    (report,) = explain(torch.export.export(module, (x, pos), strict=False))
    (site,) = report.sites
    assert site.form == "aten_sdpa" and site.mask is not None and not site.is_causal and site.kv_source is not None
    assert "1 attention site(s) found" in str(report)


def test_plain_math_attention_and_non_attention():
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    (site,) = explain(torch.export.export(MathAttention(), (q, k, v), strict=False))[0].sites
    assert site.form == "eager" and site.scale == pytest.approx(8 ** -0.5) and site.mask is None and site.kv_source is None
    assert [n.name for n in (site.query, site.key, site.value)] == ["q", "k", "v"]
    ep = torch.export.export(NotAttention(), (torch.randn(4, 4), torch.randn(4, 4)), strict=False)
    assert find_attention_sites(ep.graph_module.graph) == []


def test_explain_rejects_what_it_cannot_capture():
    with pytest.raises(ValueError, match="pass example inputs"):
        explain(MathAttention())
    with pytest.raises(TypeError, match="expected an nn.Module"):
        explain("model")


def test_in_place_writes_survive_the_pass():
    """FX's dead-code elimination takes an unused `x.copy_(y)` method call for pure; transformers' tensor-parallel
    layers write their all-reduce back that way, so the pass must keep every in-place call (issue 20)."""
    import torch._dynamo

    def f(x, buf, acc):
        buf.copy_(x * 2)  # a method call whose result is unused
        torch.Tensor.add_(acc, x)  # the same as a function
        return x + 1

    torch._dynamo.reset()
    x, buf, acc = torch.arange(4.0), torch.zeros(4), torch.ones(4)
    out = torch.compile(f, backend="entropykv", fullgraph=True)(x, buf, acc)
    assert torch.equal(out, x + 1) and torch.equal(buf, x * 2) and torch.equal(acc, x + 1)
