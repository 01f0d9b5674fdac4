"""Compute a prefill's gated MLPs a chunk of tokens at a time (`entropykv::gated_mlp`).

Pattern, in a Dynamo graph (the MLPs of Llama, Mistral and Qwen2/3, and tanh-gelu ones; no biases):
    g = linear(x, w_gate); u = linear(x, w_up); out = linear(act(g) * u, w_down)      (either order of the product)
where act is silu or tanh-approximated gelu and nothing else reads g, act(g), u or the product, becomes
    out = entropykv::gated_mlp(x, w_gate, w_up, w_down, act, chunk)
An MLP's intermediates are the largest tensors of a long prefill (3 x tokens x I, I = 14336 in Llama-3-8B: 10.5 GiB
at 128k tokens in bf16); chunked, they take `chunk` tokens' worth. Anything else is left as it was.
"""

from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx

from .fuse_projections import LINEAR_CALLS


def _activation(node: fx.Node) -> str | None:
    """The `ops.GATED_ACTIVATIONS` name of an activation call, or None."""
    if node.op != "call_function" or len(node.args) != 1:
        return None
    if node.target is F.silu and not node.kwargs.get("inplace", False):
        return "silu"
    if node.target is F.gelu and node.kwargs == {"approximate": "tanh"}:
        return "gelu_tanh"
    return None


def _linear_weight(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(input, weight) of a bias-free linear call, or None."""
    if node.op != "call_function" or node.target not in LINEAR_CALLS or node.kwargs or len(node.args) not in (2, 3):
        return None
    if len(node.args) == 3 and node.args[2] is not None:
        return None
    return node.args[0], node.args[1]


def chunk_mlp(gm: fx.GraphModule, chunk: int) -> int:
    """Rewrite `gm`'s gated MLPs in place (see the module docstring); returns how many it rewrote."""
    graph, rewritten = gm.graph, 0
    for down in list(graph.nodes):
        down_call = _linear_weight(down)
        if down_call is None or down_call[0].op != "call_function" or down_call[0].target not in (operator.mul,
                                                                                                   torch.mul):
            continue
        product = down_call[0]
        if len(product.args) != 2 or product.kwargs:
            continue
        for act_node, up in (product.args, product.args[::-1]):
            if not isinstance(act_node, fx.Node) or not isinstance(up, fx.Node):
                continue
            activation = _activation(act_node)
            gate = act_node.args[0] if activation else None
            gate_call = _linear_weight(gate) if isinstance(gate, fx.Node) else None
            up_call = _linear_weight(up)
            if gate_call is None or up_call is None or gate_call[0] is not up_call[0]:
                continue
            if any(len(n.users) != 1 for n in (gate, act_node, up, product)):
                continue
            with graph.inserting_before(down):
                fused = graph.call_function(torch.ops.entropykv.gated_mlp.default,
                                            (gate_call[0], gate_call[1], up_call[1], down_call[1], activation, chunk))
            down.replace_all_uses_with(fused)
            for node in (down, product, act_node, up, gate):
                graph.erase_node(node)
            rewritten += 1
            break
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten
