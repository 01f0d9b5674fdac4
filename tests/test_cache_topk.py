"""cache_topk / cache_topk_layer (KVzip's allocation): one top-k over the whole cache's scores."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.composition import SCORER_TYPES, CacheTopK, Composition
from entropykv_fx.config import ConfigError, EntropyKVConfig
from entropykv_fx.headwise import HeadwiseLayer
from entropykv_fx.policies.cache_topk import cache_budgets, shared_scores
from entropykv_fx.scorers import SCORERS
from entropykv_fx.static import StaticCacheModel

pytestmark = pytest.mark.filterwarnings("ignore:entropykv. budget")


@settings(max_examples=60, deadline=None)
@given(heads=st.lists(st.integers(1, 3), min_size=1, max_size=4), length=st.integers(1, 12),
       mean=st.integers(1, 12), forced=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_budgets_are_the_counts_of_one_top_k_over_every_head(heads, length, mean, forced, seed):
    forced = min(forced, mean)  # the policy's mean budget is never below the always-kept tokens (budget_bounds)
    gen = torch.Generator().manual_seed(seed)
    ranked = [torch.rand(2, h, length, generator=gen) for h in heads]  # distinct scores: one top-k, no ties
    for r in ranked:
        r[..., :min(forced, length)] = float("inf")  # sinks / window: always kept
    budgets = cache_budgets(ranked, mean)
    total = sum(h * min(mean, length) for h in heads)
    flat = torch.cat([r.flatten(1) for r in ranked], 1)
    threshold = flat.topk(total, dim=-1).values[:, -1:]  # each row's k-th largest score
    for b, r in zip(budgets, ranked):
        assert b.shape == r.shape[:2] and b.dtype == torch.int64
        assert torch.equal(b, (r >= threshold[:, :, None]).sum(-1)), "a head keeps exactly its entries in the top-k"
        assert bool((b >= min(forced, length)).all()) and bool((b <= length).all())
    assert all(int(s) == total for s in sum(b.sum(1) for b in budgets))


def test_a_concentrated_head_keeps_fewer_tokens_than_a_spread_one():
    spread = torch.full((1, 1, 100), 0.01)
    concentrated = torch.cat([torch.full((1, 1, 5), 0.2), torch.full((1, 1, 95), 1e-4)], -1)
    budgets = cache_budgets([spread, concentrated], mean=50)
    assert budgets[0].item() == 95 and budgets[1].item() == 5


def test_scores_that_are_not_attention_probabilities_are_refused():
    for policy in ("cache_topk", "cache_topk_layer"):
        with pytest.raises(ConfigError, match=r"scorer='key_norm'.*\['window', 'last_query', 'reconstruct'\]"):
            EntropyKVConfig(policy=policy, scorer="key_norm")
    with pytest.raises(ValueError, match="cache_topk_layer"):
        StaticCacheModel(tiny_model(), policy="cache_topk_layer")


@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
def test_layer_granularity_keeps_each_layer_s_top_scores_and_the_cache_total(scorer):
    ids = random_prompt(90, seed=4)
    cfg = EntropyKVConfig(policy="cache_topk_layer", scorer=scorer, budget=30, window=6, sink_tokens=2)
    full, _ = scored_prefill(tiny_model(), ids, cfg)
    layer_scores = [SCORERS[scorer].layer_scores(layer, cfg)[0].clone() for layer in full.layers]  # pooled if pooling
    cache, report = compressed_copy(full, cfg)
    budgets = [r.budget for r in report.layers]
    assert sum(budgets) == 30 * len(budgets) and len(set(budgets)) > 1, "the layers share one total unevenly"
    forced = set(range(2)) | set(range(84, 90))
    cut = torch.cat([s[[p for p in range(90) if p not in forced]] for s in layer_scores]).sort(descending=True).values[
        sum(budgets) - len(forced) * len(budgets) - 1]
    for layer, scores, budget in zip(cache.layers, layer_scores, budgets):
        kept = set(layer.positions[0].tolist())
        assert len(kept) == budget == layer.keys.shape[2] and forced <= kept
        assert all(float(scores[p]) >= cut for p in kept - forced), "every kept token is above the cache's cut"


def test_head_granularity_holds_ragged_heads_summing_to_the_cache_total():
    model = entropykv_fx.optimize(tiny_model(), policy="cache_topk", scorer="reconstruct", budget=24, window=6,
                                  sink_tokens=2)
    with torch.no_grad():
        cache = model(random_prompt(80, seed=5), use_cache=True).past_key_values
    lengths = [n for layer in cache.layers for n in layer.head_lengths()]
    assert all(isinstance(layer, HeadwiseLayer) for layer in cache.layers)
    assert sum(lengths) == 24 * len(lengths) and len(set(lengths)) > 1 and min(lengths) >= 8
    rep = entropykv_fx.report(model)
    assert rep.bytes_after == cache.nbytes == sum(lengths) * 2 * model.config.head_dim * model.dtype.itemsize


@pytest.mark.parametrize("policy", ["cache_topk", "cache_topk_layer"])
def test_full_budget_generates_the_unmodified_tokens(policy):
    ids = random_prompt(70, seed=6)
    with torch.no_grad():
        reference = tiny_model().generate(ids, max_new_tokens=6, do_sample=False)
        model = entropykv_fx.optimize(tiny_model(), policy=policy, scorer="reconstruct", budget=1.0)
        assert torch.equal(model.generate(ids, max_new_tokens=6, do_sample=False), reference)


@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
def test_a_full_head_share_fills_kvzip_s_budgets_from_one_ranking_per_layer(scorer):
    """share 1: each head keeps as many tokens as KVzip's top-k gives it, chosen by its layer's ranking (the largest
    score any head gives a token), so a layer's heads hold nested prefixes of one ranking."""
    ids = random_prompt(90, seed=8)
    base = dict(budget=24, window=6, sink_tokens=2)
    shared = EntropyKVConfig(policy=Composition(CacheTopK(head_share=1.0), SCORER_TYPES[scorer]()), **base)
    full, _ = scored_prefill(tiny_model(), ids, shared)
    by_layer_ranking, _ = compressed_copy(full, shared)
    kvzip, _ = compressed_copy(full, EntropyKVConfig(policy=Composition(CacheTopK(), SCORER_TYPES[scorer]()), **base))
    forced = set(range(2)) | set(range(84, 90))
    for layer, same_budgets, stats in zip(by_layer_ranking.layers, kvzip.layers, full.layers):
        assert layer.head_lengths() == same_budgets.head_lengths()
        best = SCORERS[scorer].head_scores(stats, shared)[0].amax(0)
        order = [p for p in best.argsort(descending=True, stable=True).tolist() if p not in forced]
        for head in layer.heads:
            kept = set(head.positions[0].tolist())
            assert kept == forced | set(order[:len(kept) - len(forced)])
    assert any(len(set(layer.head_lengths())) > 1 for layer in kvzip.layers), "the heads' budgets differ"


def test_a_head_share_between_values_each_head_s_own_scores_and_its_layer_s():
    scores = torch.tensor([[[0.5, 0.1, 0.0, 0.2], [0.0, 0.3, 0.6, 0.1]]])  # [B, Hkv, S]: head 0 and head 1
    assert torch.equal(shared_scores(scores, 0.0), scores)
    assert torch.allclose(shared_scores(scores, 0.5), torch.tensor([[[0.5, 0.15, 0.3, 0.2], [0.25, 0.3, 0.6, 0.1]]]))
    # a budget of 2 per head: alone, head 1 drops token 0 (head 0's best); shared at 0.5 it keeps it over token 3
    keep = lambda s: [set(h.topk(2).indices.tolist()) for h in s[0]]  # noqa: E731
    assert keep(scores) == [{0, 3}, {1, 2}]
    assert keep(shared_scores(scores, 0.5)) == [{0, 2}, {1, 2}]
    assert keep(shared_scores(scores, 1.0)) == [{0, 2}, {0, 2}]


def test_a_head_share_changes_which_tokens_heads_keep_not_how_many():
    ids = random_prompt(90, seed=8)
    base = dict(budget=24, window=6, sink_tokens=2)
    full, _ = scored_prefill(tiny_model(), ids, EntropyKVConfig(policy="cache_topk", scorer="reconstruct", **base))
    kept, lengths = {}, {}
    for share in (0.0, 0.99, 1.0):  # the tiny model's attention is near uniform: its heads' scores differ by < 5%
        cache, report = compressed_copy(full, EntropyKVConfig(policy=Composition(CacheTopK(head_share=share)), **base))
        kept[share] = [[set(h.positions[0].tolist()) for h in layer.heads] for layer in cache.layers]
        lengths[share] = [layer.head_lengths() for layer in cache.layers]
        assert report.bytes_after == cache.nbytes
    assert lengths[0.0] == lengths[0.99] == lengths[1.0]
    assert kept[0.0] != kept[0.99] != kept[1.0]


@pytest.mark.parametrize("share", [-0.1, 1.5, float("nan"), "0.5", None])
def test_a_head_share_outside_0_1_is_refused(share):
    with pytest.raises(ConfigError, match=r"head_share=.*a number in \[0, 1\]"):
        EntropyKVConfig(policy="cache_topk", head_share=share)
    assert Composition.of(EntropyKVConfig(policy="cache_topk", head_share=0.25)).allocator == CacheTopK(head_share=0.25)


@pytest.mark.parametrize("policy", ["cache_topk_layer", "snapkv", "uniform"])
def test_a_head_share_with_another_policy_is_refused_and_dropped_when_the_policy_changes(policy):
    with pytest.raises(ConfigError, match=rf"head_share=0.5.*0 with policy '{policy}': only 'cache_topk'"):
        EntropyKVConfig(policy=policy, head_share=0.5)
    shared = EntropyKVConfig(policy="cache_topk", head_share=0.5)
    assert shared.replace(policy=policy).head_share == 0.0 and shared.replace(budget=0.1).head_share == 0.5
    with pytest.raises(ConfigError, match="head_share=0.5"):
        shared.replace(policy=policy, head_share=0.5)
    model = entropykv_fx.optimize(tiny_model(), shared)
    assert entropykv_fx.optimize(model, policy=policy).entropykv.config.head_share == 0.0

