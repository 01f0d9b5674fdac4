"""The compressed KV cache layout.

Each layer holds keys/values [B, Hkv, S_layer, D] with its own physical length S_layer, plus
`positions` [B, S_layer] (int64): the logical position of the token in each slot, -1 for a pad or filler
slot. Keys are cached after RoPE, so eviction never renumbers anything: a token generated after a
compressed prompt of n tokens gets position n however few slots the layers kept, and masks are derived
from positions (see `ops.visibility`). The cache is a `transformers.Cache`, so `generate()` drives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from . import ops


@dataclass
class PrefillStats:
    """What the scoring op measured for one layer during prefill (float32)."""

    entropy: Tensor  # [B, Hq] mean attention entropy of each head over the observation window
    kv_scores: Tensor  # [B, Hkv, S] token scores per KV head
    layer_scores: Tensor  # [B, S] token scores summed over all heads
    head_statistic: Tensor | None = None  # [B, H] a policy's own per-head measure (`Policy.prefill_statistic`)


class CompressedLayer(DynamicLayer):
    """A dynamic layer whose slots carry logical positions and which can be shrunk in place."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: Tensor | None = None
        self.stats: PrefillStats | None = None

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.int64, device=key_states.device)

    def update(self, key_states: Tensor, value_states: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values, self.positions = ops.append(self.keys, self.values, self.positions, key_states,
                                                            value_states, positions, layer)
        return self.keys, self.values

    def replace(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Swap in the compressed slots; the old tensors are released."""
        self.keys, self.values, self.positions = keys, values, positions

    def get_seq_length(self) -> int:
        return 0 if self.positions is None else self.positions.shape[-1]

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held (positions are reported separately by `index_nbytes`)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @property
    def index_nbytes(self) -> int:
        return 0 if self.positions is None else self.positions.numel() * self.positions.element_size()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("entropykv: a compressed cache cannot be cropped (assisted decoding is not supported)")


class EntropyKVCache(Cache):
    """Per-layer compressed caches plus the bookkeeping of logical positions.

    `get_seq_length()` is the logical length (tokens fed so far, pads included, as `generate()` counts
    them), not any layer's physical length; `next_positions` [B] is where each sequence continues.
    """

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[CompressedLayer() for _ in range(num_layers)])
        self.seen_tokens = 0
        self.next_positions: Tensor | None = None
        self.step_positions: Tensor | None = None

    def begin_step(self, positions: Tensor) -> None:
        """Record the positions [B, L] (-1 for pads) of the tokens the coming forward appends."""
        if self.next_positions is not None and positions.shape[0] != self.next_positions.shape[0]:
            raise ValueError(f"entropykv: batch size changed from {self.next_positions.shape[0]} to "
                             f"{positions.shape[0]} on a cache that already holds tokens")
        self.step_positions = positions
        self.seen_tokens += positions.shape[1]
        step_next = positions.max(-1).values + 1
        self.next_positions = step_next if self.next_positions is None else torch.maximum(self.next_positions, step_next)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        if self.step_positions is None:
            raise RuntimeError("entropykv: EntropyKVCache.update called outside an optimized model's forward")
        return self.layers[layer_idx].update(key_states, value_states, self.step_positions, layer_idx)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)

    def physical_lengths(self) -> list[int]:
        return [layer.get_seq_length() for layer in self.layers]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("entropykv: a compressed cache cannot be cropped (assisted decoding is not supported)")
