"""Find attention sites in an FX graph, in the three forms they take.

- "sdpa": `F.scaled_dot_product_attention` as Dynamo records it (a torch.compile backend's graph);
- "aten_sdpa": `aten.scaled_dot_product_attention.default` (a torch.export graph);
- "eager": matmul(q, kᵀ) -> [mul|div by a scale] -> [add mask | masked_fill] -> softmax(-1) -> [cast|dropout] -> matmul(·, v),
  with the GQA head repetition (unsqueeze -> expand -> reshape, or repeat_interleave) of k/v seen through.

Each site records where q, k and v come from, the scale, the mask and the causal flag, so a rewrite pass
can replace the whole subgraph with entropykv ops.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx

aten = torch.ops.aten

_SDPA = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
_ATEN_SDPA = {aten.scaled_dot_product_attention.default}
_MATMUL = {torch.matmul, operator.matmul, aten.matmul.default, aten.bmm.default, torch.bmm}
_SOFTMAX = {torch.softmax, F.softmax, aten.softmax.int, aten._softmax.default, "softmax"}
_SCALE = {operator.mul: False, operator.truediv: True, torch.mul: False, torch.div: True,
          aten.mul.Tensor: False, aten.div.Tensor: True}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_MASKED_FILL = {"masked_fill", torch.masked_fill, aten.masked_fill.Scalar}  # (scores, hidden, -inf): mask = hidden
_TRANSPOSE = {torch.transpose, aten.transpose.int, "transpose"}
# Ops that only carry a tensor along (dtype casts, inference-mode dropout, views that keep the data).
_PASS_THROUGH = {"to", "type_as", "contiguous", F.dropout, aten.dropout.default, aten._to_copy.default,
                 aten.to.dtype, aten.to.dtype_layout, aten.type_as.default, aten.contiguous.default}
_GQA_STEPS = {aten.expand.default, aten.reshape.default, aten.unsqueeze.default, aten.view.default,
              aten.repeat_interleave.self_int, aten.clone.default, "expand", "reshape", "view", "unsqueeze",
              "repeat_interleave", "contiguous", torch.repeat_interleave, operator.getitem}


@dataclass
class AttentionSite:
    """One attention computation found in a graph."""

    output: fx.Node  # the node whose value is the attention output
    form: str  # "sdpa" | "aten_sdpa" | "eager"
    query: fx.Node
    key: fx.Node
    value: fx.Node
    mask: fx.Node | None = None
    is_causal: bool = False
    scale: float | None = None  # None: 1/sqrt(head_dim), SDPA's default
    kv_source: tuple[fx.Node, fx.Node] | None = None  # k, v before GQA repetition, when it was seen through
    nodes: list[fx.Node] = field(default_factory=list)  # every node of the site (eager form), output last

    def __str__(self) -> str:
        gqa = f", GQA from {self.kv_source[0].name}/{self.kv_source[1].name}" if self.kv_source else ""
        mask = self.mask.name if isinstance(self.mask, fx.Node) else None
        return (f"{self.output.name} [{self.form}]: q={self.query.name} k={self.key.name} v={self.value.name} "
                f"mask={mask} causal={self.is_causal} scale={self.scale}{gqa}")


def _target_key(node: fx.Node):
    return node.target  # a callable for call_function, a method name for call_method


def _is(node, kinds) -> bool:
    return isinstance(node, fx.Node) and node.op in ("call_function", "call_method") and _target_key(node) in kinds


def _data_users(node: fx.Node) -> list[fx.Node]:
    """Users that consume the value (torch.export adds metadata assertions as extra users)."""
    return [u for u in node.users if u.target is not aten._assert_tensor_metadata.default]


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _selects_output(node: fx.Node) -> bool:
    """getitem(x, i) with an int i picks one output of a multi-output op: not a view of a tensor."""
    return _target_key(node) is operator.getitem and isinstance(node.args[1], int)


def _unwrap_gqa(node: fx.Node) -> fx.Node | None:
    """The tensor before a repeat_kv-style chain (unsqueeze/getitem -> expand -> reshape), if `node` ends one."""
    start, steps, seen_expand = node, 0, False
    while _is(node, _GQA_STEPS) and steps < 6 and not _selects_output(node):
        seen_expand |= _target_key(node) in (aten.expand.default, "expand", aten.repeat_interleave.self_int,
                                             "repeat_interleave", torch.repeat_interleave)
        node, steps = node.args[0], steps + 1
    return node if seen_expand and node is not start and isinstance(node, fx.Node) else None


def _sdpa_site(node: fx.Node, form: str) -> AttentionSite:
    q, k, v = node.args[:3]
    site = AttentionSite(node, form, q, k, v, mask=_arg(node, 3, "attn_mask"),
                         is_causal=bool(_arg(node, 5, "is_causal", False)), scale=_arg(node, 6, "scale"))
    k0, v0 = _unwrap_gqa(k), _unwrap_gqa(v)
    if k0 is not None and v0 is not None:
        site.kv_source = (k0, v0)
    return site


def _eager_site(softmax: fx.Node) -> AttentionSite | None:
    """matmul -> [scale] -> [add mask] -> softmax -> [pass-through] -> matmul, anchored at the softmax."""
    dim = _arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        return None
    nodes, mask, scale = [softmax], None, None
    x = softmax.args[0]
    if _is(x, _ADD) or _is(x, _MASKED_FILL):
        x, mask = x.args[0], x.args[1]
        nodes.append(softmax.args[0])
    if _is(x, _SCALE) and isinstance(x.args[1], (int, float)):
        scale = 1.0 / x.args[1] if _SCALE[_target_key(x)] else float(x.args[1])
        nodes.append(x)
        x = x.args[0]
    if not _is(x, _MATMUL) or not _is(x.args[1], _TRANSPOSE):
        return None
    scores, k_t = x, x.args[1]
    if sorted(int(d) % 4 for d in k_t.args[1:3]) != [2, 3]:
        return None
    out = softmax
    while len(_data_users(out)) == 1 and _is(_data_users(out)[0], _PASS_THROUGH):
        out = _data_users(out)[0]
        nodes.append(out)
    users = _data_users(out)
    consumer = users[0] if len(users) == 1 else None
    if consumer is None or not _is(consumer, _MATMUL) or consumer.args[0] is not out:
        return None
    q, k, v = scores.args[0], k_t.args[0], consumer.args[1]
    site = AttentionSite(consumer, "eager", q, k, v, mask=mask, scale=scale,
                         nodes=[k_t, scores, *reversed(nodes), consumer])
    k0, v0 = _unwrap_gqa(k), _unwrap_gqa(v)
    if k0 is not None and v0 is not None:
        site.kv_source = (k0, v0)
    return site


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """Every attention site of `graph`, in graph order."""
    sites = []
    for node in graph.nodes:
        if _is(node, _SDPA):
            sites.append(_sdpa_site(node, "sdpa"))
        elif _is(node, _ATEN_SDPA):
            sites.append(_sdpa_site(node, "aten_sdpa"))
        elif _is(node, _SOFTMAX):
            site = _eager_site(node)
            if site is not None:
                sites.append(site)
    return sites
