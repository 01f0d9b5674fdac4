"""Uniform budgets: every layer keeps the same number of tokens (the SnapKV-style baseline)."""

from __future__ import annotations

from . import Policy, budget_bounds


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    _, mean, _ = budget_bounds(n_tokens, config)
    return [mean] * len(layer_entropy)


POLICY = Policy("uniform", allocate, needs_scores=True, budgets_from_length=True,
                summary="same budget in every layer, tokens by window attention scores (SnapKV-style)")
