"""Compute each fused group of projections (`entropykv_fx.projections`) with one matmul.

Pattern, in a Dynamo graph whose weights are graph inputs:
    q = linear(x, w_q, b_q); k = linear(x, w_k, b_k); v = linear(x, w_v, b_v)
where w_q, w_k, w_v are consecutive rows of one tensor (`FusedProjections.fuse`), becomes
    qkv = linear(x, as_strided(w_q, [rows of all three, in]), as_strided(b_q, ...))
    q, k, v = narrow(qkv, -1, ...)
A group is rewritten only when all its members read the same input; anything else is left as it was.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import Tensor, fx

from ..projections import FusedGroup, FusedProjections

LINEAR_CALLS = (torch._C._nn.linear, torch.nn.functional.linear)  # how a Dynamo graph calls a linear layer


def fuse_projections(gm: fx.GraphModule, example_inputs: list, fused: FusedProjections) -> fx.GraphModule:
    """Rewrite `gm` in place (see the module docstring); `example_inputs` are the real graph inputs."""
    graph = gm.graph
    real = dict(zip(graph.find_nodes(op="placeholder"), example_inputs))
    members = fused.members()
    calls: dict[tuple[fx.Node, int], dict[int, fx.Node]] = defaultdict(dict)
    groups: dict[int, FusedGroup] = {}
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in LINEAR_CALLS or node.kwargs or len(node.args) < 2:
            continue
        weight = real.get(node.args[1])
        hit = members.get((weight.data_ptr(), tuple(weight.shape))) if isinstance(weight, Tensor) else None
        bias = node.args[2] if len(node.args) > 2 else None
        if hit is None or (bias is None) != (hit[0].bias is None):
            continue
        group, i = hit
        groups[id(group)] = group
        calls[(node.args[0], id(group))][i] = node
    order = {n: i for i, n in enumerate(graph.nodes)}  # the linear calls' places; nodes added below need none
    for (x, key), found in calls.items():
        group = groups[key]
        if len(found) != len(group.linears):
            continue
        nodes = [found[i] for i in range(len(group.linears))]
        with graph.inserting_before(min(nodes, key=order.__getitem__)):
            weight = graph.call_function(torch.as_strided, (nodes[0].args[1], tuple(group.weight.shape),
                                                            tuple(group.weight.stride())))
            bias = None if group.bias is None else graph.call_function(
                torch.as_strided, (nodes[0].args[2], tuple(group.bias.shape), tuple(group.bias.stride())))
            out = graph.call_function(torch._C._nn.linear, (x, weight, bias))
            start = 0
            for node, size in zip(nodes, group.sizes):
                node.replace_all_uses_with(graph.call_function(torch.narrow, (out, -1, start, size)))
                start += size
        for node in nodes:
            graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm
