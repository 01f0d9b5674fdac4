"""The reconstruction prefill of the `reconstruct` scorer (KVzip, Kim et al. 2025, https://arxiv.org/abs/2505.23416).

A prompt of n tokens is prefilled together with its repetition, chunk by chunk, in one forward: the prompt first
(its queries see the prompt only, so its columns compute exactly what a prefill of the prompt alone computes),
then one segment per chunk of `chunk` prompt tokens: the r repeat-prompt tokens and the chunk again. A segment
sees the prompt up to the end of its chunk and itself, at the positions that follow, so its queries copy from
chunk + r positions back and never reach further than n + r + chunk: a prompt near the model's trained length is
scored at distances it was trained on. The queries of each repeated chunk measure which cached tokens the model
needs to reproduce it (`ops.score_reconstruction`); a token's score is the largest over every later chunk's
queries and heads.

KVzip (kvpress 0.5.5's KVzipPress: chunks of 2048) also scores long contexts chunk by chunk, but differently: each
chunk's repetition follows the whole
context's cache (positions after all n tokens, so the copy distance still grows with n), and its queries score
only that chunk's own tokens, normalized over the sink tokens, the chunk and the repetition. Here the prompt
after a chunk is hidden from its repetition instead, and every earlier token is scored by every later chunk.

Layout: a left-padded prefill of L columns (row b: p_b pads, then its n_b tokens) becomes L + K r + L columns,
K = ceil(L / chunk): the prefill's own L columns (unmoved), then K segment slots, slot k of r + min(chunk, L -
k chunk) columns. Row b's chunk k is its tokens k chunk .. min((k + 1) chunk, n_b) - 1 (chunks count each row's own
tokens, so a row is scored as it is alone); slot k holds, for row b, left pads, the repeat prompt at positions e,
e + 1, ... (e: the chunk's end) and the chunk's tokens after it; a row with no tokens in chunk k leaves the slot to
pads. Each layer's cache keeps only the first L columns (`context_slots`, in the prefill graph right after the
layer's attention), and callers see the first L columns of the outputs: a prefill of their prompt.
"""

from __future__ import annotations

import torch
from torch import Tensor


def prompt_columns(total: int, repeat_tokens: int, chunk: int) -> int:
    """L, the prompt's columns, of a reconstruction prefill of `total` = 2 L + K r columns (K = ceil(L / chunk));
    plain integer arithmetic, so symbolic lengths stay symbolic."""
    slots = (total + 2 * chunk + repeat_tokens - 1) // (2 * chunk + repeat_tokens)  # = K: see the module docstring
    return (total - slots * repeat_tokens) // 2


def segments(length: int, repeat_tokens: int, chunk: int) -> list[tuple[int, int, int]]:
    """(first column, columns, first prompt token) of each segment slot after a prompt of `length` columns."""
    return [(length + k * (repeat_tokens + chunk), repeat_tokens + min(chunk, length - start), start)
            for k, start in enumerate(range(0, length, chunk))]


def repeat_context(embeds: Tensor, positions: Tensor, prompt: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """The reconstruction prefill's inputs for a left-padded prefill.

    embeds [B, L, H] and positions [B, L] (-1 for each row's left pads, then 0..n_b-1) are the prefill's; prompt
    [r, H] is the embedded repeat prompt; chunk: prompt tokens per repeated segment (>= 1). Returns
    (embeds [B, 2L + K r, H], positions [B, 2L + K r]) laid out as the module docstring says (pad columns:
    position -1, never attended).
    """
    b, length, hidden = embeds.shape
    r = prompt.shape[0]
    n = (positions >= 0).sum(-1, keepdim=True)  # [B, 1]
    total = 2 * length + r * -(-length // chunk)
    col = torch.arange(length, total, device=embeds.device)[None]
    slot, offset = (col - length) // (r + chunk), (col - length) % (r + chunk)
    start = slot * chunk
    own = (n - start).clamp(0, chunk)  # row b's tokens in chunk k
    width = (length - start).clamp(max=chunk)  # the slot's chunk columns (the longest row's chunk)
    at = offset - (width - own)  # past the slot's left pads: 0..r-1 the repeat prompt, then the chunk's tokens
    pad = (at < 0) | (own == 0)
    pos = torch.where(pad, -1, start + own + at)
    source = torch.where(at < r, length + at.clamp(0, max(r - 1, 0)), (length - n) + start + at - r)
    source = torch.where(pad, 0, source)  # pad columns copy column 0; they are never attended
    table = torch.cat([embeds, prompt.to(embeds.dtype)[None].expand(b, r, -1)], 1)
    repeated = table.gather(1, source[..., None].expand(-1, -1, hidden))
    return torch.cat([embeds, repeated], 1), torch.cat([positions, pos], 1)


def context_slots(t: Tensor, dim: int, repeat_tokens: int, chunk: int) -> Tensor:
    """A copy of the prompt's columns of `t` along `dim`, the first `prompt_columns` of a reconstruction prefill's
    (a copy, so the repetition's storage is freed)."""
    return t.narrow(dim, 0, prompt_columns(t.shape[dim], repeat_tokens, chunk)).clone()
