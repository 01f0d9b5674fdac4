"""SnapKV (Li et al. 2024): every KV head keeps its own top tokens, with the same budget in every head and layer.

The last `window` (32) prompt queries score the prefix; each KV head ranks tokens by the attention mass its own
query heads give them (summed over the GQA group), max-pooled with kernel `pool_kernel` (7) so a kept token keeps
its neighbours, and keeps its top `budget` tokens (the window and the sinks always among them). Heads differ in
which tokens they keep, not in how many, so the cache takes the head-wise layout with equal lengths.
"""

from __future__ import annotations

from . import per_head, uniform

POLICY = per_head(uniform.POLICY, "snapkv",
                  summary="per-KV-head top tokens by pooled window attention, same budget everywhere (SnapKV)")
