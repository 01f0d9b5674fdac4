"""PyramidKV (Cai et al. 2024): budgets shrink linearly from the bottom layer to the top one.

Lower layers spread attention widely and keep more; upper layers focus and keep less. Following the
paper's default beta = 20, the top layer keeps mean / beta and the bottom layer 2 * mean - mean / beta,
so the total equals layers x mean. Tokens are chosen by window attention scores, as in `uniform`, one token set
per layer; `pyramidkv_per_head` lets each KV head choose its own, as the paper's implementation does.
"""

from __future__ import annotations

from . import Policy, budget_bounds, distribute, per_head

BETA = 20.0


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    floor, mean, ceiling = budget_bounds(n_tokens, config)
    n_layers = len(layer_entropy)
    top = mean / BETA
    bottom = 2 * mean - top
    step = (bottom - top) / max(n_layers - 1, 1)
    ramp = [bottom - i * step for i in range(n_layers)] if n_layers > 1 else [float(mean)]
    return distribute(ramp, mean * n_layers, floor, ceiling)


POLICY = Policy("pyramidkv", allocate, needs_scores=True, budgets_from_length=True,
                summary="budgets decreasing linearly from the bottom to the top layer (PyramidKV), window scores")

HEAD_POLICY = per_head(POLICY, "pyramidkv_per_head",
                       summary="pyramidkv's layer budgets, each KV head keeping its own top tokens (as in the paper)")
