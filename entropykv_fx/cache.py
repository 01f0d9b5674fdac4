"""The compressed KV cache layout.

Each layer holds keys/values [B, Hkv, S_layer, D] with its own physical length S_layer, plus
`positions` [B, S_layer] (int64): the logical position of the token in each slot, -1 for a pad or filler
slot. Keys are cached after RoPE, so eviction never renumbers anything: a token generated after a
compressed prompt of n tokens gets position n however few slots the layers kept, and masks are derived
from positions (see `ops.visibility`). The cache is a `transformers.Cache`, so `generate()` drives it.

Decode layout: a dense layer can `reserve` room, empty slots (position -1) after the ones it holds, that later
tokens are written into in place (`entropykv::write_in_place`: each row's next slot, in turn). A decode step
then costs its own entries' bytes instead of a copy of the whole cache, and its tensors keep their shapes and
addresses from step to step, which a CUDA graph of the step needs. A sliding-window layer gets exactly `window`
slots and never runs out: it is a ring whose oldest token, once it is full, no query can attend any more.
Each row's next slot is counted on the device (`fill`), so a step searches nothing.
`compact` returns a layer to the plain layout. Head-wise layers have their own decode layout, packed heads with room
after each (`headwise.PackedHeads`), behind the same `can_reserve` / `reserve` / `compact` / `buffers` protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from . import ops

_NEVER = 2**62  # sorts after every position: where `reserve` puts empty slots


@dataclass
class PrefillStats:
    """What the scoring op measured for one layer during prefill (float32)."""

    entropy: Tensor  # [B, Hq] mean attention entropy of each head over the observation window
    kv_scores: Tensor  # [B, Hkv, S] token scores per KV head
    layer_scores: Tensor  # [B, S] token scores summed over all heads
    head_statistic: Tensor | None = None  # [B, H] a policy's own per-head measure (`Policy.prefill_statistic`)
    # [B, S] the layer's token ranking, computed over every slot of the prefill before the layer was trimmed during
    # it (`compress.trim_layer_now`): what selection after the forward ranks by
    ranking: Tensor | None = None

    @classmethod
    def unflatten(cls, layers: list[int], tensors: list[Tensor]) -> dict[int, PrefillStats]:
        """The per-layer statistics from the flat tensors a prefill graph returns (`per layer` tensors each, in
        field order, layer after layer): the one place that knows that layout."""
        per_layer = len(tensors) // max(len(layers), 1)
        return {layer: cls(*tensors[per_layer * i:per_layer * (i + 1)]) for i, layer in enumerate(layers)}

    def take(self, idx: Tensor) -> PrefillStats:
        """These statistics over the slots `idx` [B, n] (`take_slots`)."""
        ranking = None if self.ranking is None else take_slots(self.ranking, idx)
        return PrefillStats(self.entropy, take_slots(self.kv_scores, idx), take_slots(self.layer_scores, idx),
                            self.head_statistic, ranking)

    def row(self, b: int, keep: Tensor) -> PrefillStats:
        """Row `b`'s statistics over its slots `keep` [S] (bool), as a batch of one."""
        head = None if self.head_statistic is None else self.head_statistic[b:b + 1]
        ranking = None if self.ranking is None else self.ranking[b:b + 1, keep]
        return PrefillStats(self.entropy[b:b + 1], self.kv_scores[b:b + 1, :, keep], self.layer_scores[b:b + 1, keep],
                            head, ranking)


def pad_slots(t: Tensor, length: int, dim: int, fill: float) -> Tensor:
    """`t` extended along `dim` to `length` with `fill` (empty slots: position -1, zero payload)."""
    missing = length - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_full(shape, fill)], dim)


def held_first(positions: Tensor) -> Tensor:
    """Slot order [B, S] putting each row's held slots (position >= 0) first, in position order, its empty ones
    after them: the order `reserve` lays a layer out in, which a row's `fill` counts from."""
    return positions.masked_fill(positions < 0, _NEVER).sort(dim=-1, stable=True).indices


def kept_slot_index(keep: Tensor) -> tuple[Tensor, Tensor]:
    """(idx [B, n], valid [B, n]) for a slot mask `keep` [B, S]: each row's kept slots in order, n the most any
    row keeps; `valid` is False where a row keeps fewer (idx there points at a dropped slot)."""
    counts = keep.sum(-1, keepdim=True)
    n = int(counts.max())
    idx = torch.sort((~keep).to(torch.uint8), dim=-1, stable=True).indices[:, :n]
    return idx, torch.arange(n, device=keep.device) < counts


def take_slots(t: Tensor, idx: Tensor) -> Tensor:
    """The slots `idx` [B, n] of `t`: [B, S] (positions, scores) or [B, H, S, ...] (keys, values, scales)."""
    if t.dim() == 2:
        return t.gather(1, idx)
    index = idx.view(idx.shape[0], 1, idx.shape[1], *([1] * (t.dim() - 3)))
    return t.gather(2, index.expand(t.shape[0], t.shape[1], idx.shape[1], *t.shape[3:]))


class CompressedLayer(DynamicLayer):
    """A dynamic layer whose slots carry logical positions and which can be shrunk in place (or hold room for the
    coming tokens: `reserve`)."""

    def __init__(self) -> None:
        super().__init__()
        self.positions: Tensor | None = None
        self.stats: PrefillStats | None = None
        self.reserved = False  # the decode layout: tokens are written into room (`reserve`)
        self.ring = False  # reserved as a sliding-window ring: never runs out of room
        self.used = 0  # reserved: slots written so far (counted on the host, by `EntropyKVCache.begin_step`)
        self.fill: Tensor | None = None  # reserved: [B] each row's next slot (mod the slots held), on the device

    @classmethod
    def holding(cls, keys: Tensor, values: Tensor, positions: Tensor, stats: PrefillStats | None = None) -> CompressedLayer:
        """A layer holding these slots (keys/values [B, Hkv, S, D], positions [B, S])."""
        layer = cls()
        layer.is_initialized, layer.dtype, layer.device = True, keys.dtype, keys.device
        layer.replace(keys, values, positions)
        layer.stats = stats
        return layer

    def row(self, b: int) -> CompressedLayer:
        """Row `b` alone (a batch of one) without its pad slots: what a prefill of that sequence alone holds."""
        self.compact()
        keep = self.positions[b] >= 0
        stats = None if self.stats is None else self.stats.row(b, keep)
        return CompressedLayer.holding(self.keys[b:b + 1, :, keep], self.values[b:b + 1, :, keep],
                                       self.positions[b:b + 1, keep], stats)

    @classmethod
    def stack_rows(cls, rows: list[CompressedLayer]) -> CompressedLayer:
        """One batch from single-row layers of different lengths: shorter rows end in empty slots (position -1,
        never attended), so each row attends exactly what it holds alone."""
        n = max(row.get_seq_length() for row in rows)
        return cls.holding(torch.cat([pad_slots(row.keys, n, 2, 0) for row in rows]),
                           torch.cat([pad_slots(row.values, n, 2, 0) for row in rows]),
                           torch.cat([pad_slots(row.positions, n, 1, -1) for row in rows]))

    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.keys = key_states.new_empty(*key_states.shape[:2], 0, key_states.shape[-1])
        self.values = value_states.new_empty(*value_states.shape[:2], 0, value_states.shape[-1])
        self.positions = torch.empty(key_states.shape[0], 0, dtype=torch.int64, device=key_states.device)

    def update(self, key_states: Tensor, value_states: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.reserved:  # `used` is counted by the cache (`begin_step`), outside any compiled graph
            ops.write_in_place(self.keys, self.values, self.positions, key_states, value_states, positions, self.fill,
                               layer)
            return self.keys, self.values
        self.keys, self.values, self.positions = ops.append(self.keys, self.values, self.positions, key_states,
                                                            value_states, positions, layer)
        return self.keys, self.values

    def replace(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Swap in the compressed slots (plain layout); the old tensors are released."""
        self.keys, self.values, self.positions = keys, values, positions
        self.reserved, self.ring, self.used, self.fill = False, False, 0, None

    @property
    def room(self) -> float:
        """Tokens the layer can still take in place: 0 in the plain layout, unbounded for a ring."""
        if not self.reserved:
            return 0
        return math.inf if self.ring else self.positions.shape[-1] - self.used

    def reserve(self, slots: int, window: int = 0) -> None:
        """The decode layout (module docstring): `slots` empty slots after the held ones, or, for a sliding-window
        layer (window > 0) holding fewer than `window` slots, exactly `window` slots as a ring. Copies the layer
        once; its tensors then keep their addresses until the room is used up (a ring's, for good)."""
        self.compact()
        b, held = self.positions.shape
        ring = 0 < window and held < window
        extra = window - held if ring else slots
        # each row's held slots first, in position order, its empty ones after them: what `fill` counts from
        order = held_first(self.positions)
        self.keys, self.values = (torch.cat([take_slots(t, order), t.new_zeros(b, t.shape[1], extra, t.shape[-1])], 2)
                                  for t in (self.keys, self.values))
        positions = take_slots(self.positions, order)
        self.fill = (positions >= 0).sum(-1)
        self.positions = torch.cat([positions, positions.new_full((b, extra), -1)], 1)
        self.reserved, self.ring, self.used = True, ring, held

    def can_reserve(self) -> bool:
        """Whether `reserve` applies: the layer holds tokens."""
        return self.positions is not None

    def buffers(self) -> list[Tensor]:
        """The tensors a decode step reads and writes (a recorded CUDA graph needs them where they were)."""
        return [t for t in (self.keys, self.values, self.positions, self.fill) if t is not None]

    def wrote(self, tokens: int) -> None:
        """Count `tokens` more written into the room (`EntropyKVCache.begin_step`)."""
        self.used = min(self.used + tokens, self.positions.shape[-1]) if self.ring else self.used + tokens

    def compact(self) -> None:
        """Back to the plain layout: the room is given up (views of the written slots; the next append copies).
        A ring's slots are put back in temporal order first."""
        if not self.reserved:
            return
        if self.ring:
            order = self.positions.sort(dim=-1, stable=True).indices  # empty slots (-1) first
            self.replace(take_slots(self.keys, order), take_slots(self.values, order), take_slots(self.positions, order))
        else:
            used = self.used
            self.replace(self.keys[:, :, :used], self.values[:, :, :used], self.positions[:, :used])

    def get_seq_length(self) -> int:
        """Slots held (reserved: those written so far)."""
        if self.reserved:
            return self.used
        return 0 if self.positions is None else self.positions.shape[-1]

    def layout_key(self) -> tuple:
        """What a graph over this layer depends on besides shapes (a graph is compiled per distinct key)."""
        return ("reserved",) if self.reserved else ("dense",)

    def keep_reachable(self, floor: Tensor) -> None:
        """Drop every slot whose position is <= floor [B] (a sliding window has passed it)."""
        if self.positions is not None:
            self.keep_slots(self.positions > floor[:, None])

    def keep_slots(self, keep: Tensor) -> None:
        """Keep the slots where keep [B, S] is True, in order, prefill statistics included; rows that keep fewer
        slots end in empty ones."""
        self.compact()
        keep = keep[:, :self.positions.shape[-1]]
        if bool(keep.all()):
            return
        idx, valid = kept_slot_index(keep)
        self.replace(take_slots(self.keys, idx), take_slots(self.values, idx),
                     take_slots(self.positions, idx).masked_fill(~valid, -1))
        if self.stats is not None:
            self.stats = self.stats.take(idx)

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values held, room included (positions are reported separately by `index_nbytes`)."""
        if not self.is_initialized:
            return 0
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @property
    def index_nbytes(self) -> int:
        return 0 if self.positions is None else self.positions.numel() * self.positions.element_size()

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self.compact()
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.compact()
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: Tensor) -> None:
        self.compact()
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
        self.scored_with: tuple | None = None  # (scorer, repeat_prompt, chunk): bench.fanout's prefill_of
        self.next_positions: Tensor | None = None
        self.step_positions: Tensor | None = None

    @classmethod
    def of_layers(cls, layers: list[CompressedLayer]) -> EntropyKVCache:
        """A cache holding these (prefilled) layers."""
        cache = cls(len(layers))
        cache.layers = layers
        cache.seen_tokens = int((layers[0].positions >= 0).sum(-1).max()) if layers else 0
        return cache


    def drop_unreachable(self, windows: tuple[int, ...]) -> None:
        """Sliding-window layers (window w > 0) drop the slots no later query can attend: a query at position
        p >= next sees keys with p - position < w, so only positions > next - w stay. Reserved layers are left
        alone: a window layer's ring overwrites those slots itself."""
        if self.next_positions is None:
            return
        for layer, window in zip(self.layers, windows):
            if window > 0 and not layer.reserved:
                layer.keep_reachable(self.next_positions - window)

    @property
    def room(self) -> float:
        """Tokens every layer can still take in place (0 unless `make_room` ran)."""
        return min(layer.room for layer in self.layers)

    def can_reserve(self) -> bool:
        """Whether every layer can take the decode layout (`CompressedLayer.can_reserve`)."""
        return all(layer.can_reserve() for layer in self.layers)

    def make_room(self, slots: int, windows: tuple[int, ...]) -> None:
        """Every layer in the decode layout (module docstring) with room for at least `slots` more tokens;
        sliding-window layers (windows[i] > 0) first drop what no later query can attend, then become rings."""
        for layer in self.layers:
            layer.compact()
        self.drop_unreachable(windows)
        for layer, window in zip(self.layers, windows):
            layer.reserve(slots, window)

    def compact(self) -> None:
        """Every layer back to the plain layout."""
        for layer in self.layers:
            layer.compact()

    def end_reconstruction(self, positions: Tensor) -> None:
        """Forget the repeated part of a reconstruction prefill (`entropykv_fx.reconstruct`): each layer keeps its
        first L slots, the prompt's, laid out as a prefill of the prompt would, and the cache counts tokens as after
        that prefill, whose positions [B, L] (-1 for pads) were `positions`. The prefill graph has already dropped
        the rest (`reconstruct.context_slots`) wherever it returned the layer."""
        length = positions.shape[1]
        for layer in self.layers:
            if layer.positions.shape[1] > length:
                layer.keep_slots((torch.arange(layer.positions.shape[1], device=positions.device) < length)
                                 .expand(positions.shape[0], -1))
        self.seen_tokens, self.step_positions = length, positions
        self.next_positions = positions.max(-1).values + 1

    def prompt_lengths(self) -> list[int]:
        """Tokens of each row fed by the last step (pads excluded): a prefill's prompt lengths."""
        return (self.step_positions >= 0).sum(-1).tolist()

    def begin_step(self, positions: Tensor) -> None:
        """Record the positions [B, L] (-1 for pads) of the tokens the coming forward appends."""
        if self.next_positions is not None and positions.shape[0] != self.next_positions.shape[0]:
            raise ValueError(f"entropykv: batch size changed from {self.next_positions.shape[0]} to "
                             f"{positions.shape[0]} on a cache that already holds tokens")
        self.step_positions = positions
        self.seen_tokens += positions.shape[1]
        for layer in self.layers:  # the step writes into the room (`CompressedLayer.update`); counted here, on the host
            if layer.reserved:
                if layer.room < positions.shape[1]:
                    raise ValueError(f"entropykv: {positions.shape[1]} tokens do not fit in a layer's room of "
                                     f"{layer.room}; make_room first")
                layer.wrote(positions.shape[1])
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
