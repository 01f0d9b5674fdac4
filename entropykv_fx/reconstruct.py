"""The reconstruction prefill of the `reconstruct` scorer (KVzip, Kim et al. 2025, https://arxiv.org/abs/2505.23416).

A prompt of n tokens is prefilled as [prompt, repeat prompt, prompt again] in one forward: the first n positions
compute exactly what a prefill of the prompt alone computes (attention is causal), and the queries of the
repetition measure which of those n cached tokens the model needs to reproduce the prompt
(`ops.score_reconstruction`). The runtime then drops the repeated part from the cache (`EntropyKVCache.
end_reconstruction`) and from the outputs (`original_columns`), so callers see a prefill of the prompt; one forward
of 2n + r tokens replaces KVzip's prefill plus separate reconstruction passes.
"""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_context(embeds: Tensor, positions: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The reconstruction prefill's inputs for a left-padded prefill.

    embeds [B, L, H] and positions [B, L] (0..n_b-1 after -1 for each row's left pads) are the prefill's;
    prompt [r, H] is the embedded repeat prompt. Returns (embeds [B, 2L + r, H], positions [B, 2L + r], shift [B]):
    row b holds 2 * pads_b pad columns, its n_b tokens, the prompt and its n_b tokens again, and the prefill's
    column j is the reconstruction's column j + shift[b].
    """
    b, length, _ = embeds.shape
    r = prompt.shape[0]
    n = (positions >= 0).sum(-1, keepdim=True)
    pads = length - n
    p = torch.arange(2 * length + r, device=embeds.device)[None] - 2 * pads  # position in [context, prompt, context]
    source = torch.where(p < n, pads + p, torch.where(p < n + r, length + p - n, pads + p - n - r))
    source = torch.where(p < 0, 0, source)  # pad columns copy column 0; they are never attended
    table = torch.cat([embeds, prompt.to(embeds.dtype)[None].expand(b, r, -1)], 1)
    return table.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1])), torch.where(p < 0, -1, p), pads[:, 0]


def original_columns(t: Tensor, shift: Tensor, length: int) -> Tensor:
    """The `length` columns [B, length, ...] of a reconstruction prefill's output t [B, 2L + r, ...] that correspond
    to the prefill's own columns (see `repeat_context`)."""
    idx = shift[:, None] + torch.arange(length, device=t.device)
    return t.gather(1, idx.view(*idx.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
