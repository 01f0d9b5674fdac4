"""The compressed cache built by hand, then compressed: bytes, positions, appends, pooling, reports."""

from __future__ import annotations

import json
import math

import pytest
import torch
from tiny_models import DEVICE

from entropykv_fx import ConfigError, EntropyKVCache, EntropyKVConfig, ops
from entropykv_fx.cache import PrefillStats
from entropykv_fx.compress import compress_cache, layer_budgets, uncompressed_report
from entropykv_fx.policies import pool_scores
from entropykv_fx.policies import POLICIES

HQ, HKV, D, W = 4, 2, 8, 4  # query heads, kv heads, head_dim, observation window of the scoring


def left_padded(b: int, s: int, pads: list[int]) -> torch.Tensor:
    rows = [[-1] * p + list(range(s - p)) for p in pads]
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


class Prefilled:
    """A cache filled the way the model integration fills it: begin_step, then update + score per layer."""

    def __init__(self, n_layers=3, b=2, s=64, dtype=torch.float16, pads=None, seed=0):
        torch.manual_seed(seed)
        self.s, self.dtype = s, dtype
        self.pos = left_padded(b, s, pads or [0] * b)
        self.cache = EntropyKVCache(n_layers)
        self.cache.begin_step(self.pos)
        self.keys, self.values, self.entropy = [], [], []
        for i in range(n_layers):
            k = torch.randn(b, HKV, s, D, device=DEVICE).to(dtype)
            v = torch.randn(b, HKV, s, D, device=DEVICE).to(dtype)
            out_k, out_v = self.cache.update(k, v, i)
            assert torch.equal(out_k, k) and torch.equal(out_v, v)
            # Query scale differs per layer so that layers differ in entropy (0 -> uniform attention).
            q = (torch.randn(b, HQ, W, D, device=DEVICE) * (3.0 * i)).to(dtype)
            stats = PrefillStats(*ops.score(q, k, self.pos[:, -W:], self.pos, D ** -0.5, 0))
            self.cache.layers[i].stats = stats
            self.keys.append(k)
            self.values.append(v)
            self.entropy.append(float(stats.entropy.mean()))

    def n_valid(self) -> list[int]:
        return (self.pos >= 0).sum(-1).tolist()


def kv_bytes(b: int, slots: int, dtype: torch.dtype) -> int:
    return 2 * b * HKV * slots * D * torch.empty(0, dtype=dtype).element_size()


def check_kept_slots(pre: Prefilled, sinks: int, window: int) -> None:
    """Every layer's slots hold original tokens, sorted by position, sinks and last window included, no pads; a
    row that keeps fewer slots than the layer holds ends in empty ones (-1)."""
    for i, layer in enumerate(pre.cache.layers):
        for bi, (row, n) in enumerate(zip(layer.positions.tolist(), pre.n_valid())):
            empty = len(row) - len([p for p in row if p >= 0])
            assert row[len(row) - empty:] == [-1] * empty, "empty slots only at the end"
            row = row[:len(row) - empty]
            assert row == sorted(set(row)), "kept slots stay in temporal order, each once"
            assert all(0 <= p < n for p in row), "only valid positions of the row (no pads when enough tokens)"
            assert set(range(min(sinks, n))) <= set(row) and set(range(n - window, n)) <= set(row)
            pad = pre.s - n
            for j, p in enumerate(row):  # the slot holds the original key / value of that position
                assert torch.equal(layer.keys[bi, :, j], pre.keys[i][bi, :, pad + p])
                assert torch.equal(layer.values[bi, :, j], pre.values[i][bi, :, pad + p])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_entropy_compression_bytes_positions_and_report(dtype):
    pre = Prefilled(n_layers=3, b=1, s=64, dtype=dtype, seed=1)
    cache = pre.cache
    before = cache.nbytes
    assert before == 3 * kv_bytes(1, 64, dtype)
    cfg = EntropyKVConfig(policy="entropy", budget=0.25, window=4, sink_tokens=2, min_layer_budget=0.25)
    report = compress_cache(cache, cfg)
    budgets = [r.budget for r in report.layers]
    assert sum(budgets) == 3 * 16 and len(set(budgets)) > 1, budgets  # layers differ; total = layers x mean
    assert budgets.index(max(budgets)) == pre.entropy.index(max(pre.entropy))  # widest attention keeps most
    assert cache.physical_lengths() == budgets == [r.slots_after for r in report.layers]
    assert [r.slots_before for r in report.layers] == [64] * 3
    assert [r.entropy for r in report.layers] == pytest.approx(pre.entropy)
    for r, layer in zip(report.layers, cache.layers):
        assert r.bytes_before == kv_bytes(1, 64, dtype) and r.bytes_after == layer.nbytes == kv_bytes(1, r.budget, dtype)
        assert layer.keys.shape == (1, HKV, r.budget, D) and layer.keys.dtype == dtype
        assert layer.index_nbytes == r.budget * 8
        assert layer.stats is None  # the scores are dropped once used
    assert cache.nbytes == report.bytes_after == kv_bytes(1, sum(budgets), dtype) == before // 4
    assert report.bytes_before == before and report.kept_fraction == pytest.approx(0.25)
    assert report.prompt_tokens == 64 and report.policy == "entropy"
    text = str(report)
    assert "25.0% kept" in text and len(text.splitlines()) == 2 + 3
    check_kept_slots(pre, sinks=2, window=4)
    assert cache.get_seq_length() == 64 and cache.next_positions.tolist() == [64]  # logical length


def test_uniform_compression_shrinks_every_layer_alike():
    pre = Prefilled(n_layers=4, b=1, s=48, dtype=torch.float32, seed=2)
    before = pre.cache.nbytes
    report = compress_cache(pre.cache, EntropyKVConfig(policy="uniform", budget=12, window=4, sink_tokens=2))
    assert pre.cache.physical_lengths() == [12] * 4 == [r.budget for r in report.layers]
    assert pre.cache.nbytes == before * 12 // 48 == 4 * kv_bytes(1, 12, torch.float32)
    check_kept_slots(pre, sinks=2, window=4)


def test_padded_batch_rows_are_compressed_on_their_own_and_continue():
    """Rows of 40, 30 and 18 tokens at 25%: each keeps a quarter of its own length (at least sinks + window),
    shorter rows end in empty slots, no pad is kept."""
    pre = Prefilled(n_layers=2, b=3, s=40, dtype=torch.float16, pads=[0, 10, 22], seed=3)
    assert pre.cache.next_positions.tolist() == [40, 30, 18]
    report = compress_cache(pre.cache, EntropyKVConfig(policy="uniform", budget=0.25, window=4, sink_tokens=2))
    assert [row.prompt_tokens for row in report.rows] == [40, 30, 18]
    assert [[r.budget for r in row.layers] for row in report.rows] == [[10, 10], [8, 8], [6, 6]]
    assert report.prompt_tokens == 40 and [r.budget for r in report.layers] == [10, 10]
    assert [(layer.positions >= 0).sum(-1).tolist() for layer in pre.cache.layers] == [[10, 8, 6]] * 2
    assert pre.cache.physical_lengths() == [10, 10] and pre.cache.nbytes == 2 * kv_bytes(3, 10, torch.float16)
    check_kept_slots(pre, sinks=2, window=4)  # per row: its own sinks and its own last window
    assert pre.cache.get_seq_length() == 40 and pre.cache.next_positions.tolist() == [40, 30, 18]


def test_short_row_fills_with_pads_only_past_its_valid_tokens():
    pre = Prefilled(n_layers=1, b=2, s=40, dtype=torch.float32, pads=[0, 35], seed=4)  # row 1: 5 tokens
    compress_cache(pre.cache, EntropyKVConfig(policy="uniform", budget=10, window=4, sink_tokens=2))
    row = pre.cache.layers[0].positions[1].tolist()
    assert sorted(p for p in row if p >= 0) == [0, 1, 2, 3, 4] and row.count(-1) == 5


def test_decode_after_compression_appends_and_attends_the_kept_tokens():
    pre = Prefilled(n_layers=2, b=2, s=32, dtype=torch.float32, pads=[0, 7], seed=5)
    cache = pre.cache
    compress_cache(cache, EntropyKVConfig(policy="entropy", budget=0.5, window=4, sink_tokens=1))
    lengths = cache.physical_lengths()
    step = cache.next_positions[:, None].clone()
    assert step.tolist() == [[32], [25]]
    cache.begin_step(step)
    new_k = [torch.randn(2, HKV, 1, D, device=DEVICE) for _ in range(2)]
    new_v = [torch.randn(2, HKV, 1, D, device=DEVICE) for _ in range(2)]
    q = torch.randn(2, HQ, 1, D, device=DEVICE)
    for i, layer in enumerate(cache.layers):
        kept = layer.positions.clone()
        keys, values = cache.update(new_k[i], new_v[i], i)
        assert keys.shape[2] == lengths[i] + 1 and layer.get_seq_length() == lengths[i] + 1
        assert torch.equal(layer.positions[:, :-1], kept) and layer.positions[:, -1].tolist() == [32, 25]
        assert torch.equal(keys[:, :, -1:], new_k[i]) and torch.equal(values[:, :, -1:], new_v[i])
        out = ops.attention(q, keys, values, step, layer.positions, D ** -0.5, 0)
        for bi in range(2):  # float64 reference over the original tokens this layer kept, plus the new one
            pad = 32 - pre.n_valid()[bi]
            slots = [pad + p for p in kept[bi].tolist() if p >= 0]
            k_ref = torch.cat([pre.keys[i][bi][:, slots], new_k[i][bi]], 1).double()
            v_ref = torch.cat([pre.values[i][bi][:, slots], new_v[i][bi]], 1).double()
            k_ref, v_ref = k_ref.repeat_interleave(HQ // HKV, 0), v_ref.repeat_interleave(HQ // HKV, 0)
            p = torch.softmax(q[bi].double() @ k_ref.transpose(-1, -2) * D ** -0.5, -1)
            torch.testing.assert_close(out[bi].double(), p @ v_ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 33 and cache.next_positions.tolist() == [33, 26]
    assert cache.nbytes == sum(kv_bytes(2, n + 1, torch.float32) for n in lengths)


def test_no_eviction_when_the_budget_covers_the_prompt():
    for cfg in (EntropyKVConfig(policy="full"), EntropyKVConfig(policy="uniform", budget=1.0),
                EntropyKVConfig(policy="entropy", budget=500)):
        pre = Prefilled(n_layers=2, b=2, s=24, dtype=torch.float16, seed=6)
        keys = [layer.keys for layer in pre.cache.layers]
        before = pre.cache.nbytes
        report = compress_cache(pre.cache, cfg)
        assert [r.budget for r in report.layers] == [24, 24] and pre.cache.physical_lengths() == [24, 24]
        assert pre.cache.nbytes == before == report.bytes_after and report.kept_fraction == 1.0
        assert all(layer.keys is k for layer, k in zip(pre.cache.layers, keys))  # left untouched, not copied


def test_uncompressed_report():
    pre = Prefilled(n_layers=3, b=2, s=20, dtype=torch.float32, pads=[0, 6], seed=7)
    report = uncompressed_report(pre.cache, EntropyKVConfig(policy="full"))
    assert report.policy == "full" and report.prompt_tokens == 20 and len(report.layers) == 3
    for i, r in enumerate(report.layers):
        assert (r.layer, r.budget, r.slots_before, r.slots_after) == (i, 20, 20, 20) and math.isnan(r.entropy)
        assert r.bytes_before == r.bytes_after == kv_bytes(2, 20, torch.float32)
    assert report.bytes_after == pre.cache.nbytes and report.kept_fraction == 1.0 and "100.0% kept" in str(report)


def test_layer_budgets_dynamic_and_calibrated(tmp_path):
    cfg = EntropyKVConfig(policy="entropy", budget=0.25, window=4, sink_tokens=2)
    entropies = [0.5, 2.0, 1.0]
    assert layer_budgets(entropies, 200, cfg) == POLICIES["entropy"].allocate(entropies, 200, cfg)
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"layer_fractions": [0.5, 0.1, 1.0, 0.01]}))
    cal = cfg.replace(budget_source="calibrated", calibration_file=str(path))
    # round(f * n), at least sinks + window (6), at most the prompt; the entropies are not used
    assert layer_budgets([9.0, 0.0, 0.0, 0.0], 200, cal) == [100, 20, 200, 6]
    assert layer_budgets([0.0] * 4, 3, cal) == [3, 3, 3, 3]  # a 3-token prompt: the floor is the whole prompt
    with pytest.raises(ConfigError, match="3 numbers in"):
        layer_budgets([0.0] * 3, 200, cal)  # the file is for a 4-layer model


def test_compress_with_calibrated_budgets(tmp_path):
    path = tmp_path / "calibration.json"
    path.write_text(json.dumps({"layer_fractions": [0.25, 0.5, 1.0]}))
    cfg = EntropyKVConfig(budget_source="calibrated", calibration_file=str(path), window=4, sink_tokens=2)
    pre = Prefilled(n_layers=3, b=2, s=40, dtype=torch.bfloat16, seed=8)
    report = compress_cache(pre.cache, cfg)
    assert [r.budget for r in report.layers] == [10, 20, 40] == pre.cache.physical_lengths()
    assert pre.cache.nbytes == kv_bytes(2, 70, torch.bfloat16)
    check_kept_slots(pre, sinks=2, window=4)


# --------------------------------------------------------------------------------------------- pooling
def test_pool_scores_none_max_avg():
    s = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 1.0]])
    assert pool_scores(s, "none", 3) is s
    assert pool_scores(s, "max", 1) is s and pool_scores(s, "avg", 1) is s
    assert pool_scores(s, "max", 3).tolist() == [[0.0, 5.0, 5.0, 5.0, 1.0, 1.0]]
    assert pool_scores(s, "max", 5).tolist() == [[5.0, 5.0, 5.0, 5.0, 5.0, 1.0]]
    # avg: a centred window, zero padding counted at the edges
    torch.testing.assert_close(pool_scores(s, "avg", 3), torch.tensor([[0.0, 5 / 3, 5 / 3, 5 / 3, 1 / 3, 1 / 3]]))


@pytest.mark.parametrize("shape", [(2, 17), (2, 3, 17), (1, 1)])
@pytest.mark.parametrize("kernel", [3, 7])
def test_pool_scores_against_loops(shape, kernel):
    torch.manual_seed(9)
    scores = torch.rand(shape)
    flat = scores.reshape(-1, shape[-1]).tolist()
    half = kernel // 2
    exp_max, exp_avg = [], []
    for row in flat:
        n = len(row)
        exp_max.append([max(row[max(0, j - half):j + half + 1]) for j in range(n)])
        exp_avg.append([sum(row[max(0, j - half):j + half + 1]) / kernel for j in range(n)])
    got_max, got_avg = pool_scores(scores, "max", kernel), pool_scores(scores, "avg", kernel)
    assert got_max.shape == got_avg.shape == scores.shape
    torch.testing.assert_close(got_max.reshape(-1, shape[-1]), torch.tensor(exp_max))
    torch.testing.assert_close(got_avg.reshape(-1, shape[-1]), torch.tensor(exp_avg))
    assert (got_max >= scores).all()


@pytest.mark.parametrize("pooling,kernel,extra", [("none", 7, {10, 20, 30}), ("max", 3, {19, 20, 21}),
                                                  ("avg", 3, {19, 20, 21}), ("max", 1, {10, 20, 30})])
def test_pooling_keeps_the_neighbours_of_a_peak(pooling, kernel, extra):
    torch.manual_seed(10)
    pre = Prefilled(n_layers=1, b=1, s=48, dtype=torch.float32, seed=10)
    scores = torch.rand(1, 48, device=DEVICE) * 0.01
    scores[0, 20], scores[0, 10], scores[0, 30] = 1.0, 0.5, 0.5
    stats = pre.cache.layers[0].stats
    pre.cache.layers[0].stats = PrefillStats(stats.entropy, stats.kv_scores, scores)
    cfg = EntropyKVConfig(policy="uniform", budget=9, window=4, sink_tokens=2, pooling=pooling, pool_kernel=kernel)
    compress_cache(pre.cache, cfg)
    assert set(pre.cache.layers[0].positions[0].tolist()) == {0, 1, 44, 45, 46, 47} | extra


# --------------------------------------------------------------------------------------------- misuse, batch ops
def test_crop_is_refused():
    pre = Prefilled(n_layers=2, b=1, s=8, seed=11)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        pre.cache.crop(1)
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        pre.cache.layers[0].crop(-2)
    assert pre.cache.physical_lengths() == [8, 8]


def test_unscored_layer_and_misuse_are_errors():
    pre = Prefilled(n_layers=3, b=2, s=16, seed=12)
    pre.cache.layers[1].stats = None
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not scored"):
        compress_cache(pre.cache, EntropyKVConfig(window=4, sink_tokens=2))
    with pytest.raises(ValueError, match="batch size changed from 2 to 3"):
        pre.cache.begin_step(torch.zeros(3, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(RuntimeError, match="outside an optimized model"):
        EntropyKVCache(1).update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)


def test_empty_cache_and_logical_length():
    cache = EntropyKVCache(2)
    assert cache.nbytes == 0 and cache.physical_lengths() == [0, 0] and cache.get_seq_length() == 0
    assert cache.layers[0].index_nbytes == 0
    cache.begin_step(left_padded(2, 5, [0, 2]))
    assert cache.get_seq_length() == 5 and cache.next_positions.tolist() == [5, 3]
    cache.begin_step(torch.tensor([[5], [3]], device=DEVICE))
    assert cache.get_seq_length() == 6 and cache.next_positions.tolist() == [6, 4]


def test_batch_reordering_keeps_positions_with_their_rows():
    pre = Prefilled(n_layers=1, b=2, s=12, pads=[0, 5], seed=13)
    layer = pre.cache.layers[0]
    rows = layer.positions.clone()
    pre.cache.reorder_cache(torch.tensor([1, 0], device=DEVICE))
    assert torch.equal(layer.positions, rows.flip(0)) and torch.equal(layer.keys[0], pre.keys[0][1])
    layer.batch_repeat_interleave(2)
    assert layer.positions.shape == (4, 12) and torch.equal(layer.positions[0], layer.positions[1])
    layer.batch_select_indices(torch.tensor([2], device=DEVICE))
    assert torch.equal(layer.positions, rows[:1]) and layer.keys.shape[0] == 1
