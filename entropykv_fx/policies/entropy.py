"""Entropy-guided per-layer budgets (Kim & Jung 2025, `seeds/001`).

Layers whose heads spread attention widely (high mean entropy) use more context and keep more tokens;
low-entropy "sink" layers keep fewer. The total equals `layers x mean budget`, each layer clamped to
[min_layer_budget, max_layer_budget] x mean (and at least sinks + window). Tokens are chosen once per layer
from scores summed over all heads, so every head of a layer shares one token set (`entropy_per_head`: the same
budgets, each KV head choosing its own tokens, the head-wise layout).
"""

from __future__ import annotations

import math

from . import Policy, budget_bounds, distribute, per_head


def share_bounds(n_tokens, config) -> tuple[int, int, int]:
    """(least, mean, most) tokens of one layer: [min_layer_budget, max_layer_budget] x mean, at least sinks + window."""
    floor, mean, ceiling = budget_bounds(n_tokens, config)
    lo = max(floor, math.ceil(config.min_layer_budget * mean))
    return lo, mean, max(lo, min(ceiling, math.floor(config.max_layer_budget * mean)))


def clamped_shares(weights, n_tokens, config) -> list[int]:
    """Layer budgets proportional to `weights`, totalling layers x mean, each within `share_bounds`."""
    lo, mean, hi = share_bounds(n_tokens, config)
    return distribute(list(weights), mean * len(weights), lo, hi)


def most_per_layer(n_tokens, config) -> int:
    return share_bounds(n_tokens, config)[2]


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    return clamped_shares(layer_entropy, n_tokens, config)


POLICY = Policy("entropy", allocate, needs_scores=True, layer_ceiling=most_per_layer,
                summary="layer budgets proportional to mean head attention entropy; one token set per layer")

HEAD_POLICY = per_head(POLICY, "entropy_per_head",
                       summary="entropy's layer budgets, each KV head keeping its own top tokens (SnapKV's selection)")
