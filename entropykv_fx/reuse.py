"""Compress a document once, then ask it many questions (query-agnostic reuse of a compressed cache).

    cache = entropykv_fx.reuse.compress_context(model, context_ids)      # prefill + compression, once
    for question_ids in questions:
        answer_ids = entropykv_fx.reuse.ask(model, cache, question_ids, max_new_tokens=32)

The context's first forward is the prefill, so an optimized model compresses it right there, seeing only the
context (not any question). `ask` works on a copy, so the compressed document stays reusable. Positions continue
from the context's logical length however few slots were kept. Decoding is greedy, one sequence at a time.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache

from .compat import cache_of, with_cache


def _check_ids(name: str, ids: Tensor) -> None:
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [1, n] with n >= 1 (one sequence), got {tuple(ids.shape)}")


@torch.no_grad()
def compress_context(model: nn.Module, context_ids: Tensor) -> Cache:
    """Prefill `context_ids` [1, n] into a new cache; a model prepared by `optimize()` compresses it."""
    _check_ids("context_ids", context_ids)
    out = model(input_ids=context_ids.to(model.device), **with_cache(None), use_cache=True, logits_to_keep=1)
    return cache_of(out)


@torch.no_grad()
def continue_greedy(model: nn.Module, cache: Cache, next_logits: Tensor, max_new_tokens: int,
                    stop_token_ids: Iterable[int] = ()) -> Tensor:
    """Greedy tokens [n] after `next_logits` (the last position's logits), extending `cache` in place.

    Stops after `max_new_tokens` or right after a token of `stop_token_ids` (which is included).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    stops = set(stop_token_ids)
    tokens = []
    logits = next_logits.reshape(-1)
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in stops or step == max_new_tokens - 1:
            break
        step_ids = torch.tensor([[token]], device=model.device)
        logits = model(input_ids=step_ids, **with_cache(cache), use_cache=True).logits[0, -1]
    return torch.tensor(tokens, dtype=torch.long)


@torch.no_grad()
def ask(model: nn.Module, cache: Cache, question_ids: Tensor, max_new_tokens: int,
        stop_token_ids: Iterable[int] = ()) -> Tensor:
    """Greedy answer tokens [n] to `question_ids` [1, m] asked of a copy of `cache` (left unchanged)."""
    _check_ids("question_ids", question_ids)
    working = copy.deepcopy(cache)
    out = model(input_ids=question_ids.to(model.device), **with_cache(working), use_cache=True, logits_to_keep=1)
    return continue_greedy(model, working, out.logits[0, -1], max_new_tokens, stop_token_ids)
