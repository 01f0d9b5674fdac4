"""The head-wise layout: ragged per-head selection, exact bytes held, int8 heads, decode appends and attention."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE

from entropykv_fx import EntropyKVCache, EntropyKVConfig, ops
from entropykv_fx.cache import PrefillStats
from entropykv_fx.compress import compress_cache
from entropykv_fx.headwise import HeadwiseLayer, select_per_head

HQ, HKV, D, W = 4, 2, 8, 4


def prefilled(n_layers=2, b=1, s=40, dtype=torch.float32, pads=None, seed=0) -> tuple[EntropyKVCache, list, list]:
    """A cache filled and scored the way the model integration does it; also returns the original keys/values."""
    torch.manual_seed(seed)
    pos = torch.tensor([[-1] * p + list(range(s - p)) for p in (pads or [0] * b)], device=DEVICE)
    cache = EntropyKVCache(n_layers)
    cache.begin_step(pos)
    keys, values = [], []
    for i in range(n_layers):
        k, v = (torch.randn(b, HKV, s, D, device=DEVICE).to(dtype) for _ in range(2))
        cache.update(k, v, i)
        q = (torch.randn(b, HQ, W, D, device=DEVICE) * 2).to(dtype)
        cache.layers[i].stats = PrefillStats(*ops.score(q, k, pos[:, -W:], pos, D ** -0.5, 0))
        keys.append(k)
        values.append(v)
    return cache, keys, values


def held_bytes(layer: HeadwiseLayer) -> tuple[int, int]:
    """(payload + scales, positions) bytes of the storage the layer's tensors really own: catches views of the
    uncompressed tensors, which would keep the whole original storage alive."""
    payload = index = 0
    for head in layer.heads:
        for name, t in vars(head).items():
            if isinstance(t, torch.Tensor):
                assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), f"{name} is a view of a larger buffer"
                if name == "positions":
                    index += t.numel() * t.element_size()
                else:
                    payload += t.numel() * t.element_size()
    return payload, index


def test_select_per_head_takes_each_rows_top_budget_in_temporal_order():
    torch.manual_seed(0)
    ranked = torch.randn(2, 3, 20)
    budgets = torch.tensor([[5, 2, 7], [3, 2, 7]])
    kept = select_per_head(ranked, budgets)
    assert [k.shape for k in kept] == [(2, 5), (2, 2), (2, 7)]
    for h, idx in enumerate(kept):
        for b in range(2):
            n = int(budgets[b, h])
            expected = sorted(sorted(range(20), key=lambda j: -ranked[b, h, j].item())[:n])
            assert idx[b, :n].tolist() == expected
            assert idx[b, n:].tolist() == [-1] * (idx.shape[1] - n)


def test_ties_go_to_the_earlier_slot():
    kept = select_per_head(torch.zeros(1, 1, 10), torch.tensor([[4]]))
    assert kept[0].tolist() == [[0, 1, 2, 3]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ragged_heads_hold_exactly_their_slots_and_contents(dtype):
    cache, keys, values = prefilled(n_layers=1, b=2, s=40, dtype=dtype, pads=[0, 6])
    layer = cache.layers[0]
    budgets = torch.tensor([[30, 9], [12, 9]])  # row 1 gets fewer tokens in head 0: 18 empty slots there
    ranked = ops.selection_ranks(layer.stats.kv_scores, layer.positions, 2, W)
    hw = HeadwiseLayer.from_plan(layer, budgets, [False, True], ranked)
    assert hw.head_lengths() == [30, 9] and hw.get_seq_length() == 30
    elt = torch.empty(0, dtype=dtype).element_size()
    expected_payload = 2 * 30 * 2 * D * elt + 2 * 9 * 2 * (D + 4)  # head 0 in dtype; head 1 int8 + fp32 scales
    assert hw.nbytes == expected_payload and held_bytes(hw) == (expected_payload, 8 * 2 * (30 + 9))
    assert hw.index_nbytes == 8 * 2 * (30 + 9)
    head0, head1 = hw.heads
    assert head0.keys.dtype == dtype and head1.keys.dtype == torch.int8 and head1.key_scales.dtype == torch.float32
    for b, pad in enumerate([0, 6]):
        for h, head in enumerate(hw.heads):
            pos = head.positions[b]
            real = pos[pos >= 0].tolist()
            assert len(real) == budgets[b, h] and real == sorted(set(real)), "kept tokens in temporal order, once"
            assert set(range(2)) | set(range(40 - pad - W, 40 - pad)) <= set(real), "sinks + window kept"
            assert (pos[len(real):] == -1).all(), "empty slots only at the end"
            slots = [pad + p for p in real]
            if head.int8:
                k = ops.dequantize_int8(head.keys[b, 0, :len(real)], head.key_scales[b, 0, :len(real)])
                ref = keys[0][b, h, slots].float()
                assert (k - ref).abs().max() <= ref.abs().amax(-1).max() / 127  # within one quantization step
            else:
                assert torch.equal(head.keys[b, 0, :len(real)], keys[0][b, h, slots])
                assert torch.equal(head.values[b, 0, :len(real)], values[0][b, h, slots])


def test_decode_appends_to_every_head_and_attends_its_own_slots():
    cache, keys, values = prefilled(n_layers=1, b=2, s=32, pads=[0, 5], seed=3)
    layer = cache.layers[0]
    ranked = ops.selection_ranks(layer.stats.kv_scores, layer.positions, 1, W)
    hw = HeadwiseLayer.from_plan(layer, torch.tensor([[20, 6], [14, 6]]), [False, True], ranked)
    kept = [h.positions.clone() for h in hw.heads]
    step = torch.tensor([[32], [27]], device=DEVICE)
    new_k, new_v = torch.randn(2, HKV, 1, D, device=DEVICE), torch.randn(2, HKV, 1, D, device=DEVICE)
    view_k, view_v = hw.update(new_k, new_v, step, 0)  # the dense view a traced graph reads (the pass drops it)
    assert hw.head_lengths() == [21, 7]
    assert view_k.shape == view_v.shape == (2, HKV, 21, D) and torch.equal(view_k[:, 0], hw.heads[0].keys[:, 0])
    q = torch.randn(2, HQ, 1, D, device=DEVICE)
    out = hw.attention(q, step, D ** -0.5, 0)
    group = HQ // HKV
    for b, pad in enumerate([0, 5]):
        for h, head in enumerate(hw.heads):
            assert head.positions[b, -1] == step[b, 0] and torch.equal(head.positions[b, :-1], kept[h][b])
            slots = [pad + p for p in kept[h][b].tolist() if p >= 0]
            k_ref = torch.cat([keys[0][b, h, slots], new_k[b, h]]).double()
            v_ref = torch.cat([values[0][b, h, slots], new_v[b, h]]).double()
            if head.int8:  # the reference sees what an int8 head stores: quantized old and new tokens
                k_ref, v_ref = (ops.dequantize_int8(*ops.quantize_int8(t)).double() for t in (k_ref, v_ref))
            p = torch.softmax(q[b, h * group:(h + 1) * group].double() @ k_ref.T * D ** -0.5, -1)
            torch.testing.assert_close(out[b, h * group:(h + 1) * group].double(), p @ v_ref, atol=1e-5, rtol=1e-5)


def test_batch_reorder_repeat_and_select_apply_to_every_head():
    cache, _, _ = prefilled(n_layers=1, b=2, s=24, seed=4)
    layer = cache.layers[0]
    ranked = ops.selection_ranks(layer.stats.kv_scores, layer.positions, 1, W)
    hw = HeadwiseLayer.from_plan(layer, torch.tensor([[10, 6], [8, 6]]), [True, False], ranked)
    before = [(h.keys.clone(), h.key_scales, h.positions.clone()) for h in hw.heads]
    hw.reorder_cache(torch.tensor([1, 0]))
    for (k, _, pos), head in zip(before, hw.heads):
        assert torch.equal(head.keys, k.flip(0)) and torch.equal(head.positions, pos.flip(0))
    hw.batch_repeat_interleave(2)
    assert all(h.keys.shape[0] == 4 and h.positions.shape[0] == 4 for h in hw.heads)
    assert hw.heads[0].key_scales.shape[0] == 4
    hw.batch_select_indices(torch.tensor([0, 2]))
    assert all(h.keys.shape[0] == 2 for h in hw.heads)


def test_compress_cache_with_a_headwise_policy_reports_what_it_holds():
    cache, _, _ = prefilled(n_layers=3, b=1, s=64, dtype=torch.bfloat16, seed=5)
    before = cache.nbytes
    report = compress_cache(cache, EntropyKVConfig(policy="adakv", budget=0.25, window=W, sink_tokens=2))
    assert all(isinstance(layer, HeadwiseLayer) for layer in cache.layers)
    assert report.bytes_before == before and cache.nbytes == report.bytes_after
    for r, layer in zip(report.layers, cache.layers):
        assert sum(h.budget for h in r.heads) == HKV * 16, "adakv keeps the layer's budget, split over heads"
        assert [h.slots for h in r.heads] == layer.head_lengths() == [h.budget for h in r.heads]
        assert [(h.bytes, h.index_bytes) for h in r.heads] == [(hd.nbytes, hd.index_nbytes) for hd in layer.heads]
        assert r.bytes_after == layer.nbytes == held_bytes(layer)[0]
        assert all(h.storage == "bfloat16" for h in r.heads)
    assert report.bytes_after == before // 4
    text = str(report).splitlines()
    assert len(text) == 2 + 3 * (1 + HKV) and "head 1" in text[-1]
