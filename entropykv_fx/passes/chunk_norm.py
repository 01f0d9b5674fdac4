"""Compute a prefill's RMSNorms a chunk of tokens at a time (`entropykv::rms_norm`).

Pattern, in a Dynamo graph (LlamaRMSNorm and its copies in Mistral and Qwen2/3, their q/k norms included):
    x32 = x.to(float32); r = rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps); out = weight * (x32 * r).to(dtype)
(either order of each product) where nothing else reads the intermediates and weight is one scale per feature,
becomes
    out = entropykv::rms_norm(x, weight, eps, dtype, chunk)
Unchunked, each norm holds two float32 copies of its input at once: with the repeated prompt of a 128k-token
reconstruction prefill in Llama-3-8B, 8 GiB. Norms written otherwise (Gemma's 1 + weight) are left as they were.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

_POW, _MUL, _ADD = (operator.pow, torch.pow), (operator.mul, torch.mul), (operator.add, torch.add)


def _call(node: object, method: str, functions: tuple = ()) -> bool:
    """Whether `node` calls Tensor.`method` or one of `functions`, with positional arguments only."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return False
    return node.target == method if node.op == "call_method" else node.target in functions


def _cast(node: object) -> torch.dtype | None:
    """The dtype of `x.to(dtype)`, or None."""
    if _call(node, "to") and len(node.args) == 2 and not node.kwargs and isinstance(node.args[1], torch.dtype):
        return node.args[1]
    return None


def _other(node: fx.Node, one: fx.Node) -> object | None:
    """The operand of binary `node` that is not `one` (None unless `one` is an operand)."""
    a, b = node.args
    return b if a is one else a if b is one else None


def _shape(node: object) -> tuple[int, ...] | None:
    """The shape of the tensor `node` computes, as Dynamo (example_value) or ShapeProp (tensor_meta) recorded it."""
    if not isinstance(node, fx.Node):
        return None
    value = node.meta.get("example_value", node.meta.get("val", node.meta.get("tensor_meta")))
    return tuple(value.shape) if hasattr(value, "shape") else None


def _norm_at(mean: fx.Node) -> tuple[fx.Node, tuple, list[fx.Node]] | None:
    """(output node, the op's arguments but the chunk, the nodes it replaces) of an RMSNorm whose mean is `mean`."""
    if not (_call(mean, "mean", (torch.mean,)) and mean.args[1:] in ((-1,), ([-1],))
            and mean.kwargs == {"keepdim": True} and len(mean.users) == 1):
        return None
    square = mean.args[0]
    if not (_call(square, "pow", _POW) and len(square.args) == 2 and square.args[1] == 2 and not square.kwargs
            and len(square.users) == 1):
        return None
    upcast = square.args[0]
    if _cast(upcast) is not torch.float32 or len(upcast.users) != 2:
        return None
    shifted = next(iter(mean.users))
    if not (_call(shifted, "add", _ADD) and len(shifted.args) == 2 and not shifted.kwargs and len(shifted.users) == 1):
        return None
    eps = _other(shifted, mean)  # a number: a float, or a node whose value is one (Dynamo's `.item()`), no tensor
    root = next(iter(shifted.users))
    if not (isinstance(eps, (float, fx.Node)) and _shape(eps) is None and _call(root, "rsqrt", (torch.rsqrt,))
            and len(root.args) == 1 and len(root.users) == 1):
        return None
    scaled = next(iter(root.users))
    if not (_call(scaled, "mul", _MUL) and len(scaled.args) == 2 and not scaled.kwargs
            and _other(scaled, root) is upcast and set(upcast.users) == {square, scaled} and len(scaled.users) == 1):
        return None
    cast = next(iter(scaled.users))
    dtype = _cast(cast)
    if dtype is None or len(cast.users) != 1:
        return None
    out = next(iter(cast.users))
    if not (_call(out, "mul", _MUL) and len(out.args) == 2 and not out.kwargs):
        return None
    weight, x = _other(out, cast), upcast.args[0]
    w, shape = _shape(weight), _shape(x)
    if w is None or not shape or len(w) != 1 or not isinstance(w[0], int) or w[0] != shape[-1]:  # a scale per feature
        return None
    return out, (x, weight, eps, dtype), [out, cast, scaled, root, shifted, mean, square, upcast]


def chunk_norm(gm: fx.GraphModule, chunk: int) -> int:
    """Rewrite `gm`'s RMSNorms in place (see the module docstring); returns how many it rewrote."""
    graph, rewritten = gm.graph, 0
    for mean in list(graph.nodes):
        found = _norm_at(mean)
        if found is None:
            continue
        out, args, replaced = found
        with graph.inserting_before(out):
            norm = graph.call_function(torch.ops.entropykv.rms_norm.default, (*args, chunk))
        norm.meta.update({k: v for k, v in out.meta.items() if k in ("example_value", "val", "tensor_meta")})
        out.replace_all_uses_with(norm)
        for node in replaced:
            graph.erase_node(node)
        rewritten += 1
    if rewritten:
        graph.lint()
        gm.recompile()
    return rewritten
