"""The rewrite pass and the Dynamo backend: sites paired with their cache, prefill scoring, strictness, Inductor."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_passes import MathAttention, static_cache_attention
from tiny_models import ARCHS, random_prompt, tiny_model
from torch import nn

import entropykv_fx
from entropykv_fx import ops
from entropykv_fx.passes import EntropyKVBackend, RewriteSettings, explain


def test_append_matches_concatenation_and_passes_opcheck():
    b, h, d = 2, 3, 8
    keys, values, pos = torch.randn(b, h, 5, d), torch.randn(b, h, 5, d), torch.randint(0, 9, (b, 5))
    k_new, v_new, new_pos = torch.randn(b, h, 2, d), torch.randn(b, h, 2, d), torch.tensor([[5, 6], [-1, 5]])
    k2, v2, p2 = ops.append(keys, values, pos, k_new, v_new, new_pos, 0)
    assert torch.equal(k2, torch.cat([keys, k_new], 2)) and torch.equal(v2, torch.cat([values, v_new], 2))
    assert torch.equal(p2, torch.cat([pos, new_pos], 1))
    empty = torch.empty(b, h, 0, d)
    torch.library.opcheck(ops.append, (empty, empty, pos[:, :0], k_new, v_new, new_pos, 3))
    with pytest.raises(ValueError, match="do not match the cache"):
        ops.append(keys, values, pos, torch.randn(b, h + 1, 2, d), v_new, new_pos, 0)
    with pytest.raises(ValueError, match="slot counts"):
        ops.append(keys, values, pos, k_new, v_new, new_pos[:, :1], 0)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_explain_optimized_tiny_models_every_site_rewritten_on_prefill_and_decode(arch):
    model = entropykv_fx.optimize(tiny_model(arch), budget=0.5)
    reports = explain(model, random_prompt(80))
    kinds = [r.name.split("(")[1].rstrip(")") for r in reports]
    assert "prefill" in kinds and "decode" in kinds
    layers = model.config.num_hidden_layers
    for report in reports:
        assert report.found == report.rewritten == layers, str(report)
        assert sorted(o.layer for o in report.outcomes) == list(range(layers))
    assert f"{layers} rewritten, 0 left alone" in str(reports[0])


def test_sites_without_an_entropykv_cache_are_left_alone_with_a_reason():
    model = tiny_model("llama")  # not optimized: transformers' own cache feeds SDPA
    (report,) = explain(model, random_prompt(16), use_cache=False)
    assert report.found == 3 and report.rewritten == 0
    assert all("do not come from an entropykv cache" in o.reason for o in report.outcomes)
    ep = torch.export.export(static_cache_attention(), (torch.randn(1, 5, 32), torch.arange(5)), strict=False)
    (report,) = explain(ep)
    assert report.found == 1 and report.rewritten == 0 and "left alone" in str(report)


def test_explain_of_a_graph_leaves_the_graph_unchanged():
    ep = torch.export.export(MathAttention(), tuple(torch.randn(1, 2, 6, 8) for _ in range(3)), strict=False)
    before = str(ep.graph_module.graph)
    explain(ep)
    assert str(ep.graph_module.graph) == before


class CachedAttentionWithMask(nn.Module):
    """Keys from an entropykv cache, but SDPA given an extra mask: the pass must refuse, not drop it."""

    def forward(self, q, k, v, pos, mask):
        empty = k[:, :, :0]
        keys, values, positions = ops.append(empty, empty, pos[:, :0], k, v, pos, 0)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)


def test_strict_backend_refuses_masks_it_cannot_keep_and_uncached_attention():
    q = k = v = torch.randn(1, 2, 4, 8)
    pos, mask = torch.arange(4)[None], torch.ones(4, 4, dtype=torch.bool)
    torch._dynamo.reset()
    # Dynamo wraps backend errors in its own exception type; the message names ours and the reason.
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="(?s)UnrewrittenAttentionError.*explicit attention mask"):
        torch.compile(CachedAttentionWithMask(), backend="entropykv")(q, k, v, pos, mask)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="do not come from an entropykv cache"):
        torch.compile(MathAttention(), backend="entropykv")(q, k, v)
    torch._dynamo.reset()


def test_graph_without_attention_compiles_and_runs_unchanged():
    backend = EntropyKVBackend()
    fn = torch.compile(lambda x: torch.relu(x) + 1, backend=backend)
    x = torch.randn(5)
    assert torch.equal(fn(x), torch.relu(x) + 1)
    assert backend.results[0].outcomes == [] and not backend.results[0].prefill


def test_prefill_graph_returns_scores_equal_to_the_score_op():
    """The scores the rewritten prefill graph hands back are exactly entropykv::score on the layer's inputs."""
    b, hq, hkv, n, d, w = 1, 4, 2, 12, 8, 5
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    pos = torch.arange(n)[None]
    received = []

    def layer(q, k, v, pos):
        empty = k[:, :, :0]
        keys, values, positions = ops.append(empty, empty, pos[:, :0], k, v, pos, 7)
        return F.scaled_dot_product_attention(q, keys, values, is_causal=True, enable_gqa=True)

    backend = EntropyKVBackend(RewriteSettings(score_window=w), on_stats=lambda layers, t: received.append((layers, t)))
    torch._dynamo.reset()
    out = torch.compile(layer, backend=backend, dynamic=False)(q, k, v, pos)
    torch._dynamo.reset()
    torch.testing.assert_close(out, ops.attention(q, k, v, pos, pos, d ** -0.5, 0))
    (layers, stats), = received
    assert layers == [7]
    for got, want in zip(stats, ops.score(q[:, :, -w:], k, pos[:, -w:], pos, d ** -0.5, 0)):
        torch.testing.assert_close(got, want)


def test_inductor_full_budget_reproduces_tokens_across_prompt_lengths_without_recompiling():
    ref, model = tiny_model("qwen2"), entropykv_fx.optimize(tiny_model("qwen2"), budget=1.0, inductor=True)
    for length in (40, 57, 81):
        ids = random_prompt(length, seed=length)
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False),
                           ref.generate(ids, max_new_tokens=8, do_sample=False))
    graphs = len(model.entropykv.graphs)
    model.generate(random_prompt(100, seed=3), max_new_tokens=8, do_sample=False)
    assert len(model.entropykv.graphs) == graphs, "a new prompt length must not recompile"
    prefill = model.entropykv.graphs[0]  # Inductor fuses the norms itself; the MLPs still run in token chunks
    assert prefill.prefill and (prefill.chunked_mlps, prefill.chunked_norms) == (model.config.num_hidden_layers, 0)


def test_mode_without_inductor_is_refused():
    with pytest.raises(ValueError, match="pass inductor=True"):
        entropykv_fx.optimize(tiny_model("llama"), mode="reduce-overhead")
