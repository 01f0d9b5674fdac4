"""Budget arithmetic of the policies: sums, clamps, ties, the sink + window floor."""

from __future__ import annotations

import math
import random
import warnings

import pytest

from entropykv_fx import EntropyKVConfig, policies
from entropykv_fx.policies import POLICIES, budget_bounds, distribute


# --------------------------------------------------------------------------------------------- distribute
@pytest.mark.parametrize("seed", range(40))
def test_distribute_is_exact_bounded_and_monotone(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    weights = [rng.choice([0.0, 1.0, rng.random(), rng.random() * 100, -rng.random()]) for _ in range(n)]
    lo = rng.randint(0, 50)
    hi = lo + rng.randint(0, 400)
    total = rng.randint(n * lo, n * hi)  # feasible
    out = distribute(weights, total, lo, hi)
    assert len(out) == n and all(isinstance(b, int) for b in out)
    assert sum(out) == total, "the sum is exact whenever it is feasible"
    assert all(lo <= b <= hi for b in out)
    w = [max(x, 0.0) for x in weights]  # negative weights count as zero
    for i in range(n):
        for j in range(n):
            if w[i] > w[j]:
                assert out[i] >= out[j], f"layer {i} (weight {w[i]}) got less than layer {j} (weight {w[j]})"
            if w[i] == w[j]:
                assert abs(out[i] - out[j]) <= 1 and (i > j or out[i] >= out[j]), "ties: extra to the earlier layer"
    assert distribute(list(weights), total, lo, hi) == out  # deterministic


def test_distribute_is_proportional_when_nothing_clamps():
    assert distribute([1.0, 2.0, 3.0], 600, 0, 600) == [100, 200, 300]
    assert distribute([3.0, 1.0], 100, 0, 100) == [75, 25]
    assert distribute([0.5, 0.25, 0.25], 8, 0, 8) == [4, 2, 2]
    out = distribute([1.0, 2.0, 4.0], 100, 0, 100)  # 14.29, 28.57, 57.14: largest remainders round up
    assert out == [14, 29, 57]


@pytest.mark.parametrize("n,total", [(1, 7), (3, 10), (4, 10), (5, 5), (5, 4), (7, 100), (6, 0)])
def test_distribute_equal_weights_differ_by_at_most_one_extra_to_earlier_layers(n, total):
    expected = [total // n + (i < total % n) for i in range(n)]
    assert distribute([2.5] * n, total, 0, total) == expected
    assert distribute([0.0] * n, total, 0, total) == expected  # all-zero weights: an equal split too


def test_distribute_clamps_to_lo_and_hi():
    assert distribute([100.0, 1.0, 1.0], 300, 50, 150) == [150, 75, 75]  # the heavy layer pinned at hi
    assert distribute([1.0, 1.0, 100.0], 300, 50, 250) == [50, 50, 200]  # the light layers pinned at lo
    out = distribute([1e-9, 1.0, 2.0, 1000.0], 400, 20, 200)
    assert out[0] == 20 and out[3] == 200 and sum(out) == 400 and out[1] <= out[2]


def test_distribute_infeasible_totals_go_to_the_nearest_feasible_one():
    assert distribute([1.0, 1.0], 10_000, 0, 100) == [100, 100]  # above n * hi
    assert distribute([1.0, 3.0], 1, 5, 10) == [5, 5]  # below n * lo
    assert distribute([1.0, 3.0], -4, 0, 10) == [0, 0]
    assert distribute([], 10, 0, 5) == []


def test_distribute_zero_and_negative_weights():
    assert distribute([0.0, 1.0], 10, 0, 10) == [0, 10]
    assert distribute([0.0, 1.0], 10, 2, 10) == [2, 8]  # a zero weight still gets the floor
    assert distribute([-1.0, 3.0], 8, 1, 10) == [1, 7]  # negative counts as zero
    assert distribute([-1.0, -2.0, -3.0], 9, 0, 9) == [3, 3, 3]  # all non-positive: an equal split


# --------------------------------------------------------------------------------------------- budget_bounds
def no_warning(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args)


def test_budget_bounds_fraction_and_int():
    assert no_warning(budget_bounds, 1000, EntropyKVConfig(budget=0.25)) == (36, 250, 1000)
    assert no_warning(budget_bounds, 1000, EntropyKVConfig(budget=1.0)) == (36, 1000, 1000)
    assert no_warning(budget_bounds, 999, EntropyKVConfig(budget=0.1)) == (36, 100, 999)  # rounded
    assert no_warning(budget_bounds, 1000, EntropyKVConfig(budget=100)) == (36, 100, 1000)
    assert no_warning(budget_bounds, 50, EntropyKVConfig(budget=100)) == (36, 50, 50)  # int capped at the prompt
    assert no_warning(budget_bounds, 1000, EntropyKVConfig(budget=36)) == (36, 36, 1000)  # exactly the floor
    assert no_warning(budget_bounds, 400, EntropyKVConfig(budget=0.5, window=8, sink_tokens=0)) == (8, 200, 400)


def test_budget_below_sinks_plus_window_warns_and_is_raised_to_it():
    with pytest.warns(UserWarning, match=r"budget 0\.1 gives 10 tokens for a 100-token prompt, below the 36"):
        assert budget_bounds(100, EntropyKVConfig(budget=0.1)) == (36, 36, 100)
    with pytest.warns(UserWarning, match="below the 12 always-kept"):
        assert budget_bounds(1000, EntropyKVConfig(budget=0.01, window=10, sink_tokens=2)) == (12, 12, 1000)


def test_prompt_shorter_than_the_window():
    with pytest.warns(UserWarning, match="20-token prompt"):
        assert budget_bounds(20, EntropyKVConfig(budget=0.5)) == (20, 20, 20)  # floor and mean are the prompt
    assert no_warning(budget_bounds, 20, EntropyKVConfig(budget=1.0)) == (20, 20, 20)
    assert no_warning(budget_bounds, 20, EntropyKVConfig(budget=64)) == (20, 20, 20)
    assert no_warning(budget_bounds, 1, EntropyKVConfig(budget=1.0)) == (1, 1, 1)
    for name in ("entropy", "uniform", "full"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert POLICIES[name].allocate([1.0, 5.0, 2.0], 20, EntropyKVConfig(budget=0.5)) == [20, 20, 20]


# --------------------------------------------------------------------------------------------- policies
def entropy_bounds(n_tokens: int, cfg: EntropyKVConfig) -> tuple[int, int, int]:
    floor, mean, ceiling = budget_bounds(n_tokens, cfg)
    lo = max(floor, math.ceil(cfg.min_layer_budget * mean))
    return lo, mean, max(lo, min(ceiling, math.floor(cfg.max_layer_budget * mean)))


@pytest.mark.parametrize("seed", range(30))
def test_entropy_policy_sum_clamps_and_order(seed):
    rng = random.Random(seed)
    n_layers = rng.randint(1, 32)
    n_tokens = rng.randint(40, 5000)
    cfg = EntropyKVConfig(budget=rng.choice([0.1, 0.25, 0.5, 0.9, 40, 300]), window=rng.randint(1, 32),
                          sink_tokens=rng.randint(0, 8), min_layer_budget=rng.choice([0.0, 0.25, 0.5, 1.0]),
                          max_layer_budget=rng.choice([1.0, 1.5, 2.0, 4.0, 100.0]))
    entropies = [rng.choice([0.0, rng.random() * 5, 2.0]) for _ in range(n_layers)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small budgets raised to the floor warn
        budgets = POLICIES["entropy"].allocate(entropies, n_tokens, cfg)
        lo, mean, hi = entropy_bounds(n_tokens, cfg)
    assert sum(budgets) == n_layers * mean, "the total kept equals layers x mean budget"
    assert all(lo <= b <= hi for b in budgets), (lo, hi, budgets)
    for i in range(n_layers):
        for j in range(n_layers):
            if entropies[i] > entropies[j]:
                assert budgets[i] >= budgets[j]


def test_entropy_policy_is_proportional_inside_the_clamps():
    cfg = EntropyKVConfig(budget=0.25, min_layer_budget=0.5, max_layer_budget=2.0)
    budgets = POLICIES["entropy"].allocate([1.0, 2.0, 3.0, 10.0], 1000, cfg)
    assert sum(budgets) == 4 * 250
    assert budgets[3] == 500  # clamped at 2 x mean
    assert budgets[0] == 125  # 0.5 x mean: would get 500 / 6 = 83 unclamped
    assert budgets[1:3] == [150, 225]  # the rest, 375, split 2:3
    cfg = EntropyKVConfig(budget=0.5, min_layer_budget=0.0, max_layer_budget=4.0)
    assert POLICIES["entropy"].allocate([1.0, 3.0], 400, cfg) == [100, 300]


def test_entropy_policy_clamp_multiples():
    entropies = [0.1, 1.0, 5.0, 9.0]
    pinned = EntropyKVConfig(budget=0.25, min_layer_budget=1.0)  # lo = mean: nothing can differ
    assert POLICIES["entropy"].allocate(entropies, 1000, pinned) == [250] * 4
    capped = EntropyKVConfig(budget=0.25, max_layer_budget=1.0)  # hi = mean
    assert POLICIES["entropy"].allocate(entropies, 1000, capped) == [250] * 4
    loose = EntropyKVConfig(budget=0.25, min_layer_budget=0.0, max_layer_budget=100.0)
    budgets = POLICIES["entropy"].allocate(entropies, 1000, loose)
    assert budgets[0] == 36 and budgets[-1] <= 1000 and sum(budgets) == 1000  # the floor is sinks + window
    capped_by_prompt = POLICIES["entropy"].allocate([0.0, 0.0, 0.0, 1.0], 1000, loose)
    assert capped_by_prompt == [36, 36, 36, 892]  # never above the prompt length (1000)


def test_entropy_policy_equal_entropies_give_the_mean():
    for n_layers in (1, 2, 7):
        assert POLICIES["entropy"].allocate([1.7] * n_layers, 800, EntropyKVConfig()) == [200] * n_layers
        assert POLICIES["entropy"].allocate([0.0] * n_layers, 800, EntropyKVConfig()) == [200] * n_layers


@pytest.mark.parametrize("seed", range(10))
def test_entropy_focus_is_entropy_on_the_distance_from_uniform(seed):
    rng = random.Random(seed)
    n_tokens = rng.randint(100, 5000)
    cfg = EntropyKVConfig(budget=rng.choice([0.1, 0.25, 0.5]), min_layer_budget=rng.choice([0.0, 0.25]),
                          max_layer_budget=rng.choice([2.0, 4.0, 100.0]))
    entropies = [rng.random() * math.log(n_tokens) for _ in range(rng.randint(1, 32))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        budgets = POLICIES["entropy_focus"].allocate(entropies, n_tokens, cfg)
        gaps = POLICIES["entropy"].allocate([math.log(n_tokens) - h for h in entropies], n_tokens, cfg)
    assert budgets == gaps  # the same shares and clamps, weighted by log(n) - H
    for i, hi in enumerate(entropies):  # so a more focused layer (lower entropy) never keeps fewer tokens
        assert all(budgets[i] >= budgets[j] for j, hj in enumerate(entropies) if hi < hj)


def test_uniform_policy_is_equal_and_ignores_entropy():
    cfg = EntropyKVConfig(budget=0.25)
    assert POLICIES["uniform"].allocate([5.0, 1.0, 3.0], 1000, cfg) == [250, 250, 250]
    assert POLICIES["uniform"].allocate([0.0] * 5, 333, EntropyKVConfig(budget=100)) == [100] * 5
    assert POLICIES["uniform"].allocate([], 1000, cfg) == []
    with pytest.warns(UserWarning):
        assert POLICIES["uniform"].allocate([1.0, 2.0], 100, EntropyKVConfig(budget=0.1)) == [36, 36]


def test_full_policy_keeps_every_token():
    assert POLICIES["full"].allocate([5.0, 1.0], 1000, EntropyKVConfig(budget=0.25)) == [1000, 1000]
    assert POLICIES["full"].allocate([math.nan] * 3, 17, EntropyKVConfig(budget=40)) == [17, 17, 17]
    assert not POLICIES["full"].needs_scores


def test_policies_lists_all_three():
    listed = policies()
    assert {"entropy", "uniform", "full"} <= set(listed)
    assert set(listed) == set(POLICIES) and all(isinstance(s, str) and s for s in listed.values())
    assert all(POLICIES[name].name == name for name in listed)
    assert POLICIES["entropy"].needs_scores and POLICIES["uniform"].needs_scores


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
