"""Token scorers: which prompt tokens a layer (or a KV head) keeps, independent of how many it keeps.

A policy decides budgets (the allocation, per layer or per KV head); a scorer ranks the tokens inside each budget.
Any policy that ranks tokens composes with any scorer: `optimize(model, policy="uniform", scorer="last_query")`;
a config that names no scorer uses the policy's own (`Policy.scorer`: `reconstruct` for the default `cache_topk`,
`window` for the SnapKV family).
Scores are float32, higher = kept first; the sinks and the last `window` prompt tokens are always kept whatever
the scorer says (`ops.select`).

| name | scores a token by | source |
|---|---|---|
| `window` | attention mass it receives from the last `window` prompt queries, pooled | SnapKV, arXiv 2404.14469 |
| `last_query` | attention it receives from the last prompt query (mean over heads), unpooled | TOVA, arXiv 2401.06104 |
| `key_norm` | the negated L2 norm of its key (low-norm keys draw attention), unpooled | Devoto et al., arXiv 2406.11430 |
| `reconstruct` | the most attention it receives while the model re-reads the prompt (max over queries and heads), unpooled | KVzip, arXiv 2505.23416 |

`window` and `last_query` are computed inside the prefill graph by `entropykv::score`, the second over one query
(`RewriteSettings.rank_queries`); `key_norm` needs only the cached keys. `reconstruct` makes the prefill one
forward over the prompt and its repetition in chunks of `reconstruct_chunk` tokens, `repeat_prompt` before each,
each chunk seeing the prompt up to its own end (`entropykv_fx.reconstruct`), scored by
`entropykv::score_reconstruction` with the softmax normalizers the forward's attention already computed
(`entropykv::attention_reconstruction`): a forward over twice the prompt plus one pass over its keys, for a ranking
that does not depend on what is asked next (compress a document once, ask many questions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from .policies import pool_scores

if TYPE_CHECKING:
    from .cache import CompressedLayer
    from .config import EntropyKVConfig


@dataclass(frozen=True)
class Scorer:
    """One way to rank a layer's prompt tokens.

    rank_queries: how many of the last prompt queries produce the attention scores (None: the `window` queries,
        the same ones that measure entropy; the graph then scores once).
    from_keys: the scores are the negated key norms instead of attention.
    pooled: scores are smoothed along the sequence (`pooling`, `pool_kernel`) before top-k.
    reconstruct: the prefill is a reconstruction prefill and the scores are its (`entropykv_fx.reconstruct`).
    combine: how one layer's heads combine into its layer scores, "sum" or "max" (tensor-parallel ranks reduce
        their heads' scores the same way, `entropykv_fx.parallel`).
    """

    name: str
    summary: str
    rank_queries: int | None = None
    from_keys: bool = False
    pooled: bool = True
    reconstruct: bool = False
    combine: str = "sum"

    def head_scores(self, layer: CompressedLayer, config: EntropyKVConfig) -> Tensor:
        """[B, Hkv, S] per-KV-head scores of a scored prefill layer."""
        raw = -layer.keys.float().norm(dim=-1) if self.from_keys else layer.stats.kv_scores
        return pool_scores(raw, config.pooling, config.pool_kernel) if self.pooled else raw

    def layer_scores(self, layer: CompressedLayer, config: EntropyKVConfig) -> Tensor:
        """[B, S] scores shared by every head of the layer (one token set per layer)."""
        if self.from_keys:
            return self.head_scores(layer, config).sum(1)
        return pool_scores(layer.stats.layer_scores, config.pooling, config.pool_kernel) if self.pooled \
            else layer.stats.layer_scores


# What the benchmarks put between the prompt and its repetition (KVzip's instruction, arXiv 2505.23416).
REPEAT_INSTRUCTION = "\n\nRepeat the previous context exactly.\n"


def repeat_prompt_ids(tokenizer, text: str = REPEAT_INSTRUCTION) -> tuple[int, ...]:
    """Token ids of `text` (no special tokens) for `EntropyKVConfig.repeat_prompt`:
    `optimize(model, policy="adakv", scorer="reconstruct", repeat_prompt=repeat_prompt_ids(tokenizer))`."""
    return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


SCORERS: dict[str, Scorer] = {s.name: s for s in (
    Scorer("window", "attention mass from the last `window` prompt queries, pooled (SnapKV)"),
    Scorer("last_query", "attention from the last prompt query, mean over heads, unpooled (TOVA)",
           rank_queries=1, pooled=False),
    Scorer("key_norm", "negated L2 norm of the key, unpooled (Knorm)", from_keys=True, pooled=False),
    Scorer("reconstruct", "largest attention received while re-reading the prompt, unpooled (KVzip)", pooled=False,
           reconstruct=True, combine="max"),
)}
