"""Layer budgets from how far each layer's attention is from uniform: log(n) - mean head entropy.

The entropy-guided rule of `seeds/001` (`entropy`) gives high-entropy layers more. Measured against KVzip's
cache-wide top-k over reconstruction scores (`cache_topk_layer`) on SmolLM2-135M (`benchmarks/layer_allocation.py`),
the layers that need many tokens are, on average, the focused ones: at 25% kept its top-k filled 11 of 30 layers
(24-100% kept; mean window entropy 2.64 nats) and left the other 19 near their sinks and window (2-11%; 3.35 nats);
layer 0, the most spread (6.6 nats), kept 3%, layer 18, the most focused (1.7 nats), 100%.
A layer whose window queries attend sharply (copying, retrieval) needs the specific tokens each later query will
look up, which differ from query to query; a layer that spreads attention averages over many tokens and survives
losing most of them. So this policy weights each layer by the KL divergence of its attention from uniform over
the n prompt tokens, log(n) - H_l (nats), instead of by H_l, with `entropy`'s clamp (`min_layer_budget`,
`max_layer_budget` x the mean) and total (layers x mean). `entropy_focus_per_head`: the same budgets, each KV head
choosing its own tokens.
"""

from __future__ import annotations

import math

from . import Policy, per_head
from .entropy import clamped_shares, most_per_layer


def allocate(layer_entropy, n_tokens, config) -> list[int]:
    return clamped_shares([max(math.log(n_tokens) - h, 0.0) for h in layer_entropy], n_tokens, config)


POLICY = Policy("entropy_focus", allocate, needs_scores=True, layer_ceiling=most_per_layer,
                summary="layer budgets proportional to log(n) - mean head attention entropy (attention's distance "
                        "from uniform); one token set per layer")

HEAD_POLICY = per_head(POLICY, "entropy_focus_per_head",
                       summary="entropy_focus's layer budgets, each KV head keeping its own top tokens")
