"""The head-wise compressed layout: every KV head of a layer keeps its own, ragged, set of tokens.

A head-wise policy (snapkv, adakv, entropy_head, matrix_entropy) decides per KV head how many tokens to keep
(`HeadPlan`). Each head's kept tokens are then copied into tensors of exactly that length, so a head that keeps
40 tokens holds 40 slots and one that keeps 400 holds 400: the memory held is the sum of the per-head lengths,
never a padded maximum (padding appears only between rows of a batch whose rows got different budgets).

One head's storage (`HeadSlots`) is keys / values [B, 1, K_h, D] in the model's dtype, or int8 with per-token
float32 scales [B, 1, K_h], plus its own logical positions [B, K_h] (-1 = empty). The singleton head axis lets
the decode path hand each head to the unchanged `entropykv::attention` / `attention_int8` ops (a KV group of
Hq / Hkv query heads over one KV head): the plain-torch reference on CPU, the Triton kernel on CUDA.

Decode layout (`PackedHeads`): for one-token steps a layer whose heads are all stored in the model's dtype packs
its heads one after another along one slot axis, each followed by room for the coming tokens, so a step writes
one entry per head in place (`entropykv::write_heads_in_place`) and attends with one call
(`entropykv::attention_packed`): no copy of the cache per step, and fixed shapes and addresses, which is what
a CUDA graph of the step needs (`entropykv_fx.step_graph`). Memory held is still the sum of the per-head lengths
plus the room.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from . import ops
from .cache import CompressedLayer, held_first, kept_slot_index, pad_slots, take_slots
from .policies import HeadPlan


@dataclass
class HeadSlots:
    """The kept tokens of one KV head (see the module docstring for shapes)."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    key_scales: Tensor | None = None  # set when keys/values are int8
    value_scales: Tensor | None = None

    @property
    def int8(self) -> bool:
        return self.key_scales is not None

    def tensors(self) -> list[Tensor]:
        """Everything this head holds besides positions: payloads and, for int8, their scales."""
        return [t for t in (self.keys, self.values, self.key_scales, self.value_scales) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    @property
    def index_nbytes(self) -> int:
        return self.positions.numel() * self.positions.element_size()

    def append(self, keys: Tensor, values: Tensor, positions: Tensor) -> None:
        """Add new tokens (keys/values [B, 1, L, D] in the model's dtype), quantized when this head is int8."""
        if self.int8:
            (k, ks), (v, vs) = ops.quantize_int8(keys), ops.quantize_int8(values)
            self.key_scales = torch.cat([self.key_scales, ks], -1)
            self.value_scales = torch.cat([self.value_scales, vs], -1)
        else:
            k, v = keys, values
        self.keys = torch.cat([self.keys, k], -2)
        self.values = torch.cat([self.values, v], -2)
        self.positions = torch.cat([self.positions, positions], -1)

    def attend(self, query: Tensor, q_pos: Tensor, scale: float, sliding_window: int) -> Tensor:
        """Attention of the query heads of this KV head's group, query [B, G, L, D] -> [B, G, L, Dv]."""
        if self.int8:
            return ops.attention_int8(query, self.keys, self.key_scales, self.values, self.value_scales, q_pos,
                                      self.positions, scale, sliding_window)
        return ops.attention(query, self.keys, self.values, q_pos, self.positions, scale, sliding_window)

    def dequantized(self, dtype: torch.dtype) -> HeadSlots:
        """The same slots in `dtype` (int8 payloads dequantized: the values the int8 attention computes with)."""
        if not self.int8:
            return self
        return HeadSlots(ops.dequantize_int8(self.keys, self.key_scales).to(dtype),
                         ops.dequantize_int8(self.values, self.value_scales).to(dtype), self.positions)

    @staticmethod
    def stack_rows(rows: list[HeadSlots], dtype: torch.dtype) -> HeadSlots:
        """One head's slots of several single-row caches as one batch, shorter rows padded with empty slots. Rows
        that disagree on int8 storage are all stored in `dtype`, the int8 ones dequantized, so every row keeps the
        values it had alone."""
        if len({row.int8 for row in rows}) > 1:
            rows = [row.dequantized(dtype) for row in rows]
        n = max(row.positions.shape[-1] for row in rows)

        def stacked(name: str, dim: int, fill: float) -> Tensor | None:
            parts = [getattr(row, name) for row in rows]
            return None if parts[0] is None else torch.cat([pad_slots(t, n, dim, fill) for t in parts])

        return HeadSlots(stacked("keys", 2, 0), stacked("values", 2, 0), stacked("positions", 1, -1),
                         stacked("key_scales", 2, 0), stacked("value_scales", 2, 0))

    def keep_reachable(self, floor: Tensor) -> None:
        """Drop the slots whose position is <= floor [B] (see `CompressedLayer.keep_reachable`)."""
        keep = self.positions > floor[:, None]
        if bool(keep.all()):
            return
        idx, valid = kept_slot_index(keep)
        self.map(lambda t: take_slots(t, idx))
        self.positions = self.positions.masked_fill(~valid, -1)

    def map(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply a batch-axis operation (reorder, repeat, select) to everything this head holds."""
        for name in ("keys", "values", "positions", "key_scales", "value_scales"):
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))


@dataclass
class PackedHeads:
    """A head-wise layer in the decode layout (module docstring): KV head h owns slots starts[h]..starts[h+1]-1
    of keys [B, T, D], values [B, T, Dv] and positions [B, T] (-1 = empty): its held slots first, in position
    order, then its room. fill [B, Hkv] (int64) is each row's next slot within each head's segment. `held` and
    `caps` are the heads' held and total slot counts, on the host; a ring (sliding-window layer) gives every head
    exactly `window` slots, and a full ring's oldest token is the one no later query can attend."""

    keys: Tensor
    values: Tensor
    positions: Tensor
    starts: Tensor
    fill: Tensor
    held: list[int]
    caps: list[int]
    ring: bool

    @classmethod
    def pack(cls, heads: list[HeadSlots], slots: int, window: int) -> PackedHeads:
        """`heads` (none int8) with room for `slots` tokens each, or, for a sliding-window layer (window > 0)
        whose heads all hold fewer than `window` slots, as rings of `window` slots."""
        held = [head.positions.shape[-1] for head in heads]
        ring = 0 < window and max(held) < window
        caps = [window if ring else n + slots for n in held]
        parts: dict[str, list[Tensor]] = {"keys": [], "values": [], "positions": [], "fill": []}
        for head, cap in zip(heads, caps):
            order = held_first(head.positions)
            for name in ("keys", "values"):
                parts[name].append(pad_slots(take_slots(getattr(head, name), order)[:, 0], cap, 1, 0))
            positions = take_slots(head.positions, order)
            parts["fill"].append((positions >= 0).sum(-1))
            parts["positions"].append(pad_slots(positions, cap, 1, -1))
        starts = torch.tensor([0, *itertools.accumulate(caps)], dtype=torch.int64, device=heads[0].positions.device)
        return cls(torch.cat(parts["keys"], 1), torch.cat(parts["values"], 1), torch.cat(parts["positions"], 1),
                   starts, torch.stack(parts["fill"], 1), held, caps, ring)

    def room(self, written: int) -> float:
        """Tokens every head can still take after `written` steps (unbounded for a ring)."""
        return math.inf if self.ring else min(c - n for c, n in zip(self.caps, self.held)) - written

    def unpack(self, written: int) -> list[HeadSlots]:
        """The heads in the plain layout after `written` steps: views of the slots written so far (a ring's in
        position order, empty slots first)."""
        heads = []
        for start, n, cap in zip(itertools.accumulate([0, *self.caps]), self.held, self.caps):
            end = start + (cap if self.ring else n + written)
            head = HeadSlots(self.keys[:, None, start:end], self.values[:, None, start:end],
                             self.positions[:, start:end])
            if self.ring:
                order = head.positions.sort(dim=-1, stable=True).indices
                head.map(lambda t, order=order: take_slots(t, order))
            heads.append(head)
        return heads

    def buffers(self) -> list[Tensor]:
        return [self.keys, self.values, self.positions, self.starts, self.fill]

    def lengths(self, written: int) -> list[int]:
        return list(self.caps) if self.ring else [n + written for n in self.held]


def select_per_head(ranked: Tensor, budgets: Tensor) -> list[Tensor]:
    """Kept slot indices per KV head from `ops.selection_ranks` output [B, Hkv, S] and budgets [B, Hkv].

    Head h gets [B, K_h] with K_h = its largest budget over the rows: each row's top `budgets[b, h]` slots in
    temporal order, then -1 where that row's budget is smaller than K_h. Ties go to the earlier slot.
    """
    s = ranked.shape[-1]
    budgets = budgets.to(ranked.device)
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
    kept = []
    for h in range(ranked.shape[1]):
        k = int(budgets[:, h].max())
        top = order[:, h, :k]
        in_budget = torch.arange(k, device=ranked.device) < budgets[:, h, None]
        idx = torch.where(in_budget, top, s).sort(dim=-1).values  # the unused tail sorts last
        kept.append(idx.masked_fill(idx == s, -1))
    return kept


def gather_head(keys: Tensor, values: Tensor, k_pos: Tensor, idx: Tensor, int8: bool) -> HeadSlots:
    """Copy the slots `idx` [B, K] (-1 = empty) of one KV head, keys/values [B, 1, S, D], into new tensors."""
    safe = idx.clamp(min=0)
    positions = k_pos.gather(1, safe).masked_fill(idx < 0, -1)
    if int8:
        k_q, k_s, v_q, v_s = ops.gather_int8(keys, values, safe)
        return HeadSlots(k_q, v_q, positions, k_s, v_s)
    return HeadSlots(*ops.gather(keys, values, safe), positions)


def attend_heads(query: Tensor, keys: list[Tensor], values: list[Tensor], positions: list[Tensor],
                 key_scales: list[Tensor | None], value_scales: list[Tensor | None], q_pos: Tensor, scale: float,
                 sliding_window: int) -> Tensor:
    """query [B, Hq, L, D] over every KV head's own slots -> [B, Hq, L, Dv] (what the graph pass calls)."""
    group = query.shape[1] // len(keys)
    heads = zip(keys, values, positions, key_scales, value_scales)
    return torch.cat([HeadSlots(*head).attend(query[:, h * group:(h + 1) * group], q_pos, scale, sliding_window)
                      for h, head in enumerate(heads)], dim=1)


class HeadwiseLayer(CompressedLayer):
    """A compressed layer stored per KV head (`HeadSlots`), each head with its own length and storage dtype.

    `update` appends the new tokens to every head and returns `entropykv::headwise_cache`'s dense view, which
    the graph pass replaces by `attend_heads` over the heads' own slots (no single K/V tensor is ever built).
    With room reserved (`reserve`, heads in the model's dtype only) the heads are packed (`PackedHeads`) until
    `compact`; `heads` gives them back in the plain layout.
    """

    def __init__(self, heads: list[HeadSlots], dtype: torch.dtype) -> None:
        super().__init__()
        self._heads = heads
        self.packed: PackedHeads | None = None
        self.dtype, self.device = dtype, heads[0].positions.device
        self.is_initialized = True

    @property
    def heads(self) -> list[HeadSlots]:
        """Every KV head's slots in the plain layout (a packed layer is unpacked first)."""
        self.compact()
        return self._heads

    @classmethod
    def from_plan(cls, layer: CompressedLayer, budgets: Tensor, int8_heads: list[bool], ranked: Tensor) -> HeadwiseLayer:
        kept = select_per_head(ranked, budgets)
        heads = [gather_head(layer.keys[:, h:h + 1], layer.values[:, h:h + 1], layer.positions, idx, int8)
                 for h, (idx, int8) in enumerate(zip(kept, int8_heads))]
        return cls(heads, layer.keys.dtype)

    @classmethod
    def stack_rows(cls, rows: list[HeadwiseLayer]) -> HeadwiseLayer:
        """One batch from single-row head-wise layers (see `HeadSlots.stack_rows`)."""
        dtype = rows[0].dtype
        return cls([HeadSlots.stack_rows([row.heads[h] for row in rows], dtype) for h in range(len(rows[0].heads))],
                   dtype)

    def update(self, key_states: Tensor, value_states: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        packed = self.packed
        if packed is not None:  # `used` is counted by the cache (`begin_step`), outside any compiled graph
            ops.write_heads_in_place(packed.keys, packed.values, packed.positions, key_states, value_states, positions,
                                     packed.starts, packed.fill, layer)
            return ops.packed_cache(packed.keys, packed.values, packed.positions, packed.starts, positions, layer)
        for h, head in enumerate(self._heads):
            head.append(key_states[:, h:h + 1], value_states[:, h:h + 1], positions)
        return ops.headwise_cache(key_states, *self.slots(), positions, layer)

    def slots(self) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor | None], list[Tensor | None]]:
        """(keys, values, positions, key_scales, value_scales), one entry per KV head."""
        return tuple([getattr(head, name) for head in self.heads]
                     for name in ("keys", "values", "positions", "key_scales", "value_scales"))

    def attention(self, query: Tensor, q_pos: Tensor, scale: float, sliding_window: int) -> Tensor:
        """query [B, Hq, L, D] over every head's own slots -> [B, Hq, L, Dv]."""
        return attend_heads(query, *self.slots(), q_pos, scale, sliding_window)

    # --------------------------------------------------------------------------------- decode layout
    def can_reserve(self) -> bool:
        """Packing needs one storage dtype: a layer with int8 heads keeps appending per head."""
        return self.packed is not None or not any(head.int8 for head in self._heads)

    def reserve(self, slots: int, window: int = 0) -> None:
        """Pack the heads with room for `slots` tokens each, or as rings of `window` slots (`PackedHeads.pack`)."""
        self.compact()
        self.packed = PackedHeads.pack(self._heads, slots, window)
        self._heads = []
        self.reserved, self.ring, self.used = True, self.packed.ring, 0

    @property
    def room(self) -> float:
        return self.packed.room(self.used) if self.packed is not None else 0

    def wrote(self, tokens: int) -> None:
        self.used += tokens

    def compact(self) -> None:
        if self.packed is not None:
            self._heads = self.packed.unpack(self.used)
            self.packed = None
            self.reserved, self.ring, self.used = False, False, 0

    def buffers(self) -> list[Tensor]:
        return self.packed.buffers() if self.packed is not None else []

    def layout_key(self) -> tuple:
        if self.packed is not None:
            return ("packed",)
        return ("heads", tuple(head.int8 for head in self._heads))

    def keep_reachable(self, floor: Tensor) -> None:
        for head in self.heads:
            head.keep_reachable(floor)

    def head_lengths(self) -> list[int]:
        if self.packed is not None:
            return self.packed.lengths(self.used)
        return [head.positions.shape[-1] for head in self._heads]

    def get_seq_length(self) -> int:
        """The longest head's slot count (heads differ; `head_lengths` has them all)."""
        return max(self.head_lengths())

    @property
    def nbytes(self) -> int:
        """Bytes of keys and values (and int8 scales) held, room included."""
        if self.packed is not None:
            return sum(t.numel() * t.element_size() for t in (self.packed.keys, self.packed.values))
        return sum(head.nbytes for head in self._heads)

    @property
    def index_nbytes(self) -> int:
        if self.packed is not None:
            return sum(t.numel() * t.element_size() for t in (self.packed.positions, self.packed.starts))
        return sum(head.index_nbytes for head in self._heads)

    def reorder_cache(self, beam_idx: Tensor) -> None:
        for head in self.heads:
            head.map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for head in self.heads:
            head.map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        for head in self.heads:
            head.map(lambda t: t[indices, ...])


def calibrated_plan(plan: HeadPlan, n_tokens: int, config) -> HeadPlan:
    """`plan` with the budgets and int8 heads of the calibration file: static shapes, set by the prompt length only."""
    fractions, int8_heads = config.head_calibration(len(plan.budgets), plan.budgets[0].shape[1])
    floor = min(n_tokens, config.sink_tokens + config.window)
    budgets = [torch.tensor([min(n_tokens, max(floor, round(f * n_tokens))) for f in row], device=b.device).expand_as(b)
               for row, b in zip(fractions, plan.budgets)]
    return HeadPlan(budgets, int8_heads, plan.scores)
