"""Budget arithmetic of the head-wise policies: snapkv, adakv, entropy_head, matrix_entropy."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from test_headwise import HKV, W, prefilled
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import ConfigError, EntropyKVConfig, ops
from entropykv_fx.calibrate import calibrate
from entropykv_fx.cache import PrefillStats
from entropykv_fx.policies import POLICIES, adakv, entropy_head, matrix_entropy


def config(policy, **kw):
    return EntropyKVConfig(policy=policy, window=W, sink_tokens=2, **kw)


def test_snapkv_gives_every_head_the_mean_budget_and_ranks_by_its_own_scores():
    cache, _, _ = prefilled(n_layers=2, b=2, s=40)
    plan = POLICIES["snapkv"].plan_heads(cache.layers, 40, config("snapkv", budget=0.25))
    assert all(b.tolist() == [[10, 10], [10, 10]] for b in plan.budgets)
    assert all(not any(row) for row in plan.int8_heads)
    # SnapKV's defaults: max pooling with kernel 7 over each KV head's own window scores
    assert EntropyKVConfig().window == 32 and EntropyKVConfig().pool_kernel == 7 and EntropyKVConfig().pooling == "max"
    raw = cache.layers[0].stats.kv_scores
    pooled = torch.nn.functional.max_pool1d(raw.reshape(-1, 1, 40), 7, 1, 3).reshape(raw.shape)
    torch.testing.assert_close(plan.scores[0], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("seed", range(20))
def test_adakv_budgets_sum_to_the_layer_budget_with_a_floor_per_head(seed):
    rng = random.Random(seed)
    b, hkv, s = rng.randint(1, 3), rng.randint(1, 6), rng.randint(40, 300)
    mean = rng.randint(10, s)
    floor = rng.randint(1, mean)
    ranked = torch.rand(b, hkv, s, generator=torch.Generator().manual_seed(seed))
    budgets = adakv.head_budgets(ranked, mean, floor)
    assert budgets.shape == (b, hkv) and (budgets.sum(-1) == hkv * mean).all()
    assert (budgets >= floor).all() and (budgets <= s).all()
    # the same slots as the top (hkv x mean) of all (head, token) scores once each head's floor is granted
    beyond = ranked.sort(-1, descending=True).values[:, :, floor:].reshape(b, -1)
    threshold = beyond.topk(hkv * (mean - floor), -1).values[:, -1:]
    expected = floor + (ranked.sort(-1, descending=True).values[:, :, floor:] >= threshold[:, :, None]).sum(-1)
    assert torch.equal(budgets, expected)


def test_adakv_moves_budget_to_the_head_with_spread_attention():
    ranked = torch.zeros(1, 2, 100)
    ranked[0, 0, :10] = 1.0  # head 0 is concentrated on 10 tokens, head 1 spreads its mass evenly
    ranked[0, 1] = 0.05
    assert adakv.head_budgets(ranked, 30, 6).tolist() == [[10, 50]]


def test_adakv_plan_uses_the_paper_floor():
    cache, _, _ = prefilled(n_layers=2, b=1, s=400)
    plan = POLICIES["adakv"].plan_heads(cache.layers, 400, config("adakv", budget=0.5))
    for b in plan.budgets:
        assert b.sum().item() == HKV * 200 and b.min().item() >= math.ceil(0.2 * 200)


# --------------------------------------------------------------------------------------------- entropy_head
def test_grade_by_quantiles_and_by_thresholds():
    e = torch.tensor([[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]])
    low, mid, high = entropy_head.LOW, entropy_head.MIDDLE, entropy_head.HIGH
    assert entropy_head.grade(e, config("entropy_head")).tolist() == [[high, low, mid], [mid, high, low]]
    by_value = config("entropy_head", tier_by="entropy", tier_thresholds=(0.25, 0.6))
    assert entropy_head.grade(e, by_value).tolist() == [[high, low, mid], [mid, high, low]]
    everything_high = config("entropy_head", tier_thresholds=(0.0, 0.0))
    assert (entropy_head.grade(e, everything_high) == high).all()


@pytest.mark.parametrize("seed", range(20))
def test_fit_tokens_fills_the_bytes_target_without_passing_it(seed):
    rng = random.Random(seed)
    n = rng.randint(1, 40)
    weights = [rng.choice(entropy_head.TIER_TOKEN_WEIGHTS) for _ in range(n)]
    costs = [rng.choice([72, 256, 512]) for _ in range(n)]
    lo, hi = rng.randint(0, 20), rng.randint(40, 2000)
    target = rng.randint(lo * sum(costs), hi * sum(costs))
    counts = entropy_head.fit_tokens(weights, costs, lo, hi, target)
    spent = sum(c * k for c, k in zip(counts, costs))
    assert all(lo <= k <= hi for k in counts) and spent <= target
    assert spent > target - sum(costs) or all(k == hi for k in counts), "within one token per head of the target"
    for i in range(n):  # heavier weight, never fewer tokens
        for j in range(n):
            if weights[i] > weights[j]:
                assert counts[i] >= counts[j]


def test_fit_tokens_comes_within_one_token_per_head_of_the_target():
    weights, costs = [1.0, 0.75, 0.25], [512, 144, 512]
    counts = entropy_head.fit_tokens(weights, costs, 0, 10_000, 100_000)
    spent = sum(c * k for c, k in zip(counts, costs))
    assert spent <= 100_000 < spent + sum(costs)
    assert counts[0] > counts[1] > counts[2]


def test_entropy_head_plan_counts_int8_and_scales_in_the_bytes_target():
    cache, _, _ = prefilled(n_layers=3, b=1, s=300, seed=2)
    cfg = config("entropy_head", budget=0.25)
    plan = POLICIES["entropy_head"].plan_heads(cache.layers, 300, cfg)
    tiers = entropy_head.grade(entropy_head.head_entropies(cache.layers, 300), cfg)
    assert sorted(tiers.flatten().tolist()) == [0, 0, 1, 1, 2, 2], "a third of the six heads in each tier"
    assert plan.int8_heads == [[t == entropy_head.MIDDLE for t in row] for row in tiers.tolist()]
    d = 8
    cost = {False: 2 * d * 4, True: 2 * d + 8}  # fp32 token of K + V, int8 token + two fp32 scales
    spent = sum(int(b[0, h]) * cost[plan.int8_heads[i][h]] for i, b in enumerate(plan.budgets) for h in range(HKV))
    target = 0.25 * 300 * 3 * HKV * cost[False]
    assert target - 6 * cost[False] < spent <= target
    by_tier = {t: {int(plan.budgets[i][0, h]) for i, row in enumerate(tiers.tolist()) for h, tt in enumerate(row)
                   if tt == t} for t in range(3)}
    assert max(by_tier[0]) < min(by_tier[1]) < min(by_tier[2]), "high heads keep the most tokens, low the fewest"


def test_entropy_head_cropping_never_keeps_old_history():
    cache, _, _ = prefilled(n_layers=2, b=1, s=200, seed=3)
    cfg = config("entropy_head", budget=0.9, crop_history=50)
    plan = POLICIES["entropy_head"].plan_heads(cache.layers, 200, cfg)
    for layer, scores, budgets in zip(cache.layers, plan.scores, plan.budgets):
        assert budgets.max() <= 52  # the 2 sinks and the last 50 tokens are all that may be kept
        ranked = ops.selection_ranks(scores, layer.positions, 2, W)
        assert torch.isinf(ranked[0, :, 2:150]).all() and (ranked[0, :, 2:150] < 0).all()


@pytest.mark.parametrize("field,value,accepted", [
    ("tier_by", "rank", "one of"), ("tier_thresholds", (0.7, 0.2), "low <= high"),
    ("tier_thresholds", (0.2,), "two numbers"), ("crop_history", 3, "int >= window"),
    ("matrix_states", "value", "one of"), ("matrix_rank", 0, "int >= 1"), ("head_groups", 1.5, "int >= 1"),
])
def test_headwise_config_errors_name_the_field_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ConfigError, match=f"{field}={value!r}".replace("(", r"\(").replace(")", r"\)") + ".*" + accepted):
        EntropyKVConfig(policy="entropy_head", **{field: value})


def test_headwise_calibration_needs_a_head_wise_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text('{"layer_fractions": [0.5]}')  # what a layer-wise policy's calibration writes
    with pytest.raises(ConfigError, match="expected {'head_fractions': .*as entropykv_fx.calibrate writes"):
        EntropyKVConfig(policy="snapkv", budget_source="calibrated", calibration_file=str(path))
    path.write_text('{"head_fractions": [[0.5, 0.2]], "int8_heads": [[false]]}')  # ragged against each other
    with pytest.raises(ConfigError, match="head_fractions"):
        EntropyKVConfig(policy="snapkv", budget_source="calibrated", calibration_file=str(path))


@pytest.mark.parametrize("policy", ["matrix_entropy", "entropy_head"])
def test_calibration_stores_the_head_grouping_and_gives_static_head_budgets(tmp_path, policy):
    model = tiny_model("llama")
    samples = [random_prompt(80, seed=s) for s in range(3)]
    path = calibrate(model, samples, tmp_path / "cal.json", policy=policy, budget=0.5, window=8, sink_tokens=2)
    data = json.loads(path.read_text())
    fractions, int8 = data["head_fractions"], data["int8_heads"]
    assert len(fractions) == len(int8) == 3 and all(len(r) == len(i) == 2 for r, i in zip(fractions, int8))
    assert any(any(row) for row in int8) == (policy == "entropy_head"), "entropy_head's middle tier is int8"
    entropykv_fx.optimize(model, budget_source="calibrated", calibration_file=str(path))
    for length in (80, 120):
        with torch.no_grad():
            model(random_prompt(length, seed=9), use_cache=True)
        layers = entropykv_fx.report(model).layers
        assert [[h.slots for h in r.heads] for r in layers] == [[max(10, round(f * length)) for f in row]
                                                                 for row in fractions]
        assert [[h.storage == "int8" for h in r.heads] for r in layers] == int8


# --------------------------------------------------------------------------------------------- matrix_entropy
def test_truncated_matrix_entropy_of_known_spectra():
    d, n = 16, 64
    valid = torch.ones(1, n, dtype=torch.bool)
    spread = torch.eye(d).repeat(n // d, 1)  # every direction equally: spectrum 1/d each
    one_direction = torch.ones(n, d)  # all rows parallel: one eigenvalue 1
    states = torch.stack([spread, one_direction])[None]
    got = matrix_entropy.truncated_matrix_entropy(states, valid, rank=32)
    torch.testing.assert_close(got, torch.tensor([[1.0, 0.0]]), atol=1e-5, rtol=0)
    half = matrix_entropy.truncated_matrix_entropy(states, valid, rank=8)  # top 8 of 16 equal eigenvalues
    assert half[0, 0].item() == pytest.approx(8 * (1 / 16) * math.log(16) / math.log(16), abs=1e-5)
    masked = valid.clone()
    masked[0, :n // 2] = False  # pads (and their values) do not count
    junk = states.clone()
    junk[..., :n // 2, :] = torch.randn(2, n // 2, d)
    torch.testing.assert_close(matrix_entropy.truncated_matrix_entropy(junk, masked, 32), got, atol=1e-5, rtol=0)


def test_group_weights_split_by_rank():
    assert matrix_entropy.group_weights([0.3, 0.1, 0.9, 0.5], 2) == [0.5, 0.5, 1.5, 1.5]
    assert matrix_entropy.group_weights([0.3, 0.1, 0.9], 3) == [1.0, 0.5, 1.5]
    assert matrix_entropy.group_weights([0.3, 0.1], 1) == [1.0, 1.0]


def test_matrix_entropy_plan_tiers_layers_and_heads():
    cache, _, _ = prefilled(n_layers=4, b=1, s=200, seed=6)
    per_head = [[0.2, 0.8], [0.3, 0.9], [0.6, 0.1], [0.7, 0.4]]  # layer means 0.5, 0.6, 0.35, 0.55
    for layer, e in zip(cache.layers, per_head):
        layer.stats = PrefillStats(layer.stats.entropy, layer.stats.kv_scores, layer.stats.layer_scores,
                                   torch.tensor([e]).repeat_interleave(2, dim=1))  # [B, Hq]: 2 query heads per KV head
    plan = POLICIES["matrix_entropy"].plan_heads(cache.layers, 200, config("matrix_entropy", budget=0.25))
    budgets = [b[0].tolist() for b in plan.budgets]
    totals = [sum(b) for b in budgets]
    assert sum(totals) == 4 * HKV * 50
    assert totals[1] == totals[3] > totals[0] == totals[2], "high-entropy layers (1, 3) form the larger stage"
    assert totals[1] == 3 * totals[0]  # weights 1.5 : 0.5
    for b, e in zip(budgets, per_head):
        assert (b[0] > b[1]) == (e[0] > e[1]), "the higher-entropy head of each layer keeps more"


def test_truncated_matrix_entropy_is_the_same_in_chunks(monkeypatch):
    states, valid = torch.randn(2, 3, 100, 16), torch.rand(2, 100) > 0.3
    whole = matrix_entropy.truncated_matrix_entropy(states, valid, 8)
    monkeypatch.setattr(matrix_entropy, "CHUNK", 16)
    torch.testing.assert_close(matrix_entropy.truncated_matrix_entropy(states, valid, 8), whole, atol=1e-6, rtol=0)
