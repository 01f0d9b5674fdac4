"""Rewrite attention sites into entropykv ops, pairing each site with the cache layer it reads.

A site is rewritable when its keys and values are outputs 0 and 1 of one cache update node, `entropykv::append`
(growing layout) or `entropykv::write` (static capacity), or buffers 0 and 1 that one `entropykv::write_in_place`
wrote (a layer with room), whose `layer` argument names the layer: the site becomes
`entropykv::attention(q, keys, values, new_pos, positions, scale, sliding_window)`, which masks by positions
(causal, padding, sliding window, evicted slots) — so a site must not carry any other mask. A site reading a
head-wise layer (`entropykv::headwise_cache`) becomes `headwise.attend_heads` over the per-head slots, and one
reading a packed head-wise layer with room (`entropykv::packed_cache`) `entropykv::attention_packed`. On a prefill
graph (the layer's cache is empty before the append, or a static write of several tokens) the pass also adds
`entropykv::score` over the last `score_window` queries (and the policy's per-head statistic, if any) and hands them
to `use_scores`; a reconstruction prefill's site becomes `entropykv::attention_reconstruction` instead, whose softmax
normalizers `entropykv::score_reconstruction` reuses.

What a prefill graph returns as a layer's cache is computed right after that layer's attention and scoring (the
prompt's slots of a reconstruction prefill; the kept slots when `compress_layer` is set), so the graph frees each
layer's full keys and values before the next layer runs instead of holding every layer's until the forward ends.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx

from .. import ops
from ..headwise import attend_heads
from ..reconstruct import context_slots
from .dead_code import eliminate_dead_code
from .find_attention import AttentionSite, find_attention_sites

aten = torch.ops.aten
_APPEND = torch.ops.entropykv.append.default
_HEADWISE = torch.ops.entropykv.headwise_cache.default
_PACKED = torch.ops.entropykv.packed_cache.default
_CACHE_OPS = (_APPEND, torch.ops.entropykv.write.default, _HEADWISE, _PACKED)
_IN_PLACE = torch.ops.entropykv.write_in_place.default
_END = 2**63 - 1  # slice end meaning "to the end"
_CARRY = {"to", "contiguous", aten._to_copy.default, aten.contiguous.default, aten.clone.default, aten.alias.default}


@dataclass(frozen=True)
class RewriteSettings:
    """What the rewrite needs to know beyond the graph.

    score_window: queries scoring the tokens on prefill graphs (None: never score).
    sliding_windows: per-layer sliding window (0 = full attention); layers not listed use 0.
    prefill_statistic: (query [B,Hq,L,D], keys, query positions) -> a per-head statistic, computed beside the
        scores on prefill graphs (a policy's own measure, e.g. matrix entropy).
    rank_queries: when set, the token scores come from the last `rank_queries` queries (a second, smaller
        `entropykv::score`) while the entropies still come from the `score_window` ones (`scorers.last_query`).
    repeat_tokens: when set, every prefill is a reconstruction prefill (the prompt, then per chunk of
        `reconstruct_chunk` prompt tokens `repeat_tokens` repeat-prompt tokens and the chunk again;
        `entropykv_fx.reconstruct`) attended by `entropykv::attention_reconstruction` and scored by
        `entropykv::score_reconstruction`; a per-head statistic then sees the prompt's queries only
        (`scorers.reconstruct`).
    reconstruct_chunk: prompt tokens per repeated chunk of a reconstruction prefill.
    compress_layer: (layer, keys, values, positions, *that layer's statistics) -> (keys, values, positions): called
        on prefill graphs right after each scored layer's attention; what it returns becomes the layer's cache
        (it may return its inputs). Lets a policy whose budgets need no other layer compress as it goes.
    """

    score_window: int | None = None
    sliding_windows: tuple[int, ...] = ()
    prefill_statistic: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None
    rank_queries: int | None = None
    repeat_tokens: int | None = None
    reconstruct_chunk: int = 1
    compress_layer: Callable[..., tuple[Tensor, Tensor, Tensor]] | None = None

    @property
    def reconstructs(self) -> bool:
        """Prefill graphs run a reconstruction prefill (`ops.score_reconstruction`; `scorers.reconstruct`)."""
        return self.repeat_tokens is not None

    def sliding_window(self, layer: int) -> int:
        return self.sliding_windows[layer] if layer < len(self.sliding_windows) else 0


@dataclass
class SiteOutcome:
    site: AttentionSite
    layer: int | None = None  # the cache layer, when the site was paired with one
    rewritten: bool = False
    reason: str = ""  # why it was left alone

    def __str__(self) -> str:
        where = f"layer {self.layer}" if self.layer is not None else "no cache layer"
        what = "rewritten" if self.rewritten else f"left alone: {self.reason}"
        return f"{self.site.output.name} [{self.site.form}, {where}]: {what}"


@dataclass
class RewriteResult:
    outcomes: list[SiteOutcome] = field(default_factory=list)
    scored_layers: list[int] = field(default_factory=list)  # in the order of the scores handed to `use_scores`
    stats_per_layer: int = 3  # entropy, kv_scores, layer_scores (+ the prefill statistic)
    prefill: bool = False
    chunked_mlps: int = 0  # gated MLPs computed a chunk of tokens at a time (`passes.chunk_mlp`, run after this pass)
    chunked_norms: int = 0  # RMSNorms computed a chunk of tokens at a time (`passes.chunk_norm`, after this pass)

    @property
    def rewritten(self) -> int:
        return sum(o.rewritten for o in self.outcomes)

    @property
    def left_alone(self) -> list[SiteOutcome]:
        return [o for o in self.outcomes if not o.rewritten]


def _is_slicing(node: fx.Node) -> bool:
    """x[:, :, :n, :]-style basic slicing. transformers' SDPA slices cached keys to the query length when it thinks
    the slots past it are an empty static cache; positions decide visibility after the rewrite, so it is seen through."""
    index = node.args[1] if node.target is operator.getitem else None
    return isinstance(index, tuple) and all(isinstance(i, slice) or i is Ellipsis for i in index)


def _source(node: fx.Node) -> fx.Node:
    while isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and (
            node.target in _CARRY or _is_slicing(node)):
        node = node.args[0]
    return node


def _cache_output(node: fx.Node) -> tuple[fx.Node, int] | None:
    """(cache update node, output index) when `node` is one of an entropykv cache update's outputs, or one of the
    buffers an in-place update wrote (then the index is the argument's)."""
    node = _source(node)
    if not isinstance(node, fx.Node):
        return None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node) and node.args[0].target in _CACHE_OPS:
        return node.args[0], node.args[1]
    written = [(user, i) for user in node.users if user.target is _IN_PLACE for i in (0, 1) if user.args[i] is node]
    return written[0] if len(written) == 1 else None


def _pair(site: AttentionSite) -> tuple[fx.Node | None, str]:
    """The append node feeding the site's keys and values, or why there is none."""
    k, v = site.kv_source or (site.key, site.value)
    k_src, v_src = _cache_output(k), _cache_output(v)
    if k_src is None or v_src is None:
        return None, ("keys/values do not come from an entropykv cache (entropykv::append, entropykv::write or "
                      "entropykv::write_in_place)")
    if k_src[0] is not v_src[0] or (k_src[1], v_src[1]) != (0, 1):
        return None, "keys and values come from different cache updates"
    if site.mask is not None:
        return k_src[0], ("it has an explicit attention mask; entropykv masks by positions (causal, padding, "
                          "sliding window) and cannot keep another mask")
    return k_src[0], ""


def _output(graph: fx.Graph, append: fx.Node, index: int) -> fx.Node:
    if append.target is _IN_PLACE:
        return append.args[index]
    for user in append.users:
        if user.target is operator.getitem and user.args[1] == index:
            return user
    with graph.inserting_after(append):
        return graph.call_function(operator.getitem, (append, index))


def _val(node: fx.Node):
    return node.meta.get("val", node.meta.get("example_value"))


def _is_prefill(cache_op: fx.Node) -> bool:
    """An append to an empty layer; or a static-capacity write of several tokens (static buffers hold no
    empty/non-empty distinction in their shape, so a multi-token write is taken as the prompt)."""
    if cache_op.target is _APPEND:
        return _val(cache_op.args[0]).shape[2] == 0
    return cache_op.target not in (_HEADWISE, _PACKED, _IN_PLACE) and _val(cache_op.args[3]).shape[2] > 1


def _new_pos(cache_op: fx.Node) -> fx.Node:
    return cache_op.args[{_HEADWISE: 6, _PACKED: 4}.get(cache_op.target, 5)]


def _rewrite_site(graph: fx.Graph, site: AttentionSite, cache_op: fx.Node, settings: RewriteSettings,
                  score: bool, reconstructs: bool) -> tuple[fx.Node, ...] | None:
    """Replace the site by attention over its cache (`reconstructs`: a reconstruction prefill's); returns the
    added scoring nodes, if any."""
    q_pos, layer = _new_pos(cache_op), cache_op.args[-1]
    scale = site.scale if site.scale is not None else float(_val(site.query).shape[-1]) ** -0.5
    window = settings.sliding_window(layer)
    stats = None
    with graph.inserting_before(site.output):
        if cache_op.target is _HEADWISE:
            out = graph.call_function(attend_heads, (site.query, *cache_op.args[1:6], q_pos, scale, window))
        elif cache_op.target is _PACKED:
            keys, values, positions, starts = cache_op.args[:4]
            out = graph.call_function(torch.ops.entropykv.attention_packed.default,
                                      (site.query, keys, values, q_pos, positions, starts, scale, window))
        else:
            keys, values, positions = (_output(graph, cache_op, i) for i in range(3))
            # A prefill appends to an empty cache, so its keys' positions are its queries': where the model feeds
            # every layer the same positions (HF decoders do), the ops then read their layout from the device once
            # per forward instead of once per layer (ops._remembered).
            key_pos = q_pos if cache_op.target is _APPEND and _is_prefill(cache_op) else positions
            attend = (site.query, keys, values, q_pos, key_pos, scale, window)
            if reconstructs:  # the scorer reuses the attention's softmax normalizers
                both = graph.call_function(torch.ops.entropykv.attention_reconstruction.default,
                                           (*attend, settings.repeat_tokens, settings.reconstruct_chunk))
                out, lse = (graph.call_function(operator.getitem, (both, i)) for i in (0, 1))
            else:
                out = graph.call_function(torch.ops.entropykv.attention.default, attend)
        out.meta.update(site.output.meta)
        if score:
            def score_last(w: int) -> fx.Node:
                q_win = graph.call_function(aten.slice.Tensor, (site.query, 2, -w, _END))
                pos_win = graph.call_function(aten.slice.Tensor, (q_pos, 1, -w, _END))
                return graph.call_function(torch.ops.entropykv.score.default,
                                           (q_win, keys, pos_win, key_pos, scale, window))

            stat_pos = q_pos
            layout = (settings.repeat_tokens, settings.reconstruct_chunk)
            if reconstructs:
                scored = ranked = graph.call_function(
                    torch.ops.entropykv.score_reconstruction.default,
                    (site.query, keys, q_pos, key_pos, scale, window, settings.score_window, *layout, lse))
                stat_pos = graph.call_function(ops.context_queries, (q_pos, *layout))
            else:
                scored = score_last(settings.score_window)
                ranked = scored if settings.rank_queries is None else score_last(settings.rank_queries)
            stats = (graph.call_function(operator.getitem, (scored, 0)),
                     *(graph.call_function(operator.getitem, (ranked, i)) for i in (1, 2)))
            if reconstructs:  # the scores of the prompt's slots, the ones its cache keeps
                stats = (stats[0], *(graph.call_function(context_slots, (t, -1, *layout))
                                     for t in stats[1:]))
            if settings.prefill_statistic is not None:
                stats += (graph.call_function(settings.prefill_statistic, (site.query, keys, stat_pos)),)
            stats += (keys, values, positions)
    site.output.replace_all_uses_with(out)
    # Erased by hand: SDPA is tagged random (dropout), so dead-code elimination would keep it.
    for node in reversed(site.nodes or [site.output]):
        if not node.users:
            graph.erase_node(node)
    return stats


def _layer_cache(graph: fx.Graph, append: fx.Node, stats: tuple[fx.Node, ...] | None, settings: RewriteSettings,
                 at: fx.Node) -> None:
    """Replace the graph outputs that become a prefilled layer's keys, values and positions by what the layer
    keeps, computed before `at` (right after the layer's attention and scoring): in a reconstruction prefill a
    copy of the prompt's slots only (`reconstruct.context_slots`), then, with `settings.compress_layer`, the kept
    slots. The full tensors are then released before the next layer runs, not after the forward."""
    full = [_output(graph, append, i) for i in range(3)]
    kept = list(full)
    with graph.inserting_before(at):
        if settings.reconstructs:
            kept = [graph.call_function(context_slots, (t, dim, settings.repeat_tokens, settings.reconstruct_chunk))
                    for t, dim in zip(full, (2, 2, 1))]
        if settings.compress_layer is not None and stats is not None:
            trimmed = graph.call_function(settings.compress_layer, (append.args[-1], *kept, *stats[:-3]))
            kept = [graph.call_function(operator.getitem, (trimmed, i)) for i in range(3)]
    replace = dict(zip(full, kept))
    output = graph.output_node()
    output.args = fx.node.map_arg(output.args, lambda n: replace.get(n, n))


# (graph, {layer: (entropy, kv_scores, layer_scores[, statistic], keys, values, positions) nodes}) -> None
UseScores = Callable[[fx.Graph, dict[int, tuple[fx.Node, ...]]], None]


def return_scores(graph: fx.Graph, scores: dict[int, tuple[fx.Node, ...]]) -> None:
    """Append each scored layer's statistics (all but its cache nodes) to the graph's outputs, in layer order."""
    output = graph.output_node()
    outs = output.args[0]
    extra = [n for layer in scores for n in scores[layer][:-3]]
    output.args = ((*outs, *extra) if isinstance(outs, (tuple, list)) else (outs, *extra),)


def rewrite_attention(gm: fx.GraphModule, settings: RewriteSettings,
                      use_scores: UseScores = return_scores) -> tuple[fx.GraphModule, RewriteResult]:
    """Rewrite every pairable attention site of `gm` in place (see the module docstring).

    On a prefill graph, `use_scores` decides what consumes the scores (by default: extra graph outputs).
    """
    graph = gm.graph
    result = RewriteResult()
    scores: dict[int, tuple[fx.Node, ...]] = {}
    for site in find_attention_sites(graph):
        append, reason = _pair(site)
        layer = append.args[-1] if append is not None else None
        if reason:
            result.outcomes.append(SiteOutcome(site, layer, reason=reason))
            continue
        prefill = _is_prefill(append)
        result.prefill |= prefill
        after = site.output.next  # the site's first node after the attention (the attention itself is replaced)
        stats = _rewrite_site(graph, site, append, settings, score=prefill and settings.score_window is not None,
                              reconstructs=prefill and settings.reconstructs)
        if prefill and (settings.reconstructs or (stats is not None and settings.compress_layer is not None)):
            _layer_cache(graph, append, stats, settings, after)
        if stats is not None:
            result.scored_layers.append(layer)
            result.stats_per_layer = len(stats) - 3
            scores[layer] = stats
        result.outcomes.append(SiteOutcome(site, layer, rewritten=True))
    if scores:
        use_scores(graph, scores)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return gm, result
