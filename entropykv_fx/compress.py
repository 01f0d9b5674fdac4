"""Prefill-time compression: statistics of every layer -> budgets (policy) -> select + gather (ops).

This is the one place that turns a filled cache into its compressed layout; the model integration calls
it after the prefill forward, once every layer has been scored, except for layers whose budgets need no
statistic of the prefill (`budgets_before_scores`), which the prefill graph compresses as soon as each has run
(`compress_layer_now`), so the full cache of every layer is never held at once.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from . import ops
from .cache import CompressedLayer, EntropyKVCache, take_slots
from .config import EntropyKVConfig
from .errors import BudgetFloorWarning
from .headwise import HeadwiseLayer, calibrated_plan
from .policies import POLICIES, HeadPlan, budget_bounds
from .scorers import SCORERS


@dataclass(frozen=True)
class HeadReport:
    """One KV head of a head-wise layer: what it was granted and what it holds."""

    head: int
    budget: int  # tokens granted (the largest over the batch rows)
    slots: int  # slots held: budget, or more where rows of a batch differ
    storage: str  # dtype of the stored keys/values, e.g. "bfloat16" or "int8"
    bytes: int  # keys + values (+ int8 scales)
    index_bytes: int  # its positions


@dataclass(frozen=True)
class LayerReport:
    """One layer. For a head-wise layer, budget and slots are the mean over its KV heads (rounded); `heads` has
    each head's exact numbers and bytes_after is their sum."""

    layer: int
    entropy: float  # mean head entropy over the observation window (nats); nan when not scored
    budget: int  # tokens the policy granted
    slots_before: int
    slots_after: int
    bytes_before: int
    bytes_after: int
    heads: tuple[HeadReport, ...] = ()


@dataclass(frozen=True)
class CompressionReport:
    """What the last prefill did to the cache, layer by layer."""

    policy: str
    prompt_tokens: int  # the longest row's, for a batch
    layers: list[LayerReport] = field(default_factory=list)
    rows: tuple[CompressionReport, ...] = ()  # for a batch: each row's own report (as if it had run alone)

    @property
    def bytes_before(self) -> int:
        return sum(r.bytes_before for r in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(r.bytes_after for r in self.layers)

    @property
    def kept_fraction(self) -> float:
        return self.bytes_after / max(self.bytes_before, 1)

    def __str__(self) -> str:
        rows = [(f"policy={self.policy} prompt_tokens={self.prompt_tokens} KV bytes {self.bytes_before:,} -> "
                 f"{self.bytes_after:,} ({100 * self.kept_fraction:.1f}% kept)"),
                f"{'layer':>5} {'entropy':>8} {'budget':>7} {'slots':>13} {'bytes after':>12}"]
        for r in self.layers:
            rows.append(f"{r.layer:>5} {r.entropy:>8.3f} {r.budget:>7} {r.slots_before:>6}->{r.slots_after:<6} "
                        f"{r.bytes_after:>12,}")
            rows += [f"{'':>5} head {h.head:<3} {h.budget:>6} {h.slots:>13} {h.bytes:>12,} {h.storage}" for h in r.heads]
        return "\n".join(rows)


def layer_budgets(entropies: list[float], n_tokens: int, config: EntropyKVConfig) -> list[int]:
    """Tokens each layer keeps: from the policy (dynamic) or from calibrated per-layer fractions."""
    if config.budget_source == "calibrated":
        floor = min(n_tokens, config.sink_tokens + config.window)
        fractions = config.layer_fractions(len(entropies))
        raised = [(i, floor - round(f * n_tokens)) for i, f in enumerate(fractions) if round(f * n_tokens) < floor]
        if raised:
            respected = math.ceil(floor / min(fractions))
            warnings.warn(f"entropykv: at a {n_tokens}-token prompt the always-kept sink_tokens + window = {floor} "
                          f"tokens exceed the calibrated budgets of layers {[i for i, _ in raised]} (by up to "
                          f"{max(d for _, d in raised)} tokens), so those layers keep {floor} and the calibration "
                          f"is not respected; it is from a {respected}-token prompt on (e.g. export "
                          f"prompt_length={respected})", BudgetFloorWarning, stacklevel=2)
        return [min(n_tokens, max(floor, round(f * n_tokens))) for f in fractions]
    return POLICIES[config.policy].allocate(entropies, n_tokens, config)


def token_ranking(layer: CompressedLayer, config: EntropyKVConfig) -> Tensor:
    """The ranking [B, S] a layer's kept slots are chosen by (one token set for all its heads): the policy's own
    (`Policy.token_scores`) or the configured scorer's (`entropykv_fx.scorers`); for a layer trimmed during the
    prefill (`trim_layer_now`), the one computed then over every slot."""
    if layer.stats is not None and layer.stats.ranking is not None:
        return layer.stats.ranking
    own = POLICIES[config.policy].token_scores
    return own(layer, config) if own is not None else SCORERS[config.scorer].layer_scores(layer, config)


def kept_slots(layer: CompressedLayer, budget: int, config: EntropyKVConfig) -> tuple[Tensor, Tensor, Tensor]:
    """select -> gather: (keys, values, positions) of the `budget` slots the policy keeps in a scored layer.

    The one place where tokens are chosen and copied: the eager cache (`compress_cache`), static buffers
    (`StaticCacheModel`) and exported prefill programs (`aot`) each store the result their own way."""
    idx = ops.select(token_ranking(layer, config), layer.positions, budget, config.sink_tokens, config.window)
    keys, values = ops.gather(layer.keys, layer.values, idx)
    return keys, values, layer.positions.gather(1, idx)


def budgets_before_scores(config: EntropyKVConfig, n_layers: int) -> Callable[[int], list[int]] | None:
    """n_tokens -> each layer's budget, when the budgets need no statistic of the prefill: calibrated fractions, or a
    layer-wise policy whose allocation reads only the prompt length (`Policy.budgets_from_length`: uniform,
    pyramidkv, streaming). Such a layer can be compressed as soon as its attention has run (`compress_layer_now`).
    None for every other policy, whose budgets wait for every layer's statistics."""
    policy = POLICIES[config.policy]
    if not policy.evicts or policy.headwise:
        return None
    if config.budget_source == "dynamic" and (policy.plan_layers is not None or not policy.budgets_from_length):
        return None
    return _during_prefill(lambda n_tokens: layer_budgets([math.nan] * n_layers, n_tokens, config))


def trim_before_budgets(config: EntropyKVConfig, n_layers: int) -> Callable[[CompressedLayer], int] | None:
    """For a one-row prefill whose budgets wait for every layer's statistics: a function of a just-prefilled, scored
    layer giving the most slots it can still be granted, so that it is trimmed to them right away
    (`trim_layer_now`) and compressed to its budget after the forward. Two kinds of bound:

    - a layer-wise policy's ceiling, known before any statistic (`Policy.layer_ceiling`: `entropy` and
      `entropy_focus` grant at most max_layer_budget x the mean);
    - a cache-wide top-k (`Policy.cache_wide_topk`: `cache_topk`, `cache_topk_layer`) over unpooled scores whose
      heads combine by max (`reconstruct`, the default's): `CacheTopKBound`.

    None for every other policy. Call it once per prefill: the cache-wide bound remembers the layers before."""
    policy = POLICIES[config.policy]
    if config.budget_source != "dynamic" or not policy.evicts:
        return None
    if policy.layer_ceiling is not None and not policy.headwise:
        ceiling, tokens = _during_prefill(lambda n_tokens: policy.layer_ceiling(n_tokens, config)), _prompt_tokens()
        return lambda layer: ceiling(tokens(layer))
    scorer = SCORERS[config.scorer]
    if policy.cache_wide_topk and not scorer.pooled and not scorer.from_keys and scorer.combine == "max":
        return CacheTopKBound(config, n_layers)
    return None


class CacheTopKBound:
    """The running bar of a cache-wide top-k (KVzip's allocation, arXiv 2505.23416 §3.3) during a one-row prefill.

    The cache keeps its k best (layer, KV head, token) entries, k = layers x heads x the mean budget; the k-th best
    of the layers prefilled so far can only rise as later layers join, so an entry below it now is never kept. A
    token all of whose heads are below it is dropped from its layer as soon as the layer has run (at least the
    mean budget's best tokens stay, so the top-k after the forward counts the same k): that top-k then keeps exactly
    the entries it would keep from every slot, up to ties at the bar. Scores must be comparable across layers and
    combine over heads by max (`reconstruct`), so that a token's layer score is its best head's."""

    def __init__(self, config: EntropyKVConfig, n_layers: int) -> None:
        self.config, self.n_layers = config, n_layers
        self.mean = _during_prefill(lambda n_tokens: budget_bounds(n_tokens, config)[1])
        self.best: Tensor | None = None  # the k best entries of the layers so far, descending
        self.tokens = _prompt_tokens()

    def __call__(self, layer: CompressedLayer) -> int:
        scorer, policy = SCORERS[self.config.scorer], POLICIES[self.config.policy]
        scores = scorer.head_scores(layer, self.config) if policy.headwise else scorer.layer_scores(layer, self.config)[:, None]
        ranked = ops.selection_ranks(scores, layer.positions, self.config.sink_tokens, self.config.window)  # [1, H, S]
        slots = ranked.shape[2]
        mean = min(self.mean(self.tokens(layer)), slots)
        k = self.n_layers * ranked.shape[1] * mean
        pool = ranked.flatten() if self.best is None else torch.cat([self.best, ranked.flatten()])
        self.best = pool.topk(min(k, pool.numel())).values
        if self.best.numel() < k:
            return slots
        return max(int((ranked.amax(1) >= self.best[-1]).sum()), mean)


def _prompt_tokens() -> Callable[[CompressedLayer], int]:
    """The prompt's tokens in a one-row prefill's layers: read from the device at the first layer only, since every
    layer holds the same prompt (each read waits for the device to finish what was queued)."""
    seen: list[int] = []

    def tokens(layer: CompressedLayer) -> int:
        if not seen:
            seen.append(int((layer.positions >= 0).sum()))
        return seen[0]
    return tokens


def _during_prefill(of_length: Callable[[int], Any]) -> Callable[[int], Any]:
    """`of_length` computed once per prompt length, without its budget-floor warning: the allocation after the
    forward reports that, once."""
    @functools.cache
    def quietly(n_tokens: int) -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BudgetFloorWarning)
            return of_length(n_tokens)
    return quietly


def trim_layer_now(layer: CompressedLayer, most: int, config: EntropyKVConfig) -> tuple[int, int] | None:
    """Trim a just-prefilled, scored layer of one row to its `most` best slots by the ranking its selection after
    the forward uses (`kept_slots`). That ranking, computed over every slot, stays on the layer's statistics
    (`PrefillStats.ranking`) with the kept slots' scores, so the selection then keeps exactly what it would have
    kept from all of them (`select` is a stable top-k: ties go to the earlier slot either way). Returns the
    (slots, bytes) held before, for the report; None when there was nothing to trim."""
    held = layer.get_seq_length(), layer.nbytes
    if layer.keys.shape[0] != 1 or most >= held[0]:
        return None
    rank = token_ranking(layer, config)
    idx = ops.select(rank, layer.positions, most, config.sink_tokens, config.window)
    stats = layer.stats
    layer.replace(*ops.gather(layer.keys, layer.values, idx), layer.positions.gather(1, idx))
    layer.stats = replace(stats.take(idx), ranking=take_slots(rank, idx))
    return held


def compress_layer_now(layer: CompressedLayer, index: int, budget: Callable[[int], int],
                       config: EntropyKVConfig) -> tuple[LayerReport, list[LayerReport]]:
    """Compress one just-prefilled, scored layer in place, each row to `budget(its prompt length)` slots chosen as
    `compress_cache` would choose them (`kept_slots`); its statistics are released. Returns (the layer's report,
    each row's), which `compress_cache(..., done=...)` then reports for it instead of compressing it again."""
    # one wait for the device: each row's prompt length and mean head entropy
    tokens, entropies = torch.stack([(layer.positions >= 0).sum(-1).float(), layer.stats.entropy.float().mean(-1)]).tolist()
    before = layer.get_seq_length(), layer.nbytes
    rows = [layer] if len(tokens) == 1 else [layer.row(b) for b in range(len(tokens))]
    reports = [_shrink(row, index, budget(int(n)), e, config) for row, n, e in zip(rows, tokens, entropies)]
    if len(rows) > 1 and any(r.slots_after < r.slots_before for r in reports):
        stacked = CompressedLayer.stack_rows(rows)
        layer.replace(stacked.keys, stacked.values, stacked.positions)
    layer.stats = None
    entropy = sum(r.entropy for r in reports) / len(reports)
    return (LayerReport(index, entropy, max(r.budget for r in reports), before[0], layer.get_seq_length(), before[1],
                        layer.nbytes), reports)


def compress_cache(cache: EntropyKVCache, config: EntropyKVConfig, heads: slice | None = None,
                   done: dict[int, tuple[LayerReport, list[LayerReport]]] | None = None,
                   held_before: dict[int, tuple[int, int]] | None = None) -> CompressionReport:
    """Shrink every layer of a just-prefilled `cache` to the policy's budgets; returns the report.

    Each row of a batch is compressed on its own, exactly as if it had been prefilled alone (its pads dropped,
    budgets from its own length and statistics), then the rows are stacked again, shorter ones ending in empty
    slots: no statistic, budget or selection mixes rows. `report.rows` has each row's own report.
    `heads`: for a head-wise policy on a tensor-parallel rank, whose statistics cover all KV heads but whose cache
    holds only these: the plan is made over all heads and the cache keeps its share (`entropykv_fx.parallel`).
    `done`: layers already compressed during the prefill (`compress_layer_now`'s reports, by layer), left as they are.
    `held_before`: (slots, bytes) before a trim during the prefill (`trim_layer_now`, a batch of one), by layer.
    """
    done = done or {}
    lengths = cache.prompt_lengths()
    batch = len(lengths)
    if batch == 1:
        return _compress_sequence(cache, config, lengths[0], heads, {i: rows[0] for i, (_, rows) in done.items()},
                                  held_before or {})
    before = [(done[i][0].slots_before, done[i][0].bytes_before) if i in done else (layer.get_seq_length(), layer.nbytes)
              for i, layer in enumerate(cache.layers)]
    rows = [EntropyKVCache.of_layers([layer.row(b) for layer in cache.layers]) for b in range(batch)]
    row_reports = [_compress_sequence(row, config, n, heads, {i: per_row[b] for i, (_, per_row) in done.items()}, {})
                   for b, (row, n) in enumerate(zip(rows, lengths))]
    if all(r.slots_after == r.slots_before for row in row_reports for r in row.layers) and all(
            type(layer) is CompressedLayer for row in rows for layer in row.layers):
        for layer in cache.layers:  # nothing evicted: the batch stays as it is (pads are never attended)
            layer.stats = None
    else:
        cache.layers = [type(row_layers[0]).stack_rows(row_layers) for row_layers in zip(*(row.layers for row in rows))]
    layers = []
    for i, (layer, (slots, nbytes)) in enumerate(zip(cache.layers, before)):
        per_row = [r.layers[i] for r in row_reports]
        layers.append(LayerReport(i, sum(r.entropy for r in per_row) / batch, max(r.budget for r in per_row), slots,
                                  layer.get_seq_length(), nbytes, layer.nbytes))
    return CompressionReport(config.policy, max(r.prompt_tokens for r in row_reports), layers, tuple(row_reports))


def _compress_sequence(cache: EntropyKVCache, config: EntropyKVConfig, n_tokens: int, heads: slice | None,
                       done: dict[int, LayerReport], held_before: dict[int, tuple[int, int]]) -> CompressionReport:
    """`compress_cache` for a batch of one sequence of `n_tokens` prompt tokens."""
    policy = POLICIES[config.policy]
    layers = cache.layers
    unscored = [i for i, layer in enumerate(layers) if layer.stats is None and i not in done]
    if policy.needs_scores and unscored:
        raise RuntimeError(f"entropykv: layers {unscored} were not scored during prefill; cannot allocate budgets")
    entropies = [float(layer.stats.entropy.mean()) if layer.stats is not None else math.nan for layer in layers]
    if policy.headwise:
        plan = policy.plan_heads(layers, n_tokens, config)
        if config.budget_source == "calibrated":
            plan = calibrated_plan(plan, n_tokens, config)
        if heads is not None:
            plan = plan.heads(heads)
        return compress_heads(cache, plan, config, n_tokens, entropies, held_before)
    budgets = policy.plan_layers(layers, n_tokens, config) if policy.plan_layers and config.budget_source == "dynamic" \
        else layer_budgets(entropies, n_tokens, config)
    reports = []
    for i, (layer, budget, ent) in enumerate(zip(layers, budgets, entropies)):
        if i in done:
            reports.append(done[i])
            continue
        reports.append(_shrink(layer, i, budget, ent, config, held_before.get(i)))
    return CompressionReport(config.policy, n_tokens, reports)


def _shrink(layer: CompressedLayer, index: int, budget: int, entropy: float, config: EntropyKVConfig,
            held: tuple[int, int] | None = None) -> LayerReport:
    """Keep the layer's `budget` best slots (`kept_slots`), release its statistics; its report. `held`: the
    (slots, bytes) it held before a trim during the prefill, when there was one."""
    slots, nbytes = held or (layer.get_seq_length(), layer.nbytes)
    if budget < layer.get_seq_length():
        layer.replace(*kept_slots(layer, budget, config))
    layer.stats = None
    return LayerReport(index, entropy, budget, slots, layer.get_seq_length(), nbytes, layer.nbytes)


def compress_heads(cache: EntropyKVCache, plan: HeadPlan, config: EntropyKVConfig, n_tokens: int,
                   entropies: list[float], held_before: dict[int, tuple[int, int]] | None = None) -> CompressionReport:
    """Replace every layer by its head-wise layout (`HeadwiseLayer`) as `plan` says; the per-head report.
    `held_before`: (slots, bytes) of the layers trimmed during the prefill, before the trim (`trim_layer_now`)."""
    reports = []
    for i, layer in enumerate(cache.layers):
        slots, nbytes = (held_before or {}).get(i) or (layer.get_seq_length(), layer.nbytes)
        ranked = ops.selection_ranks(plan.scores[i], layer.positions, config.sink_tokens, config.window)
        # never more than a row's candidates: pads and what the policy ruled out (-inf) are left empty instead
        row_budgets = torch.minimum(plan.budgets[i], (ranked > float("-inf")).sum(-1))
        budgets = row_budgets.amax(0).tolist()
        compressed = HeadwiseLayer.from_plan(layer, row_budgets, plan.int8_heads[i], ranked)
        cache.layers[i] = compressed
        heads = tuple(HeadReport(h, b, head.positions.shape[-1], str(head.keys.dtype).removeprefix("torch."),
                                 head.nbytes, head.index_nbytes)
                      for h, (b, head) in enumerate(zip(budgets, compressed.heads)))
        lengths = compressed.head_lengths()
        reports.append(LayerReport(i, entropies[i], round(sum(budgets) / len(budgets)), slots,
                                   round(sum(lengths) / len(lengths)), nbytes, compressed.nbytes, heads))
    return CompressionReport(config.policy, n_tokens, reports)


def uncompressed_report(cache: EntropyKVCache, config: EntropyKVConfig) -> CompressionReport:
    """Report for a prefill that evicted nothing (policy 'full' or a prompt within the budget)."""
    n_tokens = max(cache.prompt_lengths())
    return CompressionReport(config.policy, n_tokens, [
        LayerReport(i, float("nan"), n_tokens, layer.get_seq_length(), layer.get_seq_length(), layer.nbytes, layer.nbytes)
        for i, layer in enumerate(cache.layers)])

