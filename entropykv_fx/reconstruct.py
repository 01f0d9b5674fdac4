"""The reconstruction prefill of the `reconstruct` scorer (KVzip, Kim et al. 2025, https://arxiv.org/abs/2505.23416).

A prompt of n tokens is prefilled as [prompt, repeat prompt, prompt again] in one forward: the first n positions
compute exactly what a prefill of the prompt alone computes (attention is causal), and the queries of the
repetition measure which of those n cached tokens the model needs to reproduce the prompt
(`ops.score_reconstruction`). One forward of 2n + r tokens replaces KVzip's prefill plus separate reconstruction
passes.

Layout: a left-padded prefill of L columns becomes 2L + r columns, row b holding its p_b left pads, its n_b tokens
(the prefill's own columns, unmoved), the r repeat-prompt tokens, its n_b tokens again and then its p_b pads. The
prompt thus fills the first L columns in every row, so each layer's cache keeps only those (`context_slots`, in the
prefill graph right after the layer's attention: the repetition's keys and values never outlive their layer), and
callers see the first L columns of the outputs: a prefill of their prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor


def repeat_context(embeds: Tensor, positions: Tensor, prompt: Tensor) -> tuple[Tensor, Tensor]:
    """The reconstruction prefill's inputs for a left-padded prefill.

    embeds [B, L, H] and positions [B, L] (-1 for each row's left pads, then 0..n_b-1) are the prefill's; prompt
    [r, H] is the embedded repeat prompt. Returns (embeds [B, 2L + r, H], positions [B, 2L + r]) laid out as the
    module docstring says (pad columns: position -1, never attended).
    """
    b, length, _ = embeds.shape
    r = prompt.shape[0]
    n = (positions >= 0).sum(-1, keepdim=True)
    col = torch.arange(2 * length + r, device=embeds.device)[None]
    p = col - (length - n)  # position in [context, prompt, context]; < 0 on the left pads
    # the repetition's column j >= L is position n + (j - L); its trailing pads start at column L + r + n
    p = torch.where(col < length, p, n + col - length)
    pad = (p < 0) | (col >= length + r + n)
    source = torch.where(p < n, col, torch.where(p < n + r, length + p - n, col - n - r)).clamp(max=length + r - 1)
    source = torch.where(pad, 0, source)  # pad columns copy column 0; they are never attended
    table = torch.cat([embeds, prompt.to(embeds.dtype)[None].expand(b, r, -1)], 1)
    return table.gather(1, source[..., None].expand(-1, -1, embeds.shape[-1])), torch.where(pad, -1, p)


def context_slots(t: Tensor, dim: int, repeat_tokens: int) -> Tensor:
    """A copy of the prompt's columns of `t` along `dim`: the first (t.shape[dim] - repeat_tokens) // 2, of a
    reconstruction prefill's 2L + r (a copy, so the repetition's storage is freed)."""
    return t.narrow(dim, 0, (t.shape[dim] - repeat_tokens) // 2).clone()
