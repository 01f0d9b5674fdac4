"""No compression: every layer keeps the whole prompt. The reference the other policies are judged by."""

from __future__ import annotations

from . import Policy


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    return [n_tokens] * len(layer_entropy)


POLICY = Policy("full", allocate, needs_scores=False, summary="keep everything (no scoring, no eviction)",
                evicts=False)
