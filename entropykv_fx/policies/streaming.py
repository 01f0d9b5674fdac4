"""StreamingLLM (Xiao et al. 2023): keep the attention sinks and the most recent tokens, nothing else.

No attention is scored: tokens rank by position, so each layer keeps its `sink_tokens` first tokens and
the `budget - sink_tokens` most recent ones.
"""

from __future__ import annotations

from . import Policy, budget_bounds


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    _, mean, _ = budget_bounds(n_tokens, config)
    return [mean] * len(layer_entropy)


def recency(layer, config):
    return layer.positions.float()


POLICY = Policy("streaming", allocate, needs_scores=False, token_scores=recency, budgets_from_length=True,
                summary="attention sinks + the most recent tokens, same budget in every layer (StreamingLLM)")
