"""One prefill, every policy and budget: the benchmark's way to keep CPU runs affordable.

Compression runs after the whole prefill forward, so the prefill's outputs (hidden states, last logits, the
full cache and every layer's window scores) do not depend on the policy or the budget. `scored_prefill` runs
that forward once and keeps the uncompressed cache with its scores; `compressed_copy` then applies any
(policy, budget) to a copy, exactly as `optimize(model, policy=..., budget=...)` would have done during the
prefill (tests/test_quality.py checks this for every policy).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..cache import EntropyKVCache
from ..compress import CompressionReport, compress_cache
from ..config import EntropyKVConfig
from ..hf import optimize, optimized
from ..policies import POLICIES
from ..scorers import SCORERS


@torch.no_grad()
def scored_prefill(model: nn.Module, input_ids: Tensor, base: EntropyKVConfig | None = None,
                   policies: Iterable[str] | None = None) -> tuple[EntropyKVCache, Tensor]:
    """(uncompressed cache holding every layer's prefill statistics, logits [vocab] of the last position).

    Leaves `model` optimized with `base` (default `EntropyKVConfig()`). The scores are `base`'s scorer's: copies
    compress only with configs that score the same way (`compressed_copy`; `prefill_of` groups configs by it).
    `policies`: the policies the copies will use (None: any), so that a statistic of a policy's own (matrix
    entropy) is computed only when one of them needs it.
    """
    base = base or EntropyKVConfig()
    optimize(model, base)
    # Head-wise policies may rank by a statistic of their own (matrix_entropy's): the shared prefill computes it too.
    wanted = POLICIES if policies is None else set(policies)
    with_statistic = [name for name, p in POLICIES.items() if p.prefill_statistic is not None and name in wanted]
    cache, logits = optimized(model).scored_prefill(input_ids.to(model.device),
                                                    statistic_of=with_statistic[0] if with_statistic else None)
    cache.scored_with = prefill_of(base)
    return cache, logits[0]


def prefill_of(config: EntropyKVConfig) -> tuple[str, tuple[int, ...], int | None]:
    """What a prefill scored for `config` computes: its (resolved) scorer, repeat prompt and reconstruction chunk
    (None for scorers that do not reconstruct)."""
    chunk = config.reconstruct_chunk if SCORERS[config.scorer].reconstruct else None
    return config.scorer, config.repeat_prompt, chunk


def prefill_config(prefill: tuple[str, tuple[int, ...], int | None]) -> EntropyKVConfig:
    """A config whose prefill computes `prefill` (as `prefill_of` gives it)."""
    scorer, repeat, chunk = prefill
    return EntropyKVConfig(scorer=scorer, repeat_prompt=repeat, **({} if chunk is None else {"reconstruct_chunk": chunk}))


def compressed_copy(cache: EntropyKVCache, config: EntropyKVConfig) -> tuple[EntropyKVCache, CompressionReport]:
    """A copy of a `scored_prefill` cache compressed by `config` (policy 'full' keeps everything)."""
    if any(layer.stats is None for layer in cache.layers):
        raise ValueError("compressed_copy needs a cache from scored_prefill (its layers carry prefill scores)")
    policy = POLICIES[config.policy]
    if policy.evicts and policy.needs_scores and cache.scored_with != prefill_of(config):
        raise ValueError(f"compressed_copy: the cache was scored for (scorer, repeat_prompt, reconstruct_chunk) {cache.scored_with} but "
                         f"policy {config.policy!r} ranks by {prefill_of(config)}; prefill with a config that scores "
                         "the same way (scored_prefill(model, ids, EntropyKVConfig(scorer=...)))")
    copied = copy.deepcopy(cache)
    return copied, compress_cache(copied, config)


def stacked(caches: list[EntropyKVCache]) -> EntropyKVCache:
    """One batch whose row i is `caches[i]`: single-row caches of the same prompt (e.g. `compressed_copy`s under
    different policies or budgets), so that one forward continues all of them. Shorter rows end in empty slots that
    are never attended (`CompressedLayer.stack_rows`), so each row computes what its cache alone would, up to the
    rounding of a batched matmul.

    Raises ValueError for an empty list, a cache of several rows, caches that continue at different positions or
    whose layers are of different kinds (layer-wise and head-wise caches do not stack: group them by
    `layer_kinds`).
    """
    if not caches:
        raise ValueError("stacked: no caches")
    if any(c.next_positions is None or c.next_positions.shape[0] != 1 for c in caches):
        raise ValueError("stacked: every cache must hold one prefilled row")
    if len({c.seen_tokens for c in caches}) > 1 or len({int(c.next_positions[0]) for c in caches}) > 1:
        raise ValueError("stacked: the caches continue at different positions (prefills of different prompts)")
    if len({layer_kinds(c) for c in caches}) > 1:
        raise ValueError(f"stacked: the caches' layers are of different kinds {sorted({layer_kinds(c) for c in caches})}")
    batch = EntropyKVCache(len(caches[0].layers))
    batch.layers = [type(rows[0]).stack_rows(list(rows)) for rows in zip(*(c.layers for c in caches))]
    batch.seen_tokens = caches[0].seen_tokens
    batch.next_positions = torch.cat([c.next_positions for c in caches])
    return batch


def layer_kinds(cache: EntropyKVCache) -> tuple[str, ...]:
    """The class of each layer: caches with equal kinds can be `stacked`."""
    return tuple(type(layer).__name__ for layer in cache.layers)
