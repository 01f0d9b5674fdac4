"""Turn a model's own static KV buffers (gpt-fast style) into the entropykv cache layout.

Pattern, per layer, in a Dynamo graph:
    k_cache[:, :, input_pos] = k;  v_cache[:, :, input_pos] = v
    attention(q, k_cache, v_cache, mask)      # SDPA or eager math; GQA repetition allowed; mask from input_pos
becomes
    k2, v2, kpos2 = entropykv::write(k_cache, v_cache, kpos, k, v, input_pos, slot, layer)
    k_cache.copy_(k2); v_cache.copy_(v2); kpos.copy_(kpos2); slot += L
    attention(q, k2, v2)                      # unmasked: rewrite_attention then masks by positions
so writes go to the next free slot instead of the token's position, and a compressed buffer (kept tokens packed
at its start, see `entropykv_fx.static.StaticCacheModel`) keeps working. `kpos` [B, S] (the position held by
each slot, -1 = empty) and `slot` (the next free slot) are new buffers of the graph module, owned by `state`.
The mask is dropped only when it is built from `input_pos` alone (the model's causal mask), which positions
reproduce; any other mask leaves the site alone.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from .dead_code import eliminate_dead_code
from .find_attention import AttentionSite, find_attention_sites

_ALL = slice(None, None, None)
STATE_PREFIX = "entropykv_state_"  # buffers this pass adds to a graph module (see backend.lift_state)
aten = torch.ops.aten


@dataclass
class StaticLayer:
    """One layer's buffers: the model's own keys/values and the positions and fill state entropykv adds."""

    keys: Tensor
    values: Tensor
    positions: Tensor  # [B, S] int64, -1 = empty
    slot: Tensor  # [] int64: the next slot to write


def _buffer_write(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node] | None:
    """(buffer, input_pos, value) of `buffer[:, :, input_pos] = value` on a graph input."""
    if node.op != "call_function" or node.target is not operator.setitem:
        return None
    buffer, index, value = node.args
    if buffer.op != "placeholder" or not isinstance(index, tuple) or len(index) != 3 or index[:2] != (_ALL, _ALL):
        return None
    return buffer, index[2], value


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if isinstance(n, fx.Node) and n not in seen:
            seen.add(n)
            todo.extend(n.all_input_nodes)
    return seen


def _val(node: fx.Node):
    return node.meta.get("example_value", node.meta.get("val"))


def _causal_mask_only(mask: fx.Node | None, input_pos: fx.Node) -> bool:
    """True when the mask is built from input_pos and boolean graph inputs alone (the model's causal mask)."""
    if mask is None:
        return True
    inputs = [n for n in _ancestors(mask) if n.op == "placeholder"]
    return input_pos in inputs and all(n is input_pos or _val(n).dtype == torch.bool for n in inputs)


def _drop_mask(graph: fx.Graph, site: AttentionSite) -> None:
    if site.mask is None:
        return
    if site.form == "eager":  # (masked_fill | add)(scores, mask, ...) -> scores
        masked = next(n for n in site.nodes if site.mask in n.args[1:2])
        masked.replace_all_uses_with(masked.args[0])
        graph.erase_node(masked)
    else:
        site.output.kwargs = {**site.output.kwargs, "attn_mask": None}
        if len(site.output.args) > 3:
            site.output.args = (*site.output.args[:3], None, *site.output.args[4:])
    site.mask = None


def rewrite_static_caches(gm: fx.GraphModule, example_inputs: list, new_layer: Callable[[Tensor, Tensor], StaticLayer]
                          ) -> tuple[list[StaticLayer], list[str]]:
    """Rewrite every static-buffer site of `gm` in place (see the module docstring).

    `new_layer(keys, values)` returns the state of the next layer given its (real) buffers. Returns the layers in
    site order and, for the sites left alone, why.
    """
    graph = gm.graph
    real = dict(zip(graph.find_nodes(op="placeholder"), example_inputs))
    writes = {w[0]: (node, *w[1:]) for node in graph.nodes if (w := _buffer_write(node)) is not None}
    layers, skipped = [], []
    for site in find_attention_sites(graph):
        k_buf, v_buf = site.kv_source or (site.key, site.value)
        if k_buf not in writes or v_buf not in writes:
            skipped.append(f"{site.output.name}: keys/values are not static buffers written at input_pos")
            continue
        (k_write, input_pos, k_new), (v_write, v_pos, v_new) = writes[k_buf], writes[v_buf]
        if v_pos is not input_pos or not _causal_mask_only(site.mask, input_pos):
            skipped.append(f"{site.output.name}: its mask is not the causal mask of input_pos")
            continue
        index = len(layers)
        layer = new_layer(real[k_buf], real[v_buf])
        layers.append(layer)
        gm.register_buffer(f"{STATE_PREFIX}positions_{index}", layer.positions)
        gm.register_buffer(f"{STATE_PREFIX}slot_{index}", layer.slot)
        order = {n: i for i, n in enumerate(graph.nodes)}
        last_write = max(k_write, v_write, key=order.__getitem__)
        with graph.inserting_before(last_write.next):  # in order, right after the writes
            positions = graph.get_attr(f"{STATE_PREFIX}positions_{index}")
            slot = graph.get_attr(f"{STATE_PREFIX}slot_{index}")
            batch = _val(k_new).shape[0]
            q_pos = graph.call_method("expand", (graph.call_method("unsqueeze", (input_pos, 0)), batch, -1))
            written = graph.call_function(torch.ops.entropykv.write.default,
                                          (k_buf, v_buf, positions, k_new, v_new, q_pos, slot, index))
            parts = [graph.call_function(operator.getitem, (written, i)) for i in range(3)]
            # aten's in-place ops (not Tensor methods), so that dead-code elimination sees their side effects
            copies = [graph.call_function(aten.copy_.default, (target, part))
                      for target, part in zip((k_buf, v_buf, positions), parts)]
            graph.call_function(aten.add_.Scalar, (slot, _val(k_new).shape[2]))
        for write in (k_write, v_write):
            graph.erase_node(write)
        _drop_mask(graph, site)
        # After the write, the buffers hold what `written` returned: later readers take that value.
        for buffer, part in ((k_buf, parts[0]), (v_buf, parts[1])):
            for user in list(buffer.users):
                if order.get(user, -1) > order[last_write] and user is not written and user not in copies:
                    user.replace_input_with(buffer, part)
    eliminate_dead_code(graph)
    graph.lint()
    gm.recompile()
    return layers, skipped
