"""Budget arithmetic of the policies: sums, clamps, ties, the sink + window floor."""

from __future__ import annotations

import random

import pytest

from entropykv_fx import EntropyKVConfig, policies
from entropykv_fx.policies import POLICIES, budget_bounds, distribute


@pytest.mark.parametrize("seed", range(20))
def test_distribute_is_exact_bounded_and_monotone(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    weights = [rng.random() * rng.choice([1, 10]) for _ in range(n)]
    lo = rng.randint(0, 50)
    hi = lo + rng.randint(0, 400)
    total = rng.randint(n * lo, n * hi)
    out = distribute(weights, total, lo, hi)
    assert sum(out) == total and all(lo <= b <= hi for b in out)
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j]:
                assert out[i] >= out[j] - 1, "a larger weight never gets less (up to rounding)"


def test_distribute_clamps_and_infeasible_totals():
    assert distribute([100.0, 1.0, 1.0], 300, 50, 150) == [150, 75, 75]
    assert distribute([1.0, 1.0], 10_000, 0, 100) == [100, 100]  # total above n * hi: every layer at hi
    assert distribute([1.0, 1.0], 1, 5, 10) == [5, 5]
    assert distribute([], 10, 0, 5) == []


def test_distribute_ties_and_degenerate_weights():
    assert distribute([1.0, 1.0, 1.0], 10, 0, 10) == [4, 3, 3]  # the extra token goes to the earlier layer
    assert distribute([0.0, 0.0], 7, 0, 10) == [4, 3]
    assert distribute([-1.0, 3.0], 8, 1, 10) == [1, 7]


def test_budget_bounds_fraction_int_and_floor():
    assert budget_bounds(1000, EntropyKVConfig(budget=0.25)) == (36, 250, 1000)
    assert budget_bounds(1000, EntropyKVConfig(budget=100)) == (36, 100, 1000)
    assert budget_bounds(50, EntropyKVConfig(budget=100)) == (36, 50, 50)  # capped at the prompt
    with pytest.warns(UserWarning, match="below the 36 always-kept"):
        assert budget_bounds(100, EntropyKVConfig(budget=0.1)) == (36, 36, 100)
    with pytest.warns(UserWarning):
        assert budget_bounds(20, EntropyKVConfig(budget=0.5)) == (20, 20, 20)  # shorter than sinks + window


def test_entropy_policy_is_proportional_with_clamps():
    cfg = EntropyKVConfig(budget=0.25, min_layer_budget=0.5, max_layer_budget=2.0)
    budgets = POLICIES["entropy"].allocate([1.0, 2.0, 3.0, 10.0], 1000, cfg)
    assert sum(budgets) == 4 * 250
    assert budgets == sorted(budgets) and budgets[-1] == 500  # clamped at 2 x mean
    assert budgets[0] >= 125  # at least 0.5 x mean
    ratio = budgets[2] / budgets[1]
    assert ratio == pytest.approx(1.5, rel=0.02)  # unclamped layers stay proportional to entropy


def test_uniform_full_and_listing():
    cfg = EntropyKVConfig(budget=0.25)
    assert POLICIES["uniform"].allocate([5.0, 1.0, 3.0], 1000, cfg) == [250, 250, 250]
    assert POLICIES["full"].allocate([5.0, 1.0], 1000, cfg) == [1000, 1000]
    assert not POLICIES["full"].needs_scores and POLICIES["entropy"].needs_scores
    assert set(policies()) == {"entropy", "uniform", "pyramidkv", "streaming", "full"} and all(policies().values())


def test_pyramidkv_ramp():
    cfg = EntropyKVConfig(budget=0.25, window=8, sink_tokens=2)
    budgets = POLICIES["pyramidkv"].allocate([0.0] * 5, 2000, cfg)  # entropies are ignored
    assert sum(budgets) == 5 * 500
    assert budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 25 and budgets[0] == 975  # top: mean / 20, bottom: 2 * mean - mean / 20
    steps = [a - b for a, b in zip(budgets, budgets[1:])]
    assert max(steps) - min(steps) <= 1  # linear up to rounding
    assert all(b >= 10 for b in POLICIES["pyramidkv"].allocate([0.0] * 5, 100, EntropyKVConfig(budget=0.25, window=8, sink_tokens=2)))


def test_streaming_ranks_by_recency():
    cfg = EntropyKVConfig(policy="streaming", budget=0.5)
    assert POLICIES["streaming"].allocate([0.0] * 3, 400, cfg) == [200, 200, 200]
    assert not POLICIES["streaming"].needs_scores and POLICIES["streaming"].evicts
