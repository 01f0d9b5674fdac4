"""The entropykv custom ops: the contract between the model integration, the graph pass, kernels and exporters.

Every op is declared here with `torch.library.custom_op`, with a plain-torch reference implementation that
defines its meaning and a fake implementation for tracing. Positions, not slot indices, define visibility:
`k_pos[b, j]` is the logical position of the token stored in slot j (-1 for an empty slot or a pad), and
`q_pos[b, i]` that of query i (-1 for a pad query). Query i sees key j when
`0 <= k_pos[j] <= q_pos[i]` and, with a sliding window w > 0, `q_pos[i] - k_pos[j] < w`.
This lets a compressed cache keep its tokens in any slots while masks and RoPE stay right.

Shapes: q [B, Hq, L, D]; k, v [B, Hkv, S, D] with Hq a multiple of Hkv (GQA, not expanded).
"""

from __future__ import annotations

import itertools
import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .reconstruct import prompt_columns, segments

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_qkv(op: str, q: Tensor, k: Tensor, v: Tensor | None, q_pos: Tensor, k_pos: Tensor) -> None:
    _check(q.dim() == 4 and k.dim() == 4, f"{op}: q and k must be 4-D [B, H, L, D], got {tuple(q.shape)}, {tuple(k.shape)}")
    _check(q.dtype in _FLOATS, f"{op}: q dtype {q.dtype} not supported; accepted: {_FLOATS}")
    tensors = [k] + ([v] if v is not None else [])
    for t in tensors:
        _check(t.dtype == q.dtype, f"{op}: dtype mismatch, q is {q.dtype} but k/v is {t.dtype}")
        _check(t.device == q.device, f"{op}: device mismatch, q on {q.device} but k/v on {t.device}")
    _check(q.shape[0] == k.shape[0], f"{op}: batch mismatch q {q.shape[0]} vs k {k.shape[0]}")
    _check(q.shape[-1] == k.shape[-1], f"{op}: head_dim mismatch q {q.shape[-1]} vs k {k.shape[-1]}")
    _check(q.shape[1] % k.shape[1] == 0, f"{op}: query heads {q.shape[1]} not a multiple of kv heads {k.shape[1]}")
    if v is not None:
        _check(v.shape[:3] == k.shape[:3], f"{op}: v shape {tuple(v.shape)} does not match k {tuple(k.shape)}")
    _check(q_pos.shape == (q.shape[0], q.shape[2]), f"{op}: q_pos must be [B, L]={q.shape[0], q.shape[2]}, got {tuple(q_pos.shape)}")
    _check(k_pos.shape == (k.shape[0], k.shape[2]), f"{op}: k_pos must be [B, S]={k.shape[0], k.shape[2]}, got {tuple(k_pos.shape)}")
    for name, p in (("q_pos", q_pos), ("k_pos", k_pos)):
        _check(p.dtype == torch.int64, f"{op}: {name} must be int64, got {p.dtype}")
        _check(p.device == q.device, f"{op}: {name} on {p.device} but q on {q.device}")


def visibility(q_pos: Tensor, k_pos: Tensor, sliding_window: int) -> Tensor:
    """[B, L, S] bool: which key slots each query may attend (see module docstring)."""
    qp, kp = q_pos[:, :, None], k_pos[:, None, :]
    seen = (kp >= 0) & (kp <= qp) & (qp >= 0)
    if sliding_window > 0:
        seen = seen & (qp - kp < sliding_window)  # out of place: decompositions must stay functional
    return seen


# --------------------------------------------------------------------------------------------- attention
@torch.library.custom_op("entropykv::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
              sliding_window: int) -> Tensor:
    """Softmax attention of q over the cache slots visible by position. Returns [B, Hq, L, Dv].

    A query that sees no key (a pad) returns zeros.
    """
    _check_qkv("entropykv.attention", q, k, v, q_pos, k_pos)
    # contiguous: SDPA may return another memory layout, and compiled graphs rely on the fake's strides
    return _sdpa_by_position(q, k, v, q_pos, k_pos, scale, sliding_window).contiguous()


def _sdpa_by_position(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
                      sliding_window: int) -> Tensor:
    gqa = q.shape[1] != k.shape[1]
    if _is_plain_causal(q_pos, k_pos, sliding_window):  # an unpadded prefill: SDPA's causal fast path, no mask
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    seen = visibility(q_pos, k_pos, sliding_window)
    if bool(seen.all()):  # e.g. decode over a cache without pads: no mask needed
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    any_seen = seen.any(-1, keepdim=True)
    # Rows that see nothing get a harmless all-true mask (avoids NaN), then are zeroed.
    mask = (seen | ~any_seen)[:, None]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out * any_seen[:, None].to(out.dtype)


def _is_plain_causal(q_pos: Tensor, k_pos: Tensor, sliding_window: int) -> bool:
    """True when query and key slot i both hold position p + i (p >= 0), so slot i sees slots 0..i: the causal
    mask. Checked in O(L), because the [L, L] mask of a long prefill (16 GB at 128k tokens) must never be built;
    the answer waits for the device, so it is `_remembered` (every layer of a prefill asks about the same
    positions)."""
    n = k_pos.shape[-1]
    if q_pos.shape != k_pos.shape or n < 2 or 0 < sliding_window < n:
        return False

    def read() -> bool:
        start = k_pos[:, :1]
        steps = torch.arange(n, device=k_pos.device)
        return bool(((k_pos - start == steps) & (q_pos == k_pos)).all() & (start >= 0).all())
    return _remembered("plain_causal", q_pos, k_pos, (), read)


_MEMO: dict[str, tuple] = {}  # kind -> (weakrefs to q_pos and k_pos, their versions and the question, the answer)


def _remembered(kind: str, q_pos: Tensor, k_pos: Tensor, question: tuple, read: Callable[[], Any]) -> Any:
    """read(): a fact about positions that the host learns by waiting for the device (a sync, which stalls the
    queue of launched work). Every layer of a prefill graph passes the same positions tensors (the graph pass sees
    to it), so the last answer of each kind is kept for as long as both tensors live unmodified (their identity
    and version counter) and the question (`question`: whatever else the answer depends on) is the same. Writes
    the version counter cannot see (through `.data`, numpy or DLPack) are not expected of positions; tensors made
    under `torch.inference_mode` have no version counter and are read every time."""
    if q_pos.is_inference() or k_pos.is_inference():
        return read()
    key = (q_pos._version, k_pos._version, question)
    memo = _MEMO.get(kind)
    if memo is not None and memo[0]() is q_pos and memo[1]() is k_pos and memo[2] == key:
        return memo[3]
    answer = read()
    _MEMO[kind] = weakref.ref(q_pos), weakref.ref(k_pos), key, answer
    return answer


def _sees_every_key(q_pos: Tensor, k_pos: Tensor, sliding_window: int) -> bool:
    """True when every query sees every key slot: all valid, none later than the earliest query, none out of the
    window (a chunk's repetition attending to the prompt before it). O(L + S), like `_is_plain_causal`."""
    if k_pos.shape[-1] == 0 or q_pos.shape[-1] == 0 or not bool((k_pos >= 0).all()):
        return False
    first, last = q_pos.amin(-1), q_pos.amax(-1)
    ok = (first >= k_pos.amax(-1)) & ((sliding_window == 0) | (last - k_pos.amin(-1) < sliding_window))
    return bool(ok.all())


@attention.register_fake
def _(q, k, v, q_pos, k_pos, scale, sliding_window):
    _check_qkv("entropykv.attention", q, k, v, q_pos, k_pos)  # fake/meta inputs get the same errors
    return q.new_empty(*q.shape[:3], v.shape[-1])


@torch.library.custom_op("entropykv::attention_lse", mutates_args=())
def attention_lse(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
                  sliding_window: int) -> tuple[Tensor, Tensor]:
    """`attention`, and each query's softmax normalizer: ([B, Hq, L, Dv], lse [B, Hq, L] float32).

    lse is the log-sum-exp (natural log) of the query's scaled logits over the slots it sees, -inf for a query
    that sees none. A fused attention kernel computes it anyway for its backward pass (FlashAttention-2, Dao 2023,
    https://arxiv.org/abs/2307.08691; cuDNN's, which the CUDA kernel prefers); the reconstruction scorer reuses it
    (`score_reconstruction`'s lse) instead of a pass of its own over the keys. Raises ValueError for shapes,
    dtypes or devices `attention` does not accept.
    """
    _check_qkv("entropykv.attention_lse", q, k, v, q_pos, k_pos)
    if q.device.type == "cpu":
        causal = _is_plain_causal(q_pos, k_pos, sliding_window)
        if causal or _sees_every_key(q_pos, k_pos, sliding_window):
            return fused_attention_lse(q, k, v, scale, causal)
    return attention(q, k, v, q_pos, k_pos, scale, sliding_window), log_normalizers(q, k, q_pos, k_pos, scale,
                                                                                   sliding_window)


@attention_lse.register_fake
def _(q, k, v, q_pos, k_pos, scale, sliding_window):
    _check_qkv("entropykv.attention_lse", q, k, v, q_pos, k_pos)
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def fused_attention_lse(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool) -> tuple[Tensor, Tensor]:
    """`attention_lse` of queries q [B, Hq, L, D] that see every key of k, v [B, Hkv, S, D] (causal=False), or of an
    unpadded causal prefill (causal=True, L == S), with no positions to check: ([B, Hq, L, Dv], lse [B, Hq, L]
    float32), GQA without expanding. One fused kernel where the device has one: FlashAttention for CPU tensors,
    cuDNN's attention or FlashAttention-2 for CUDA fp16/bf16 (`kernels.score.fused_lse`); otherwise `attention`
    and `log_normalizers` over the positions these cases imply."""
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
        return out.contiguous(), lse.contiguous()  # the kernels' own layouts: the fake's strides
    if q.device.type == "cuda" and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        from .kernels.score import fused_lse  # CUDA only: Triton is imported with the kernels

        return fused_lse(q, k, v, scale, causal)
    k_pos = torch.arange(k.shape[2], device=q.device)[None].expand(q.shape[0], -1)
    q_pos = k_pos[:, -q.shape[2]:] if causal else torch.full((q.shape[0], q.shape[2]), k.shape[2], device=q.device)
    return attention(q, k, v, q_pos, k_pos, scale, 0), log_normalizers(q, k, q_pos, k_pos, scale, 0)


def visible_logits(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sliding_window: int,
                   slots: int | None = None):
    """Yield (row, queries, logits) over each batch row and chunk of queries that see something: `queries` [c]
    indexes them in q, logits [Hkv, G, c, width] float32 are their scaled logits, -inf where not seen, over the
    first `slots` keys (None: all). Keys past the chunk's last seen slot (causality) are left out; chunks bound
    memory at about 256 MB of logits."""
    b, hq, length, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    chunk = max(1, 2**26 // max(hq * s, 1))
    for row in range(b):
        keys = k[row].float().transpose(-1, -2)[:, None]  # [Hkv, 1, D, S]
        for start in range(0, length, chunk):
            seen = visibility(q_pos[row:row + 1, start:start + chunk], k_pos[row:row + 1], sliding_window)[0]
            active = seen.any(-1)
            if not bool(active.any()):
                continue
            width = min(int(seen.any(0).nonzero().max()) + 1, k.shape[2] if slots is None else slots)
            qs = (q[row, :, start:start + chunk][:, active].float() * scale).unflatten(0, (hkv, hq // hkv))
            logits = (qs @ keys[..., :width]).masked_fill_(~seen[active, :width], float("-inf"))
            yield row, start + active.nonzero()[:, 0], logits


def log_normalizers(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sliding_window: int) -> Tensor:
    """lse [B, Hq, L] float32 as `attention_lse` defines it, from the logits alone."""
    lse = torch.full(q.shape[:3], float("-inf"), device=q.device)
    for row, queries, logits in visible_logits(q, k, q_pos, k_pos, scale, sliding_window):
        lse[row, :, queries] = logits.logsumexp(-1).flatten(0, 1)
    return lse


# --------------------------------------------------------------------------------------------- scoring
@torch.library.custom_op("entropykv::score", mutates_args=())
def score(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
          sliding_window: int) -> tuple[Tensor, Tensor, Tensor]:
    """Entropy and token importance from the observation window.

    q holds the last W queries of the prompt. Returns float32 tensors:
      entropy [B, Hq]: per head, mean over valid window queries of H = -sum_j p_j log p_j (nats);
      kv_scores [B, Hkv, S]: attention mass each slot receives, summed over window queries and over the
        query heads sharing each KV head (GQA-aware);
      layer_scores [B, S]: the same summed over all heads of the layer.
    Memory is O(W * S) per KV-head group: the full S x S attention is never formed.
    """
    _check_qkv("entropykv.score", q, k, None, q_pos, k_pos)
    b, hq, w, _ = q.shape
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    seen = visibility(q_pos, k_pos, sliding_window)[:, None]  # [B, 1, W, S]
    valid_q = seen.any(-1)  # [B, 1, W]
    n_valid = valid_q.sum(-1).clamp(min=1).float()  # [B, 1]
    entropy = q.new_zeros(b, hq, dtype=torch.float32)
    kv_scores = q.new_zeros(b, hkv, s, dtype=torch.float32)
    for h in range(hkv):  # one KV-head group at a time bounds memory at B * group * W * S floats
        qg = q[:, h * group:(h + 1) * group].float()
        logits = (qg @ k[:, h:h + 1].float().transpose(-1, -2)) * scale
        logits = logits.masked_fill(~seen, float("-inf"))
        logp = torch.log_softmax(logits, dim=-1).masked_fill(~seen, 0.0)
        p = logp.exp() * seen
        ent = -(p * logp).sum(-1) * valid_q  # [B, G, W]
        entropy[:, h * group:(h + 1) * group] = ent.sum(-1) / n_valid
        kv_scores[:, h] = (p * valid_q[..., None]).sum(dim=(1, 2))
    return entropy, kv_scores, kv_scores.sum(1)


def _score_shapes(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Empty results shaped as the scoring ops': entropy [B, Hq], kv_scores [B, Hkv, S], layer_scores [B, S]."""
    b, hq = q.shape[:2]
    hkv, s = k.shape[1], k.shape[2]
    f32 = torch.float32
    return q.new_empty(b, hq, dtype=f32), q.new_empty(b, hkv, s, dtype=f32), q.new_empty(b, s, dtype=f32)


@score.register_fake
def _(q, k, q_pos, k_pos, scale, sliding_window):
    _check_qkv("entropykv.score", q, k, None, q_pos, k_pos)
    return _score_shapes(q, k)


# --------------------------------------------------------------------------------------------- reconstruction
def context_queries(q_pos: Tensor, repeat_tokens: int, chunk: int) -> Tensor:
    """`q_pos` [B, T] of a reconstruction prefill (`entropykv_fx.reconstruct`) with every query past the prompt's
    columns set to -1 (invalid), for statistics that describe the prompt alone."""
    length = prompt_columns(q_pos.shape[-1], repeat_tokens, chunk)
    return torch.cat([q_pos[:, :length], torch.full_like(q_pos[:, length:], -1)], -1)


def _check_reconstruction(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, window: int, repeat_tokens: int,
                          chunk: int, lse: Tensor | None, op: str = "entropykv.score_reconstruction") -> None:
    _check_qkv(op, q, k, None, q_pos, k_pos)
    _check(window >= 1 and repeat_tokens >= 0 and chunk >= 1, f"{op}: window and chunk must be >= 1 and "
           f"repeat_tokens >= 0, got {window}, {chunk} and {repeat_tokens}")
    _check(q.shape[2] == k.shape[2], f"{op}: a reconstruction prefill's queries and keys are its columns, got "
           f"{q.shape[2]} queries and {k.shape[2]} keys")
    if isinstance(q.shape[2], int):  # symbolic lengths: checked when run
        length = prompt_columns(q.shape[2], repeat_tokens, chunk)
        _check(2 * length + -(-length // chunk) * repeat_tokens == q.shape[2],
               f"{op}: {q.shape[2]} columns are no reconstruction prefill's (2 L + ceil(L / {chunk}) x {repeat_tokens} "
               "for a prompt of L columns; lay it out with entropykv_fx.reconstruct.repeat_context)")
    _check_lse(op, q, lse)


def _prompt_layout(q_pos: Tensor, k_pos: Tensor, repeat_tokens: int, chunk: int) -> tuple[list[int], bool]:
    """(each row's prompt tokens, whether every row is unpadded with the prompt at positions 0, 1, ... in q_pos
    and k_pos alike) of a reconstruction prefill's positions, read on the host once per forward (`_remembered`)."""
    length = prompt_columns(q_pos.shape[-1], repeat_tokens, chunk)
    return _remembered("prompt_layout", q_pos, k_pos, (length,), lambda: _read_prompt_layout(q_pos, k_pos, length))


def _read_prompt_layout(q_pos: Tensor, k_pos: Tensor, length: int) -> tuple[list[int], bool]:
    prompt = q_pos[:, :length]
    plain = (prompt == torch.arange(length, device=q_pos.device)) & (k_pos[:, :length] == prompt)
    got = torch.cat([(prompt >= 0).sum(-1), plain.all()[None].long()]).tolist()  # one wait for the device
    return got[:-1], bool(got[-1]) and length > 0


def _segment_views(q_pos: Tensor, k_pos: Tensor, repeat_tokens: int, chunk: int):
    """Yield, per segment slot of a reconstruction prefill: (its columns [first, end), prefix: the prompt columns
    some row's segment sees, the prompt keys' positions with those past each row's chunk end hidden (-1), the
    slot's query positions with the repeat prompt and pads hidden (-1): the queries that score)."""
    length = prompt_columns(q_pos.shape[-1], repeat_tokens, chunk)
    n = (q_pos[:, :length] >= 0).sum(-1)
    tokens = _prompt_layout(q_pos, k_pos, repeat_tokens, chunk)[0]  # each segment's prefix is then known on the host
    for first, width, start in segments(length, repeat_tokens, chunk):
        end = start + (n - start).clamp(0, chunk)  # each row's chunk end, in its own positions
        # the prompt columns the rows with tokens in this chunk reach (the others' segments are all pads)
        prefix = max((length - t + min(t, start + chunk) for t in tokens if t > start), default=0)
        seen = k_pos[:, :prefix]
        seen = seen.masked_fill(seen >= end[:, None], -1)
        slot = q_pos[:, first:first + width]
        yield (first, first + width), prefix, seen, slot.masked_fill(slot < (end + repeat_tokens)[:, None], -1)


@torch.library.custom_op("entropykv::attention_reconstruction", mutates_args=())
def attention_reconstruction(q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float,
                             sliding_window: int, repeat_tokens: int, chunk: int) -> tuple[Tensor, Tensor]:
    """`attention_lse` of a reconstruction prefill (`entropykv_fx.reconstruct`): ([B, Hq, T, Dv], lse [B, Hq, T]).

    q [B, Hq, T, D], k, v [B, Hkv, T, D] and positions [B, T] are the prefill's T = 2L + K r columns (L: the
    prompt's; K segments of `chunk` tokens each after `repeat_tokens` repeat-prompt tokens). The prompt's queries
    attend to the prompt only (by positions, as `attention`); a segment's queries to the prompt up to the end of
    their row's chunk and to their own segment. Positions alone cannot express this (a segment shares its
    positions with the prompt's later tokens), so each segment runs two attentions merged by their normalizers
    (`merge_attention`): over the prompt before its chunk's end and causal over itself. Unpadded rows take fused
    kernels throughout (`fused_attention_lse`). Raises ValueError for shapes `attention` does not accept or a
    column count that is no reconstruction prefill's.
    """
    _check_reconstruction(q, k, q_pos, k_pos, 1, repeat_tokens, chunk, None, "entropykv.attention_reconstruction")
    length = prompt_columns(q.shape[2], repeat_tokens, chunk)
    # no window that cuts off a key: the farthest query sits at length + r + (last chunk) - 1
    if (sliding_window == 0 or sliding_window >= length + repeat_tokens + min(chunk, length)) and \
            _prompt_layout(q_pos, k_pos, repeat_tokens, chunk)[1]:
        # Unpadded rows: the layout fixes every segment's keys, so fused kernels run without position checks.
        outs = [fused_attention_lse(q[:, :, :length], k[:, :, :length], v[:, :, :length], scale, True)]
        for first, width, start in segments(length, repeat_tokens, chunk):
            end, slot = min(start + chunk, length), slice(first, first + width)
            outs.append(merge_attention(fused_attention_lse(q[:, :, slot], k[:, :, :end], v[:, :, :end], scale, False),
                                        fused_attention_lse(q[:, :, slot], k[:, :, slot], v[:, :, slot], scale, True)))
        return torch.cat([o for o, _ in outs], 2), torch.cat([lse for _, lse in outs], 2)
    outs = [attention_lse(q[:, :, :length], k[:, :, :length], v[:, :, :length], q_pos[:, :length],
                          k_pos[:, :length], scale, sliding_window)]
    for (first, end), prefix, seen, _ in _segment_views(q_pos, k_pos, repeat_tokens, chunk):
        slot = slice(first, end)
        # Two attentions merged by their normalizers, so neither copies keys and, for unpadded rows, each is one
        # fused kernel: over the prompt before the chunk's end (every query sees every key) and causal over itself.
        before = attention_lse(q[:, :, slot], k[:, :, :prefix], v[:, :, :prefix], q_pos[:, slot], seen, scale,
                               sliding_window)
        own = attention_lse(q[:, :, slot], k[:, :, slot], v[:, :, slot], q_pos[:, slot], k_pos[:, slot], scale,
                            sliding_window)
        outs.append(merge_attention(before, own))
    return torch.cat([o for o, _ in outs], 2), torch.cat([lse for _, lse in outs], 2)


def merge_attention(a: tuple[Tensor, Tensor], b: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """(out, lse) of attention over the union of two disjoint key sets from each one's (out [B, H, L, Dv], lse
    [B, H, L] float32): the softmax weights each part by exp(its lse - the union's). A query that sees neither
    (lse -inf in both) gets zeros and -inf."""
    lse = torch.logaddexp(a[1], b[1])
    out = sum(torch.where(part_lse.isneginf(), 0.0, (part_lse - lse).exp())[..., None] * part.float()
              for part, part_lse in (a, b))
    return out.to(a[0].dtype), lse


@attention_reconstruction.register_fake
def _(q, k, v, q_pos, k_pos, scale, sliding_window, repeat_tokens, chunk):
    _check_reconstruction(q, k, q_pos, k_pos, 1, repeat_tokens, chunk, None, "entropykv.attention_reconstruction")
    return q.new_empty(*q.shape[:3], v.shape[-1]), q.new_empty(q.shape[:3], dtype=torch.float32)


def _check_lse(op: str, q: Tensor, lse: Tensor | None) -> None:
    if lse is not None:
        _check(lse.shape == q.shape[:3] and lse.dtype == torch.float32 and lse.device == q.device,
               f"{op}: lse must be float32 [B, Hq, L]={tuple(q.shape[:3])} on {q.device}, got {lse.dtype} "
               f"{tuple(lse.shape)} on {lse.device}")


def _check_max_attention(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, slots: int, lse: Tensor | None) -> None:
    _check_qkv("entropykv.max_attention", q, k, None, q_pos, k_pos)
    _check(0 <= slots <= k.shape[2], f"entropykv.max_attention: slots must be in 0..{k.shape[2]} (the keys), got {slots}")
    _check_lse("entropykv.max_attention", q, lse)


@torch.library.custom_op("entropykv::max_attention", mutates_args=())
def max_attention(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sliding_window: int,
                  slots: int, lse: Tensor | None = None) -> Tensor:
    """The largest attention probability each of the first `slots` key slots receives: [B, Hkv, slots] float32.

    Probabilities are softmaxes over all the slots each query sees (by position, as `attention`); the largest is
    taken over the valid queries of q [B, Hq, L, D] and the query heads sharing each KV head. Queries that see
    nothing add nothing. lse: the queries' softmax normalizers as `attention_lse` returns them, when the caller
    has them (the probabilities then need one pass over the keys instead of two); None: computed here.
    Memory is bounded by chunking the queries (`visible_logits`).
    """
    _check_max_attention(q, k, q_pos, k_pos, slots, lse)
    hkv = k.shape[1]
    out = q.new_zeros(q.shape[0], hkv, slots, dtype=torch.float32)
    for row, queries, logits in visible_logits(q, k, q_pos, k_pos, scale, sliding_window,
                                               None if lse is None else slots):
        if lse is None:
            p = torch.softmax(logits, dim=-1)[..., :slots].amax(dim=(1, 2))
        else:  # only the scored slots' logits; exp is monotonic: the largest log-probability, then one exp per slot
            p = logits.sub_(lse[row][:, queries].unflatten(0, (hkv, -1))[..., None]).amax(dim=(1, 2)).exp()
        out[row, :, :p.shape[-1]] = torch.maximum(out[row, :, :p.shape[-1]], p)
    return out


@max_attention.register_fake
def _(q, k, q_pos, k_pos, scale, sliding_window, slots, lse=None):
    _check_max_attention(q, k, q_pos, k_pos, slots, lse)
    return q.new_empty(q.shape[0], k.shape[1], slots, dtype=torch.float32)


@torch.library.custom_op("entropykv::score_reconstruction", mutates_args=())
def score_reconstruction(q: Tensor, k: Tensor, q_pos: Tensor, k_pos: Tensor, scale: float, sliding_window: int,
                         window: int, repeat_tokens: int, chunk: int, lse: Tensor | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """Token scores by context reconstruction (KVzip, Kim et al. 2025, https://arxiv.org/abs/2505.23416).

    q [B, Hq, T, D], k [B, Hkv, T, D] and positions [B, T] are a reconstruction prefill's T = 2L + K r columns
    (`entropykv_fx.reconstruct`: the prompt's L, then per chunk of `chunk` prompt tokens `repeat_tokens` repeat-prompt
    tokens and the chunk again). Returns float32 tensors shaped as `score`'s:
      entropy [B, Hq]: `score`'s entropy over the prompt's last `window` queries (what a prefill of the prompt
        alone measures, up to rounding);
      kv_scores [B, Hkv, T]: for the prompt's slots, the largest attention probability each receives from a query
        of a repeated chunk (`max_attention`; a repeated chunk sees the prompt up to its end: a slot needed to
        reproduce the prompt scores high); 0 for the other slots, which the runtime drops;
      layer_scores [B, T]: the largest of kv_scores over the KV heads.
    lse [B, Hq, T]: the queries' softmax normalizers from the prefill's own attention (`attention_reconstruction`),
    so the repeated queries' probabilities cost one pass over the keys; None: computed here.
    """
    _check_reconstruction(q, k, q_pos, k_pos, window, repeat_tokens, chunk, lse)
    b, hq, _, d = q.shape
    length = prompt_columns(q.shape[2], repeat_tokens, chunk)
    n = (q_pos[:, :length] >= 0).sum(-1)
    pos_win = n[:, None] - window + torch.arange(window, device=q.device)
    col_win = (length - n[:, None] + pos_win).clamp(0, length - 1)
    entropy = score(q.gather(2, col_win[:, None, :, None].expand(b, hq, window, d)), k[:, :, :length],
                    pos_win.masked_fill(pos_win < 0, -1), k_pos[:, :length], scale, sliding_window)[0]
    kv_scores = q.new_zeros(b, k.shape[1], k.shape[2], dtype=torch.float32)
    for (first, end), prefix, seen, scoring in _segment_views(q_pos, k_pos, repeat_tokens, chunk):
        slot = slice(first, end)
        if lse is None:  # the normalizers over everything the segment sees: its own keys too
            keys, key_pos, slot_lse = torch.cat([k[:, :, :prefix], k[:, :, slot]], 2), \
                torch.cat([seen, k_pos[:, slot]], 1), None
        else:
            keys, key_pos, slot_lse = k[:, :, :prefix], seen, lse[:, :, slot]
        got = max_attention(q[:, :, slot], keys, scoring, key_pos, scale, sliding_window, prefix, slot_lse)
        kv_scores[..., :prefix] = torch.maximum(kv_scores[..., :prefix], got)
    return entropy, kv_scores, kv_scores.amax(1)


@score_reconstruction.register_fake
def _(q, k, q_pos, k_pos, scale, sliding_window, window, repeat_tokens, chunk, lse=None):
    _check_reconstruction(q, k, q_pos, k_pos, window, repeat_tokens, chunk, lse)
    return _score_shapes(q, k)


# --------------------------------------------------------------------------------------------- selection
def _check_select(scores: Tensor, k_pos: Tensor, budget: int, sink_tokens: int, window: int) -> None:
    _check(scores.dim() in (2, 3), f"entropykv.select: scores must be [B, S] or [B, H, S], got {tuple(scores.shape)}")
    _check(k_pos.dim() == 2 and k_pos.shape[0] == scores.shape[0] and k_pos.shape[1] == scores.shape[-1],
           f"entropykv.select: k_pos {tuple(k_pos.shape)} does not match scores {tuple(scores.shape)}")
    _check(budget >= 1, f"entropykv.select: budget must be >= 1, got {budget}")
    _check(sink_tokens >= 0 and window >= 0, "entropykv.select: sink_tokens and window must be >= 0")
    _check(scores.device == k_pos.device, f"entropykv.select: scores on {scores.device}, k_pos on {k_pos.device}")


def selection_ranks(scores: Tensor, k_pos: Tensor, sink_tokens: int, window: int) -> Tensor:
    """float32 scores [B, S] or [B, H, S] as `select` ranks them: sinks and the last `window` positions of
    each row +inf (always kept), empty/pad slots (k_pos < 0) -inf (taken last)."""
    last = k_pos.max(-1, keepdim=True).values
    forced = (k_pos >= 0) & ((k_pos < sink_tokens) | (k_pos > last - window))
    pads = k_pos < 0
    if scores.dim() == 3:
        forced, pads = forced[:, None], pads[:, None]
    return scores.float().masked_fill(pads, float("-inf")).masked_fill(forced, float("inf"))


@torch.library.custom_op("entropykv::select", mutates_args=())
def select(scores: Tensor, k_pos: Tensor, budget: int, sink_tokens: int, window: int) -> Tensor:
    """Indices of the `budget` slots to keep, in ascending (temporal) order.

    scores [B, S] (one token set per layer) or [B, H, S] (one per head); k_pos [B, S].
    The first `sink_tokens` positions and the last `window` positions of each sequence are always kept;
    empty/pad slots (k_pos < 0) are taken only when a sequence has fewer valid tokens than `budget`.
    Ties go to the earlier slot. Returns int64 [B, K] or [B, H, K] with K = min(budget, S).
    """
    _check_select(scores, k_pos, budget, sink_tokens, window)
    order = torch.sort(selection_ranks(scores, k_pos, sink_tokens, window), dim=-1, descending=True, stable=True).indices
    kept = order[..., : min(budget, scores.shape[-1])]
    return kept.sort(dim=-1).values


@select.register_fake
def _(scores, k_pos, budget, sink_tokens, window):
    _check_select(scores, k_pos, budget, sink_tokens, window)
    return scores.new_empty(*scores.shape[:-1], min(budget, scores.shape[-1]), dtype=torch.int64)


# --------------------------------------------------------------------------------------------- gather
def _check_gather(k: Tensor, v: Tensor, idx: Tensor) -> None:
    _check(k.dim() == 4 and v.shape[:3] == k.shape[:3], f"entropykv.gather: k {tuple(k.shape)} / v {tuple(v.shape)} must be [B, H, S, D]")
    _check(k.device == v.device == idx.device, "entropykv.gather: k, v and idx must be on one device")
    _check(idx.dtype == torch.int64, f"entropykv.gather: idx must be int64, got {idx.dtype}")
    _check(idx.dim() in (2, 3) and idx.shape[0] == k.shape[0] and (idx.dim() == 2 or idx.shape[1] == k.shape[1]),
           f"entropykv.gather: idx must be [B, K] or [B, H, K] for k {tuple(k.shape)}, got {tuple(idx.shape)}")


@torch.library.custom_op("entropykv::gather", mutates_args=())
def gather(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Copy the kept slots of k and v [B, H, S, D] into the compressed layout [B, H, K, D].

    idx is [B, K] (one token set shared by all heads of the layer) or [B, H, K] (per head).
    """
    _check_gather(k, v, idx)
    per_head = idx if idx.dim() == 3 else idx[:, None].expand(-1, k.shape[1], -1)
    return (k.gather(2, per_head[..., None].expand(-1, -1, -1, k.shape[-1])),
            v.gather(2, per_head[..., None].expand(-1, -1, -1, v.shape[-1])))


@gather.register_fake
def _(k, v, idx):
    _check_gather(k, v, idx)
    kk = idx.shape[-1]
    return k.new_empty(*k.shape[:2], kk, k.shape[-1]), v.new_empty(*v.shape[:2], kk, v.shape[-1])


# ------------------------------------------------------------------------------------- gated MLP in token chunks
GATED_ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu, "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


def _check_gated_mlp(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor, activation: str,
                     chunk: int) -> None:
    _check(activation in GATED_ACTIVATIONS, f"entropykv.gated_mlp: activation {activation!r} is not one of "
           f"{sorted(GATED_ACTIVATIONS)}")
    _check(chunk >= 1, f"entropykv.gated_mlp: chunk must be >= 1 token, got {chunk}")
    hidden = x.shape[-1]
    _check(gate_weight.dim() == up_weight.dim() == down_weight.dim() == 2
           and gate_weight.shape == up_weight.shape and gate_weight.shape[1] == hidden
           and down_weight.shape[1] == gate_weight.shape[0],
           f"entropykv.gated_mlp: weights gate {tuple(gate_weight.shape)}, up {tuple(up_weight.shape)}, down "
           f"{tuple(down_weight.shape)} must be [I, {hidden}], [I, {hidden}], [H_out, I] for x {tuple(x.shape)}")


@torch.library.custom_op("entropykv::gated_mlp", mutates_args=())
def gated_mlp(x: Tensor, gate_weight: Tensor, up_weight: Tensor, down_weight: Tensor, activation: str,
              chunk: int) -> Tensor:
    """The gated MLP of Llama-family layers, down(act(gate(x)) * up(x)), `chunk` tokens at a time.

    x [..., H]; gate_weight and up_weight [I, H]; down_weight [H_out, I]; activation "silu" or "gelu_tanh"; chunk in
    tokens (rows of x flattened). Result [..., H_out], each row what the unchunked MLP gives it. A prefill of n
    tokens then holds its three [n, I] intermediates (I is 3.5x H in Llama-3-8B) for `chunk` tokens at a time
    instead of all n: at 128k tokens that is most of a prefill's activation memory.
    """
    _check_gated_mlp(x, gate_weight, up_weight, down_weight, activation, chunk)
    act = GATED_ACTIVATIONS[activation]
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape[0], down_weight.shape[0])
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk]
        out[start:start + chunk] = F.linear(act(F.linear(part, gate_weight)) * F.linear(part, up_weight), down_weight)
    return out.view(*x.shape[:-1], down_weight.shape[0])


@gated_mlp.register_fake
def _(x, gate_weight, up_weight, down_weight, activation, chunk):
    _check_gated_mlp(x, gate_weight, up_weight, down_weight, activation, chunk)
    return x.new_empty(*x.shape[:-1], down_weight.shape[0])


# ------------------------------------------------------------------------------------- RMSNorm in token chunks
def _check_rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype, chunk: int) -> None:
    _check(chunk >= 1, f"entropykv.rms_norm: chunk must be >= 1 token, got {chunk}")
    _check(eps >= 0, f"entropykv.rms_norm: eps must be >= 0, got {eps}")
    _check(x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1],
           f"entropykv.rms_norm: weight {tuple(weight.shape)} must be [{x.shape[-1] if x.dim() else '?'}] for x "
           f"{tuple(x.shape)} (one scale per feature of the last dimension)")


@torch.library.custom_op("entropykv::rms_norm", mutates_args=())
def rms_norm(x: Tensor, weight: Tensor, eps: float, dtype: torch.dtype, chunk: int) -> Tensor:
    """RMSNorm as Llama-family layers write it, weight * (x / sqrt(mean(x^2) + eps)).to(dtype) with the
    normalization in float32, `chunk` tokens at a time.

    x [..., H]; weight [H]; eps >= 0; dtype: the type the normalized rows are cast to before the scale (the
    layer's input dtype); chunk in tokens (rows of x flattened). Result [..., H] in the type of weight times
    `dtype`, each row what the unchunked formula gives it. Unchunked, a norm holds two float32 copies of its input:
    8 GiB for the 262k positions of a 128k-token reconstruction prefill in Llama-3-8B.
    """
    _check_rms_norm(x, weight, eps, dtype, chunk)
    rows = x.reshape(-1, x.shape[-1])
    out = rows.new_empty(rows.shape, dtype=torch.promote_types(weight.dtype, dtype))
    for start in range(0, rows.shape[0], chunk):
        part = rows[start:start + chunk].to(torch.float32)
        out[start:start + chunk] = weight * (part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return out.view(x.shape)


@rms_norm.register_fake
def _(x, weight, eps, dtype, chunk):
    _check_rms_norm(x, weight, eps, dtype, chunk)
    return x.new_empty(x.shape, dtype=torch.promote_types(weight.dtype, dtype))


# --------------------------------------------------------------------------------------------- cache append
def _check_append(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor, new_pos: Tensor) -> None:
    _check(keys.dim() == 4 and k_new.dim() == 4, f"entropykv.append: keys {tuple(keys.shape)} and k_new "
           f"{tuple(k_new.shape)} must be 4-D [B, Hkv, S, D]")
    _check(keys.shape[:2] == k_new.shape[:2] and keys.shape[-1] == k_new.shape[-1]
           and values.shape[:2] == v_new.shape[:2] and values.shape[-1] == v_new.shape[-1],
           f"entropykv.append: new entries k {tuple(k_new.shape)} / v {tuple(v_new.shape)} do not match the cache "
           f"k {tuple(keys.shape)} / v {tuple(values.shape)} outside the slot dimension")
    _check(k_new.shape[2] == v_new.shape[2] == new_pos.shape[-1] and keys.shape[2] == values.shape[2] == positions.shape[-1],
           "entropykv.append: slot counts of keys, values and positions differ")
    _check(keys.dtype == k_new.dtype and values.dtype == v_new.dtype,
           f"entropykv.append: dtype mismatch, cache {keys.dtype} vs new {k_new.dtype}")
    _check(positions.dtype == new_pos.dtype == torch.int64, "entropykv.append: positions must be int64")


@torch.library.custom_op("entropykv::append", mutates_args=())
def append(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor, new_pos: Tensor,
           layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """Append new entries to a layer of the growing cache layout: (keys, values, positions) with L more slots.

    keys/values [B, Hkv, S, D], positions [B, S]; k_new/v_new [B, Hkv, L, D], new_pos [B, L] (-1 for pads).
    `layer` does not change the result: it names the cache layer, so the graph pass can pair each attention
    site with its cache (entropykv_fx.passes.rewrite_attention).
    """
    _check_append(keys, values, positions, k_new, v_new, new_pos)
    return torch.cat([keys, k_new], 2), torch.cat([values, v_new], 2), torch.cat([positions, new_pos], 1)


@append.register_fake
def _(keys, values, positions, k_new, v_new, new_pos, layer):
    _check_append(keys, values, positions, k_new, v_new, new_pos)
    n = keys.shape[2] + k_new.shape[2]
    return (keys.new_empty(*keys.shape[:2], n, keys.shape[-1]), values.new_empty(*values.shape[:2], n, values.shape[-1]),
            positions.new_empty(positions.shape[0], n))


@torch.library.custom_op("entropykv::write", mutates_args=())
def write(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor, new_pos: Tensor,
          slot: Tensor, layer: int) -> tuple[Tensor, Tensor, Tensor]:
    """The static-capacity twin of `append`: new entries go into slots slot..slot+L-1 of the same shapes.

    slot is an int64 scalar tensor (a tensor, so one compiled decode step serves every step); the result has
    the input's shapes, which is what static buffers, CUDA graphs and exported engines need.
    """
    _check_append(keys, values, positions, k_new, v_new, new_pos)
    if not (keys.is_cuda and torch.cuda.is_current_stream_capturing()):  # reading slot on the host would break a CUDA graph
        start = int(slot)
        _check(0 <= start and start + k_new.shape[2] <= keys.shape[2],
               f"entropykv.write: slots {start}..{start + k_new.shape[2] - 1} are outside the cache's "
               f"{keys.shape[2]} slots; export with a larger max_new_tokens")
    idx = slot + torch.arange(k_new.shape[2], device=keys.device)
    return keys.index_copy(2, idx, k_new), values.index_copy(2, idx, v_new), positions.index_copy(1, idx, new_pos)


@write.register_fake
def _(keys, values, positions, k_new, v_new, new_pos, slot, layer):
    _check_append(keys, values, positions, k_new, v_new, new_pos)
    return torch.empty_like(keys), torch.empty_like(values), torch.empty_like(positions)


@torch.library.custom_op("entropykv::write_in_place", mutates_args=("keys", "values", "positions", "fill"))
def write_in_place(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor, new_pos: Tensor,
                   fill: Tensor, layer: int) -> None:
    """One new entry per row (L = 1), written into the buffers themselves: the runtime's decode layout (a layer with
    room, `cache.CompressedLayer.reserve`), where a step must cost its entry's bytes, not a copy of the cache.

    Row b's entry goes into slot fill[b] % S (fill: [B] int64), and fill[b] counts it when it is a token (position
    >= 0; a pad's -1 is written there and the row's next token takes the same slot). `reserve` puts each row's held
    slots first, in position order, and its empty ones after them, so a full-attention layer fills its room in order
    and a sliding-window layer of `window` slots is a ring: once full, slot fill % window holds its oldest token,
    already out of every later query's window. No search over the slots and nothing read on the host, so the step
    can be replayed from a CUDA graph; the caller keeps count of the room.
    """
    _check_write_in_place(keys, values, positions, k_new, v_new, new_pos, fill)
    slot = (fill % positions.shape[-1])[:, None]  # [B, 1]
    index = slot[:, None, :, None].expand(-1, keys.shape[1], -1, keys.shape[-1])
    keys.scatter_(2, index, k_new)
    values.scatter_(2, index if values.shape[-1] == keys.shape[-1] else
                    slot[:, None, :, None].expand(-1, values.shape[1], -1, values.shape[-1]), v_new)
    positions.scatter_(1, slot, new_pos)
    fill.add_(new_pos[:, 0] >= 0)


def _check_write_in_place(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor,
                          new_pos: Tensor, fill: Tensor) -> None:
    _check_append(keys, values, positions, k_new, v_new, new_pos)
    _check(k_new.shape[2] == 1, f"entropykv.write_in_place: writes one entry per row, got {k_new.shape[2]}")
    _check(fill.shape == (keys.shape[0],) and fill.dtype == torch.int64 and fill.device == keys.device,
           f"entropykv.write_in_place: fill must be int64 [{keys.shape[0]}] on the cache's device, got "
           f"{fill.dtype} {tuple(fill.shape)} on {fill.device}")


@write_in_place.register_fake
def _(keys, values, positions, k_new, v_new, new_pos, fill, layer):
    _check_write_in_place(keys, values, positions, k_new, v_new, new_pos, fill)


@torch.library.custom_op("entropykv::headwise_cache", mutates_args=())
def headwise_cache(k_new: Tensor, keys: list[Tensor], values: list[Tensor], positions: list[Tensor],
                   key_scales: list[Tensor | None], value_scales: list[Tensor | None], new_pos: Tensor,
                   layer: int) -> tuple[Tensor, Tensor]:
    """The slots of a head-wise layer (one [B, 1, K_h, D] tensor per KV head, int8 with scales or not) as a dense
    [B, Hkv, max K_h, D] view in k_new's dtype, zero-padded.

    What a model's attention reads in a traced graph; the graph pass pairs it with the per-head slots it was made
    from and attends over those instead, after which the view is dead code and is never computed.
    """
    length = max(k.shape[2] for k in keys)

    def dense(parts: list[Tensor], scales: list[Tensor | None]) -> Tensor:
        parts = [p if s is None else dequantize_int8(p, s) for p, s in zip(parts, scales)]
        return torch.cat([F.pad(p.to(k_new.dtype), (0, 0, 0, length - p.shape[2])) for p in parts], 1)
    return dense(keys, key_scales), dense(values, value_scales)


@headwise_cache.register_fake
def _(k_new, keys, values, positions, key_scales, value_scales, new_pos, layer):
    length = keys[0].shape[2]
    for k in keys[1:]:
        length = torch.sym_max(length, k.shape[2])
    b, d, dv = k_new.shape[0], k_new.shape[-1], values[0].shape[-1]
    return k_new.new_empty(b, len(keys), length, d), k_new.new_empty(b, len(values), length, dv)


# --------------------------------------------------------------------------------------------- packed heads
def _check_packed(op: str, q: Tensor, keys: Tensor, values: Tensor, q_pos: Tensor, positions: Tensor,
                  starts: Tensor) -> None:
    _check(keys.dim() == 3 and values.dim() == 3 and keys.shape[:2] == values.shape[:2],
           f"{op}: keys/values must be [B, T, D] and [B, T, Dv] with one T, got {tuple(keys.shape)}, "
           f"{tuple(values.shape)}")
    _check(starts.dim() == 1 and starts.numel() >= 2 and starts.dtype == torch.int64 and starts.device == keys.device,
           f"{op}: starts must be int64 [Hkv + 1] on the cache's device, got {starts.dtype} {tuple(starts.shape)} "
           f"on {starts.device}")
    like_q = q.new_empty(()).expand  # checks the rest as `attention` would: q's dtype, Hkv heads of T slots
    _check(keys.dtype == values.dtype == q.dtype, f"{op}: dtype mismatch, q is {q.dtype} but keys/values are "
           f"{keys.dtype}/{values.dtype}")
    _check_qkv(op, q, like_q(keys.shape[0], starts.numel() - 1, keys.shape[1], keys.shape[2]), None, q_pos, positions)


def packed_segments(starts: Tensor, slots: int) -> list[tuple[int, int]]:
    """Each KV head's slot range (start, end) from `starts` [Hkv + 1] (read on the host), checked to tile 0..slots."""
    bounds = starts.tolist()
    _check(bounds[0] == 0 and bounds[-1] == slots and all(a <= b for a, b in itertools.pairwise(bounds)),
           f"entropykv: starts must rise from 0 to the {slots} packed slots, got {bounds}")
    return list(itertools.pairwise(bounds))


@torch.library.custom_op("entropykv::attention_packed", mutates_args=())
def attention_packed(q: Tensor, keys: Tensor, values: Tensor, q_pos: Tensor, positions: Tensor, starts: Tensor,
                     scale: float, sliding_window: int) -> Tensor:
    """`attention` over a packed head-wise layer (`headwise.PackedHeads`): KV head h holds the slots
    starts[h]..starts[h+1]-1 of keys [B, T, D], values [B, T, Dv] and positions [B, T] (-1 = empty), so heads of
    different lengths share one buffer with no padding between them. q [B, Hq, L, D], q_pos [B, L], starts
    [Hkv + 1] int64 with Hq a multiple of Hkv; returns [B, Hq, L, Dv]. Raises ValueError on mismatched shapes,
    dtypes or devices, and (reference) on starts that do not tile 0..T.
    """
    _check_packed("entropykv.attention_packed", q, keys, values, q_pos, positions, starts)
    segments = packed_segments(starts, keys.shape[1])
    group = q.shape[1] // len(segments)
    return torch.cat([attention(q[:, h * group:(h + 1) * group], keys[:, None, a:e], values[:, None, a:e], q_pos,
                                positions[:, a:e], scale, sliding_window) for h, (a, e) in enumerate(segments)], 1)


@attention_packed.register_fake
def _(q, keys, values, q_pos, positions, starts, scale, sliding_window):
    _check_packed("entropykv.attention_packed", q, keys, values, q_pos, positions, starts)
    return q.new_empty(*q.shape[:3], values.shape[-1])


def _check_write_heads(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor,
                       new_pos: Tensor, starts: Tensor, fill: Tensor) -> None:
    op = "entropykv.write_heads_in_place"
    hkv = starts.numel() - 1
    _check(k_new.dim() == 4 and k_new.shape[1:3] == (hkv, 1) and v_new.shape[:3] == k_new.shape[:3],
           f"{op}: k_new/v_new must be [B, Hkv={hkv}, 1, D], got {tuple(k_new.shape)}, {tuple(v_new.shape)}")
    _check_packed(op, k_new.new_empty(()).expand(k_new.shape[0], hkv, 1, k_new.shape[-1]), keys, values, new_pos,
                  positions, starts)
    _check(v_new.shape[-1] == values.shape[-1] and v_new.dtype == values.dtype,
           f"{op}: v_new {v_new.dtype} {tuple(v_new.shape)} does not match values {values.dtype} {tuple(values.shape)}")
    _check(fill.shape == (keys.shape[0], hkv) and fill.dtype == torch.int64 and fill.device == keys.device,
           f"{op}: fill must be int64 [{keys.shape[0]}, {hkv}] on the cache's device, got {fill.dtype} "
           f"{tuple(fill.shape)} on {fill.device}")


@torch.library.custom_op("entropykv::write_heads_in_place",
                         mutates_args=("keys", "values", "positions", "fill"))
def write_heads_in_place(keys: Tensor, values: Tensor, positions: Tensor, k_new: Tensor, v_new: Tensor,
                         new_pos: Tensor, starts: Tensor, fill: Tensor, layer: int) -> None:
    """`write_in_place` for a packed head-wise layer: row b's entry of KV head h (k_new/v_new [B, Hkv, 1, D])
    goes into slot starts[h] + fill[b, h] % (starts[h+1] - starts[h]) of keys/values [B, T, D] and positions
    [B, T], and fill [B, Hkv] (int64) counts it when it is a token (new_pos [B, 1] >= 0); every segment needs at
    least one slot. Nothing is read on the
    host, so the step can be replayed from a CUDA graph; the caller keeps count of the room.
    """
    _check_write_heads(keys, values, positions, k_new, v_new, new_pos, starts, fill)
    slot = starts[:-1] + fill % (starts[1:] - starts[:-1])  # [B, Hkv]
    keys.scatter_(1, slot[..., None].expand(-1, -1, keys.shape[-1]), k_new[:, :, 0])
    values.scatter_(1, slot[..., None].expand(-1, -1, values.shape[-1]), v_new[:, :, 0])
    positions.scatter_(1, slot, new_pos.expand(-1, slot.shape[1]))
    fill.add_(new_pos >= 0)


@write_heads_in_place.register_fake
def _(keys, values, positions, k_new, v_new, new_pos, starts, fill, layer):
    _check_write_heads(keys, values, positions, k_new, v_new, new_pos, starts, fill)


@torch.library.custom_op("entropykv::packed_cache", mutates_args=())
def packed_cache(keys: Tensor, values: Tensor, positions: Tensor, starts: Tensor, new_pos: Tensor,
                 layer: int) -> tuple[Tensor, Tensor]:
    """A packed head-wise layer as a dense [B, Hkv, T, D] view (head h's slots first, zeros after): what a model's
    attention reads in a traced graph. As with `headwise_cache`, the graph pass pairs it with the packed buffers and
    attends over those (`attention_packed`), so the view is dead code and never computed."""
    dense = [torch.zeros(keys.shape[0], starts.numel() - 1, *t.shape[1:], dtype=t.dtype, device=t.device)
             for t in (keys, values)]
    for h, (a, e) in enumerate(packed_segments(starts, keys.shape[1])):
        for d, t in zip(dense, (keys, values)):
            d[:, h, :e - a] = t[:, a:e]
    return dense[0], dense[1]


@packed_cache.register_fake
def _(keys, values, positions, starts, new_pos, layer):
    hkv = starts.numel() - 1
    return keys.new_empty(keys.shape[0], hkv, *keys.shape[1:]), values.new_empty(values.shape[0], hkv, *values.shape[1:])


# =============================================================================================================
# int8 storage and the Triton kernels (owned by entropykv_fx/kernels; keep this section last)
# =============================================================================================================
def quantize_int8(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token absmax int8: x [..., D] -> (q int8 [..., D], scale float32 [...]) with x ~= q * scale.

    q = round-half-away-from-zero(x / absmax * 127); a zero row gets q = 0, scale 0. The kernels use the same arithmetic.
    Dividing by absmax first keeps |x / absmax| <= 1 for any row, however tiny (127 / absmax would overflow, and a
    clamp of absmax would mis-scale rows below it).
    """
    amax = x.float().abs().amax(-1)
    y = x.float() / torch.where(amax > 0, amax, 1.0)[..., None] * 127.0
    return torch.trunc(y + torch.where(y >= 0, 0.5, -0.5)).to(torch.int8), amax / 127.0


def dequantize_int8(q: Tensor, scale: Tensor) -> Tensor:
    return q.float() * scale[..., None]


@torch.library.custom_op("entropykv::gather_int8", mutates_args=())
def gather_int8(k: Tensor, v: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`gather` that stores int8: (k_q [B, H, K, D] int8, k_scale [B, H, K] float32, v_q, v_scale)."""
    kk, vv = gather(k, v, idx)
    return *quantize_int8(kk), *quantize_int8(vv)


@gather_int8.register_fake
def _(k, v, idx):
    _check_gather(k, v, idx)
    b, h, kk = *k.shape[:2], idx.shape[-1]
    scale = k.new_empty(b, h, kk, dtype=torch.float32)
    return (k.new_empty(b, h, kk, k.shape[-1], dtype=torch.int8), scale,
            v.new_empty(b, h, kk, v.shape[-1], dtype=torch.int8), torch.empty_like(scale))


def _check_int8_cache(op: str, q: Tensor, k_q: Tensor, k_scale: Tensor, v_q: Tensor, v_scale: Tensor,
                      q_pos: Tensor, k_pos: Tensor) -> None:
    for t, s in ((k_q, k_scale), (v_q, v_scale)):
        _check(t.dim() == 4 and t.dtype == torch.int8, f"{op}: k_q/v_q must be 4-D int8, got {t.dtype} {tuple(t.shape)}")
        _check(s.dtype == torch.float32 and s.shape == t.shape[:3],
               f"{op}: scales must be float32 {tuple(t.shape[:3])}, got {s.dtype} {tuple(s.shape)}")
        _check(t.device == s.device == q.device, f"{op}: q, k_q/v_q and scales must be on one device")
    like_q = q.new_empty(()).expand  # q's dtype and device with the cache's shape, no memory
    _check_qkv(op, q, like_q(k_q.shape), like_q(v_q.shape), q_pos, k_pos)


@torch.library.custom_op("entropykv::attention_int8", mutates_args=())
def attention_int8(q: Tensor, k_q: Tensor, k_scale: Tensor, v_q: Tensor, v_scale: Tensor, q_pos: Tensor,
                   k_pos: Tensor, scale: float, sliding_window: int) -> Tensor:
    """`attention` over an int8 cache from `gather_int8`: dequantized to float32, result in q's dtype."""
    _check_int8_cache("entropykv.attention_int8", q, k_q, k_scale, v_q, v_scale, q_pos, k_pos)
    out = attention(q.float(), dequantize_int8(k_q, k_scale), dequantize_int8(v_q, v_scale), q_pos, k_pos, scale,
                    sliding_window)
    return out.to(q.dtype)


@attention_int8.register_fake
def _(q, k_q, k_scale, v_q, v_scale, q_pos, k_pos, scale, sliding_window):
    _check_int8_cache("entropykv.attention_int8", q, k_q, k_scale, v_q, v_scale, q_pos, k_pos)
    return q.new_empty(*q.shape[:3], v_q.shape[-1])


try:  # CUDA tensors run the Triton kernels; the package works without triton (CPU references only)
    import triton  # noqa: F401
except ImportError:
    pass
else:
    from . import kernels  # noqa: E402,F401  (registers the CUDA implementations)
