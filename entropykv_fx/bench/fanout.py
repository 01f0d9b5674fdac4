"""One prefill, every policy and budget: the benchmark's way to keep CPU runs affordable.

Compression runs after the whole prefill forward, so the prefill's outputs (hidden states, last logits, the
full cache and every layer's window scores) do not depend on the policy or the budget. `scored_prefill` runs
that forward once and keeps the uncompressed cache with its scores; `compressed_copy` then applies any
(policy, budget) to a copy, exactly as `optimize(model, policy=..., budget=...)` would have done during the
prefill (tests/test_quality.py checks this for every policy).
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..cache import EntropyKVCache
from ..compat import with_cache
from ..compress import CompressionReport, compress_cache
from ..config import EntropyKVConfig
from ..hf import optimize
from ..policies import POLICIES

# A scoring policy; at budget 1.0 it evicts nothing, so the prefill leaves every token in the cache.
_SCORING = dict(policy="uniform", budget=1.0)


@torch.no_grad()
def scored_prefill(model: nn.Module, input_ids: Tensor, base: EntropyKVConfig | None = None) -> tuple[EntropyKVCache, Tensor]:
    """(uncompressed cache holding every layer's prefill scores, logits [vocab] of the last position).

    Leaves `model` optimized with `base` (default `EntropyKVConfig()`) turned into the scoring configuration.
    """
    optimize(model, (base or EntropyKVConfig()).replace(**_SCORING))
    # Head-wise policies may rank by a statistic of their own (matrix_entropy's): the shared prefill computes it too.
    with_statistic = [name for name, p in POLICIES.items() if p.prefill_statistic is not None]
    if with_statistic:
        model._entropykv.compile(model, statistic_of=with_statistic[0])
    cache = EntropyKVCache(len(model.model.layers))
    scores = []

    def keep_scores(module, args, output):  # runs before optimize's hook, which drops the scores
        scores.extend(layer.stats for layer in cache.layers)

    handle = model.register_forward_hook(keep_scores, prepend=True)
    try:
        out = model(input_ids=input_ids.to(model.device), **with_cache(cache), use_cache=True, logits_to_keep=1)
    finally:
        handle.remove()
    for layer, stats in zip(cache.layers, scores):
        layer.stats = stats
    return cache, out.logits[0, -1]


def compressed_copy(cache: EntropyKVCache, config: EntropyKVConfig) -> tuple[EntropyKVCache, CompressionReport]:
    """A copy of a `scored_prefill` cache compressed by `config` (policy 'full' keeps everything)."""
    if any(layer.stats is None for layer in cache.layers):
        raise ValueError("compressed_copy needs a cache from scored_prefill (its layers carry prefill scores)")
    copied = copy.deepcopy(cache)
    return copied, compress_cache(copied, config)
