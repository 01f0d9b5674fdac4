"""Token scorers (`entropykv_fx.scorers`) composed with policies, and graphs that survive new prompts."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.config import ConfigError, EntropyKVConfig
from entropykv_fx.scorers import SCORERS


def test_unknown_scorer_is_refused():
    with pytest.raises(ConfigError, match="scorer='tova'.*one of"):
        EntropyKVConfig(scorer="tova")


def test_last_query_scores_come_from_the_last_query_and_entropies_from_the_window():
    model, ids = tiny_model(), random_prompt(90)
    last, _ = scored_prefill(model, ids, EntropyKVConfig(scorer="last_query"))
    one_query, _ = scored_prefill(model, ids, EntropyKVConfig(scorer="window", window=1))
    window, _ = scored_prefill(model, ids, EntropyKVConfig(scorer="window"))
    for a, b, c in zip(last.layers, one_query.layers, window.layers):
        torch.testing.assert_close(a.stats.kv_scores, b.stats.kv_scores)
        torch.testing.assert_close(a.stats.layer_scores, b.stats.layer_scores)
        torch.testing.assert_close(a.stats.entropy, c.stats.entropy)
        assert not torch.allclose(a.stats.layer_scores, c.stats.layer_scores)


def test_key_norm_keeps_the_smallest_keys_besides_sinks_and_window():
    model, ids = tiny_model(), random_prompt(100)
    cfg = EntropyKVConfig(policy="uniform", scorer="key_norm", budget=50, window=8, sink_tokens=2)
    full, _ = scored_prefill(model, ids, cfg)
    norms = [layer.keys.float().norm(dim=-1).sum(1)[0] for layer in full.layers]  # [S] per layer
    cache, _ = compressed_copy(full, cfg)
    for layer, norm in zip(cache.layers, norms):
        kept = set(layer.positions[0].tolist())
        forced = set(range(2)) | set(range(92, 100))
        chosen = sorted(set(range(2, 92)), key=lambda p: (-(-norm[p]).item(), p))[:50 - len(forced)]
        assert kept == forced | set(chosen)


@pytest.mark.parametrize("scorer", sorted(SCORERS))
@pytest.mark.parametrize("policy", ["uniform", "entropy", "snapkv", "adakv"])
def test_every_scorer_composes_with_every_ranking_policy(policy, scorer):
    ids = random_prompt(120)
    reference = tiny_model().generate(ids, max_new_tokens=4, do_sample=False)
    model = entropykv_fx.optimize(tiny_model(), policy=policy, scorer=scorer, budget=1.0)
    torch.testing.assert_close(model.generate(ids, max_new_tokens=4, do_sample=False), reference, rtol=0, atol=0)
    entropykv_fx.optimize(model, policy=policy, scorer=scorer, budget=0.5)
    model.generate(ids, max_new_tokens=4, do_sample=False)
    assert entropykv_fx.report(model).kept_fraction == pytest.approx(0.5)  # bytes measured from the tensors


def test_new_layer_lengths_reuse_the_compiled_graphs():
    """Layers whose kept lengths happen to be equal must not get equality guards (duck sizing): a later prompt
    whose layers keep other lengths would recompile every graph."""
    model = entropykv_fx.optimize(tiny_model(), policy="uniform", budget=0.5, window=8)  # every layer keeps the same length
    model.generate(random_prompt(96, seed=1), max_new_tokens=3, do_sample=False)
    entropykv_fx.optimize(model, policy="pyramidkv", budget=0.5, window=8)  # same graphs; now every layer keeps another length
    torch._dynamo.utils.counters.clear()
    for length, seed in ((83, 2), (121, 4)):
        model.generate(random_prompt(length, seed=seed), max_new_tokens=3, do_sample=False)
        assert len({entropykv_fx.report(model).layers[i].slots_after for i in range(3)}) == 3
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 0
