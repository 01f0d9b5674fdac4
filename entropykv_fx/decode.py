"""Fast greedy decode over a compressed cache: static buffers, one step that writes in place, a CUDA graph.

    model = entropykv_fx.optimize(model, budget=0.25)
    out = model(input_ids, use_cache=True)                          # prefill: scored and compressed
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    decoder = entropykv_fx.StaticDecoder(model, cache_of(out), max_new_tokens=128)   # compat.cache_of
    tokens = decoder.generate(first, steps=127)                     # the 127 tokens after `first`

Why: transformers' eager decode is bound by Python and kernel launches, not by bytes (60-75 ms/token for an
8B model on an H100, `benchmarks/speed.py`). Here the cache is copied once into buffers with room for the new
tokens, and each step (the model's own modules; keys and values written at each layer's next free slot; attention
by `entropykv::attention`, the Triton kernel on CUDA) touches only preallocated tensors, so on a GPU it is captured
once in a CUDA graph and replayed (8.5-10 ms/token there).

Decoder layouts of Llama, Mistral (sliding windows), Qwen2 and Qwen3 (q/k norms); a layer-wise cache
(`EntropyKVCache` from `optimize()`, or a plain `DynamicCache` = the full cache); batches with left padding.
`int8=True` stores keys and values as int8 with per-token scales (`entropykv::attention_int8`).
`inductor=True` compiles the step with Inductor first (norms, rotary, residual adds and the MLP's activation fused
into fewer kernels; one compile per cache shape), then captures that.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from . import ops

CacheLayers = Sequence[tuple[Tensor, Tensor, Tensor]]  # per layer: keys, values [B, Hkv, S, D], positions [B, S]


def _cache_layers(cache, attention_mask: Tensor | None, position_ids: Tensor | None) -> CacheLayers:
    layers = []
    for i, layer in enumerate(getattr(cache, "layers", ())):
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if not isinstance(keys, Tensor) or not isinstance(values, Tensor):
            raise ValueError(f"StaticDecoder: cache layer {i} ({type(layer).__name__}) holds no dense keys/values; "
                             "accepted: optimize()'s layer-wise cache or a DynamicCache (head-wise policies are not "
                             "supported)")
        positions = getattr(layer, "positions", None)
        if positions is None:  # a plain cache: its slots hold the prefill's last tokens
            positions = _plain_positions(keys, attention_mask, position_ids)
        layers.append((keys, values, positions))
    if not layers:
        raise ValueError(f"StaticDecoder: expected a cache with layers (EntropyKVCache or DynamicCache), got "
                         f"{type(cache).__name__}")
    return layers


def _plain_positions(keys: Tensor, attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
    """Logical positions [B, S] of a plain cache's slots: the prefill's `position_ids` (default: 0..S-1, what a
    transformers forward without them uses), pads (attention_mask 0) -1. Without a mask, only a batch of one is
    unambiguous."""
    b, s = keys.shape[0], keys.shape[2]
    if attention_mask is None and b > 1:
        raise ValueError("StaticDecoder: a plain cache of a batch does not record which slots are padding; pass "
                         "the prefill's attention_mask=[batch, length] (rows of equal length: all ones)")
    given = [t for t in (attention_mask, position_ids) if t is not None]
    total = given[0].shape[-1] if given else s  # tokens prefilled: a sliding-window layer holds the last s of them
    for name, t in (("attention_mask", attention_mask), ("position_ids", position_ids)):
        if t is not None and (t.dim() != 2 or t.shape[1] != total or t.shape[1] < s or t.shape[0] not in (1, b)):
            raise ValueError(f"StaticDecoder: {name} must be [batch, prefilled tokens] (>= the {s} cached), the same "
                             f"length for both; got {tuple(t.shape)}")
    positions = torch.arange(total, device=keys.device)[None] if position_ids is None else position_ids.to(keys.device)
    positions = positions[:, total - s:].expand(b, s)
    if attention_mask is None:
        return positions
    return positions.masked_fill(~attention_mask[:, total - s:].to(keys.device).bool(), -1)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    needed = ("q_proj", "k_proj", "v_proj", "o_proj")
    if layers is None or not hasattr(inner, "rotary_emb") or not all(
            hasattr(block, "self_attn") and all(hasattr(block.self_attn, p) for p in needed) for block in layers):
        raise ValueError(f"StaticDecoder: {type(model).__name__} does not have the decoder layout it supports "
                         "(Llama, Mistral, Qwen2, Qwen3: model.layers[i].self_attn.{q,k,v,o}_proj, model.rotary_emb)")
    return layers


class StaticDecoder:
    """Greedy decode of `model` continuing from `cache` (see the module docstring).

    copy=False uses the cache tensors themselves as the buffers (bf16/fp storage only; their empty slots, position
    -1, must come last): for callers that allocated the room already. For a plain `DynamicCache` (optimize()'s
    caches carry their positions), attention_mask [B, S] is the prefill's mask, needed for a batch (it tells the
    pads apart), and position_ids [B, S] the prefill's positions if it was given any (default 0..S-1).
    Raises ValueError for a cache or mask it cannot decode correctly.
    """

    def __init__(self, model: nn.Module, cache, max_new_tokens: int, *, int8: bool = False, copy: bool = True,
                 inductor: bool = False, attention_mask: Tensor | None = None,
                 position_ids: Tensor | None = None) -> None:
        from .hf import _sliding_windows

        blocks = _decoder_layers(model)
        layers = list(cache) if isinstance(cache, (list, tuple)) else _cache_layers(cache, attention_mask, position_ids)
        if len(layers) != len(blocks):
            raise ValueError(f"StaticDecoder: the cache has {len(layers)} layers, the model {len(blocks)}")
        if max_new_tokens < 1 and copy:
            raise ValueError(f"StaticDecoder: max_new_tokens must be >= 1, got {max_new_tokens}")
        if int8 and not copy:
            raise ValueError("StaticDecoder: int8=True quantizes a copy of the cache; use copy=True")
        self.model, self.int8, self.inductor = model, int8, inductor
        self.windows = _sliding_windows(model, blocks)
        self.buffers: list[tuple[Tensor, ...]] = []
        for keys, values, positions in layers:
            b, h, _, d = keys.shape
            positions = positions.expand(b, -1)
            if copy:
                positions = torch.cat([positions, positions.new_full((b, max_new_tokens), -1)], 1)
                keys, values = (torch.cat([t, t.new_zeros(b, h, max_new_tokens, t.shape[-1])], 2) for t in (keys, values))
            parts = [p for t in (keys, values) for p in (ops.quantize_int8(t) if int8 else (t,))]
            self.buffers.append((*parts, positions.contiguous()))
        # Each layer's first free slot (layers keep different numbers of tokens), and each row's next position.
        trailing = [int((layer[-1][0] < 0).flip(0).cumprod(0).sum()) for layer in self.buffers]
        self.slots = torch.tensor([[layer[-1].shape[1] - t] for layer, t in zip(self.buffers, trailing)],
                                  device=self.buffers[0][-1].device)
        self.room = min(trailing)
        self.position = torch.stack([layer[-1].max(-1).values for layer in self.buffers]).amax(0)[:, None] + 1
        self.token = torch.zeros_like(self.position)
        # int8: the step's new key and value are quantized by one gather_int8 of their only slot (one kernel, not
        # the dozen of elementwise ones that quantize_int8 costs twice per layer: 1.3 ms of a step on the H200)
        self._only_slot = torch.zeros(self.position.shape[0], 1, dtype=torch.long, device=self.position.device)
        self._start = (self.slots.clone(), self.position.clone())
        self._run: Callable[[], None] | None = None

    @property
    def kv_bytes(self) -> int:
        """Bytes of the occupied slots' keys, values (and scales) at construction: what a step reads, plus new tokens."""
        return sum(t[:, :, :int(kept)].nbytes for layer, kept in zip(self.buffers, self._start[0]) for t in layer[:-1])

    def step(self) -> Tensor:
        """Feed `self.token` at `self.position`: returns the logits [B, V]; the next token replaces `self.token`."""
        inner = self.model.model
        x = inner.embed_tokens(self.token)
        cos, sin = inner.rotary_emb(x, self.position)
        for block, layer, slot, window in zip(inner.layers, self.buffers, self.slots, self.windows):
            attn = block.self_attn
            h = block.input_layernorm(x)
            b, d = h.shape[0], attn.head_dim
            q, k, v = (proj(h).view(b, 1, -1, d) for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
            if hasattr(attn, "q_norm"):  # Qwen3 normalizes each head's queries and keys before the rotation
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            q, k = _rotate(q, k, cos, sin)
            parts = ops.gather_int8(k, v, self._only_slot) if self.int8 else (k, v)
            for buffer, part in zip(layer[:-1], parts):
                buffer.index_copy_(2, slot, part)
            layer[-1].index_copy_(1, slot, self.position)
            if self.int8:
                o = ops.attention_int8(q, *layer[:4], self.position, layer[4], attn.scaling, window)
            else:
                o = ops.attention(q, layer[0], layer[1], self.position, layer[2], attn.scaling, window)
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, -1))
            x = x + block.mlp(block.post_attention_layernorm(x))
        self.slots += 1
        self.position += 1
        logits = self.model.lm_head(inner.norm(x))[:, -1]
        self.token.copy_(logits.argmax(-1, keepdim=True))
        return logits

    def rewind(self) -> None:
        """Back to the state after construction (the slots written since are forgotten)."""
        self.slots.copy_(self._start[0])
        self.position.copy_(self._start[1])

    def compiled(self) -> Callable[[], None]:
        """One step as a callable: a CUDA graph replay on a GPU (captured on first use), else `step` (compiled by
        Inductor when `inductor=True`)."""
        if self._run is None:
            # dynamic=False: the buffers never change shape, so Inductor specializes every layer's slot count.
            step = torch.compile(self.step, dynamic=False) if self.inductor else self.step
            if self.token.device.type != "cuda":
                self._run = step
            else:
                state = (self.slots.clone(), self.position.clone(), self.token.clone())
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.no_grad(), torch.cuda.stream(stream):  # warm-up: kernels compile, lazy state initializes
                    step()
                torch.cuda.current_stream().wait_stream(stream)
                for buffer, saved in zip((self.slots, self.position, self.token), state):
                    buffer.copy_(saved)
                graph = torch.cuda.CUDAGraph()
                with torch.no_grad(), torch.cuda.graph(graph):  # recorded, not run: the state stays as it was
                    step()
                self._run = graph.replay
        return self._run

    def generate(self, token: Tensor, steps: int) -> Tensor:
        """The `steps` greedy tokens [B, steps] that follow `token` [B, 1] (the prefill's next token)."""
        if not 1 <= steps <= self.room:
            raise ValueError(f"StaticDecoder.generate: steps must be in 1..{self.room} (the room left in the "
                             f"buffers), got {steps}")
        run = self.compiled()
        self.token.copy_(token)
        out = []
        with torch.no_grad():
            for _ in range(steps):
                run()
                out.append(self.token.clone())
        return torch.cat(out, 1)


def _rotate(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin)
