"""Policies as typed compositions (`entropykv_fx.composition`): allocator x scorer x granularity."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.composition import (
    CacheTopK,
    Composition,
    HeadEntropyTiers,
    HeadTopK,
    KeepAll,
    KeyNorm,
    LastQuery,
    LayerEntropy,
    MatrixEntropyGroups,
    Pyramid,
    Recency,
    Reconstruct,
    Uniform,
    Window,
)
from entropykv_fx.config import ConfigError, EntropyKVConfig
from entropykv_fx.policies import POLICIES


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_registered_policy_is_a_composition_with_the_same_config(name):
    composition = Composition.named(name)
    assert composition.policy == name
    assert composition.config() == EntropyKVConfig(policy=name)
    assert Composition.of(EntropyKVConfig(policy=name)) == composition


def test_a_composition_sets_policy_scorer_and_its_parameters():
    composition = Composition(LayerEntropy(max_layer_budget=2.0), LastQuery())
    config = EntropyKVConfig(policy=composition, budget=0.1, window=16)
    assert (config.policy, config.scorer, config.max_layer_budget, config.budget, config.window) == \
        ("entropy", "last_query", 2.0, 0.1, 16)
    assert Composition.of(config) == composition
    again = config.replace(policy=Composition(Uniform(), Window(pooling="avg", pool_kernel=3), "head"))
    assert (again.policy, again.scorer, again.pooling, again.pool_kernel, again.max_layer_budget) == \
        ("snapkv", "window", "avg", 3, 4.0)  # the earlier composition's max_layer_budget does not carry over
    assert again.replace(budget=0.5).policy == "snapkv"


def test_granularity_defaults_and_choices():
    assert Composition(Uniform()).policy == "snapkv" and Composition(Uniform(), granularity="layer").policy == "uniform"
    assert Composition(CacheTopK()).policy == "cache_topk"
    assert Composition(CacheTopK(), Reconstruct(), "layer").policy == "cache_topk_layer"
    assert Composition(Pyramid()).granularity == "layer" and Composition(HeadTopK()).granularity == "head"
    assert Composition(LayerEntropy(), granularity="head").policy == "entropy_per_head"
    assert Composition(Pyramid(), LastQuery(), "head").config().policy == "pyramidkv_per_head"
    assert Composition(Recency()).config().policy == "streaming"


@pytest.mark.parametrize("build, match", [
    (lambda: Composition(HeadTopK(), granularity="layer"),
     r"granularity='layer' is invalid for HeadTopK: expected one of \['head'\]"),
    (lambda: Composition(Recency(), granularity="head"), r"expected one of \['layer'\]"),
    (lambda: Composition("entropy"), r"allocator='entropy' is invalid: expected one of"),
    (lambda: Composition(Uniform(), "window"), r"scorer='window' is invalid: expected None or one of"),
    (lambda: Composition(Recency(), Window()), r"ranks no tokens: expected None"),
    (lambda: Composition(KeepAll(), LastQuery()), r"ranks no tokens"),
    (lambda: Composition(CacheTopK(), KeyNorm()).config(), r"scorer='key_norm' is invalid: expected one of "),
    (lambda: EntropyKVConfig(policy=Composition(Uniform(), Window(pool_kernel=3)), pool_kernel=5),
     r"pool_kernel=5 is invalid: expected 3 as the composition"),
    (lambda: Composition(MatrixEntropyGroups(matrix_rank=0)).config(), r"matrix_rank=0 is invalid"),
    (lambda: Composition.named("tova"), r"named\('tova'\): expected one of"),
])
def test_bad_compositions_are_refused_with_what_is_accepted(build, match):
    with pytest.raises(ConfigError, match=match):
        build()


_ALLOCATORS = st.one_of(
    st.builds(Uniform), st.builds(Pyramid), st.builds(HeadTopK), st.builds(CacheTopK),
    st.builds(LayerEntropy, min_layer_budget=st.floats(0.05, 1.0), max_layer_budget=st.floats(1.0, 8.0)),
    st.builds(HeadEntropyTiers, tier_by=st.sampled_from(["quantile", "entropy"]),
              tier_thresholds=st.tuples(st.floats(0, 0.5), st.floats(0.5, 1)),
              crop_history=st.none() | st.integers(64, 4096)),
    st.builds(MatrixEntropyGroups, matrix_states=st.sampled_from(["query", "key"]), matrix_rank=st.integers(1, 64),
              head_groups=st.integers(1, 4), layer_groups=st.integers(1, 4)))
_SCORERS = st.one_of(st.none(), st.builds(LastQuery), st.builds(KeyNorm),
                     st.builds(Window, pooling=st.sampled_from(["max", "avg", "none"]), pool_kernel=st.integers(0, 4).map(lambda k: 2 * k + 1)),
                     st.builds(Reconstruct, repeat_prompt=st.lists(st.integers(0, 1000), max_size=4).map(tuple)))


@settings(max_examples=60, deadline=None)
@given(allocator=_ALLOCATORS, scorer=_SCORERS, data=st.data())
def test_any_valid_composition_round_trips_through_its_config(allocator, scorer, data):
    granularity = data.draw(st.sampled_from(sorted(allocator.policies)))
    composition = Composition(allocator, scorer, granularity)
    if isinstance(allocator, CacheTopK) and isinstance(scorer, KeyNorm):
        with pytest.raises(ConfigError, match="key_norm"):
            composition.config()
        return
    config = composition.config(budget=0.2)
    assert config.policy == composition.policy and config.budget == 0.2
    back = Composition.of(config)
    assert back.allocator == allocator and back.granularity == granularity
    assert back.scorer == (scorer if scorer is not None else Composition.named(config.policy).scorer)


def test_optimize_takes_a_composition_and_decodes_as_the_named_policy():
    prompt = random_prompt(96)
    outs = []
    for kwargs in (dict(policy=Composition(LayerEntropy(max_layer_budget=2.0), LastQuery())),
                   dict(policy="entropy", scorer="last_query", max_layer_budget=2.0)):
        model = tiny_model()
        entropykv_fx.optimize(model, budget=0.5, **kwargs)
        with torch.no_grad():
            outs.append(model.generate(prompt, max_new_tokens=6, do_sample=False))
        assert entropykv_fx.optimized(model).config.policy == "entropy"
    assert torch.equal(*outs)
    model = tiny_model()
    entropykv_fx.optimize(model, Composition(Uniform(), Window(pool_kernel=3), "layer"), budget=0.5)
    assert (entropykv_fx.optimized(model).config.policy, entropykv_fx.optimized(model).config.pool_kernel) == ("uniform", 3)
