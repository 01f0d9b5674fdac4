"""The compressed cache built by hand: bytes, positions, appends after compression, pooling."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE

from entropykv_fx import EntropyKVCache, EntropyKVConfig, ops
from entropykv_fx.cache import PrefillStats
from entropykv_fx.compress import compress_cache, pool_scores


def filled_cache(layers=2, b=2, h=2, n=40, d=8, dtype=torch.float16):
    cache = EntropyKVCache(layers)
    pos = torch.arange(n, device=DEVICE).repeat(b, 1)
    cache.begin_step(pos)
    for i in range(layers):
        k, v = (torch.randn(b, h, n, d, device=DEVICE).to(dtype) for _ in range(2))
        cache.update(k, v, i)
        q = torch.randn(b, 2 * h, 4, d, device=DEVICE).to(dtype)
        cache.layers[i].stats = PrefillStats(*ops.score(q, k, pos[:, -4:], pos, d ** -0.5, 0))
    return cache


def test_compression_keeps_exact_bytes_positions_and_logical_length():
    cache = filled_cache()
    before = cache.nbytes
    assert before == 2 * 2 * (2 * 2 * 40 * 8) * 2  # layers x (k + v) x elements x fp16 bytes
    report = compress_cache(cache, EntropyKVConfig(policy="uniform", budget=10, window=4, sink_tokens=2))
    assert cache.physical_lengths() == [10, 10] and report.bytes_before == before
    assert cache.nbytes == report.bytes_after == before // 4
    assert cache.get_seq_length() == 40 and cache.next_positions.tolist() == [40, 40]
    for layer in cache.layers:
        for row in layer.positions.tolist():
            assert row == sorted(row) and {0, 1, 36, 37, 38, 39} <= set(row)
        assert layer.stats is None  # scores are dropped once used
    cache.begin_step(torch.tensor([[40], [40]], device=DEVICE))  # a decode step appends one slot per layer
    cache.update(torch.zeros(2, 2, 1, 8, device=DEVICE, dtype=torch.float16), torch.zeros(2, 2, 1, 8, device=DEVICE, dtype=torch.float16), 0)
    assert cache.layers[0].get_seq_length() == 11 and cache.layers[0].positions[:, -1].tolist() == [40, 40]


def test_unscored_layer_and_misuse_are_errors():
    cache = filled_cache()
    cache.layers[1].stats = None
    with pytest.raises(RuntimeError, match=r"layers \[1\] were not scored"):
        compress_cache(cache, EntropyKVConfig())
    with pytest.raises(NotImplementedError, match="cannot be cropped"):
        cache.crop(1)
    with pytest.raises(ValueError, match="batch size changed from 2 to 3"):
        cache.begin_step(torch.zeros(3, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(RuntimeError, match="outside an optimized model"):
        EntropyKVCache(1).update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2), 0)


def test_reorder_keeps_positions_with_their_rows():
    cache = filled_cache(b=2)
    cache.layers[0].positions[1] += 100
    cache.reorder_cache(torch.tensor([1, 0], device=DEVICE))
    assert cache.layers[0].positions[0, 0].item() == 100


def test_pool_scores():
    s = torch.tensor([[0.0, 0.0, 5.0, 0.0, 0.0, 1.0]])
    assert pool_scores(s, "none", 3) is s
    assert pool_scores(s, "max", 3).tolist() == [[0.0, 5.0, 5.0, 5.0, 1.0, 1.0]]
    torch.testing.assert_close(pool_scores(s, "avg", 3), torch.tensor([[0.0, 5 / 3, 5 / 3, 5 / 3, 1 / 3, 1 / 3]]))
    per_head = torch.rand(2, 3, 17)
    assert pool_scores(per_head, "max", 5).shape == per_head.shape
