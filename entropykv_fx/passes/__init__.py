"""FX graph passes: find attention sites, pair them with their cache, rewrite them into entropykv ops.

`explain(obj, *example_args, **example_kwargs)` reports, per captured graph, the attention sites found and what
the rewrite did with each (rewritten, or left alone and why). `obj` is an `fx.GraphModule`, a
`torch.export.ExportedProgram`, or an `nn.Module` with example inputs: a model prepared by `entropykv_fx.optimize`
is run through a prefill and one decode step; any other module is captured through Dynamo, as torch.compile would.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .backend import EntropyKVBackend, UnrewrittenAttentionError, own_code
from .find_attention import AttentionSite, find_attention_sites
from .rewrite_attention import RewriteResult, RewriteSettings, SiteOutcome, rewrite_attention

__all__ = ["AttentionSite", "EntropyKVBackend", "GraphReport", "RewriteResult", "RewriteSettings", "SiteOutcome",
           "UnrewrittenAttentionError", "explain", "find_attention_sites", "rewrite_attention"]


@dataclass
class GraphReport:
    name: str
    outcomes: list[SiteOutcome]

    @property
    def sites(self) -> list[AttentionSite]:
        return [o.site for o in self.outcomes]

    @property
    def found(self) -> int:
        return len(self.outcomes)

    @property
    def rewritten(self) -> int:
        return sum(o.rewritten for o in self.outcomes)

    def __str__(self) -> str:
        forms = sorted({o.site.form for o in self.outcomes})
        lines = [f"{self.name}: {self.found} attention site(s) found" + (f" ({', '.join(forms)})" if forms else "") +
                 f", {self.rewritten} rewritten, {self.found - self.rewritten} left alone"]
        lines += [f"  {o}" for o in self.outcomes]
        return "\n".join(lines)


def _graph_report(name: str, gm: fx.GraphModule) -> GraphReport:
    _, result = rewrite_attention(copy.deepcopy(gm), RewriteSettings())
    return GraphReport(name, result.outcomes)


def _name(result: RewriteResult, i: int) -> str:
    return f"graph {i} ({'prefill' if result.prefill else 'decode' if result.outcomes else 'no attention'})"


def explain(obj: Any, *example_args: Any, **example_kwargs: Any) -> list[GraphReport]:
    """Attention sites and rewrite outcomes per graph of `obj` (see the module docstring). `print()` the reports."""
    if isinstance(obj, torch.export.ExportedProgram):
        return [_graph_report("exported program", obj.graph_module)]
    if isinstance(obj, fx.GraphModule):
        return [_graph_report("graph module", obj)]
    if not isinstance(obj, nn.Module):
        raise TypeError(f"explain: expected an nn.Module with example inputs, an fx.GraphModule or an "
                        f"ExportedProgram, got {type(obj).__name__}")
    if not example_args and not example_kwargs:
        raise ValueError("explain(module): pass example inputs, e.g. explain(model, input_ids), so the module "
                         "can be captured; or pass an fx.GraphModule / torch.export.ExportedProgram")
    handle = obj.__dict__.get("entropykv")  # the handle of entropykv_fx.optimize(), if any
    with torch.no_grad():
        if handle is not None:  # the prefill and decode graphs of this model, compiled afresh
            results = handle.graphs_of(lambda: obj.generate(*example_args, **example_kwargs, max_new_tokens=2,
                                                            do_sample=False))
        else:
            backend = EntropyKVBackend(strict=False)
            torch.compile(own_code(obj.__call__), backend=backend, dynamic=False)(*example_args, **example_kwargs)
            results = backend.results
    return [GraphReport(_name(r, i), r.outcomes) for i, r in enumerate(results)]
