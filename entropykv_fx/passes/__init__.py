"""FX graph passes: find the attention sites of a captured model (rewriting them is the next pass to land).

`explain(obj, *example_args, **example_kwargs)` reports, per captured graph, the attention sites found, in any of
the forms `find_attention_sites` knows. `obj` is an `fx.GraphModule`, a `torch.export.ExportedProgram`, or an
`nn.Module` together with example inputs (captured through Dynamo, as `torch.compile` would).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .find_attention import AttentionSite, find_attention_sites

__all__ = ["AttentionSite", "GraphReport", "explain", "find_attention_sites"]


@dataclass
class GraphReport:
    name: str
    sites: list[AttentionSite]

    def __str__(self) -> str:
        forms = sorted({s.form for s in self.sites})
        lines = [f"{self.name}: {len(self.sites)} attention site(s) found" + (f" ({', '.join(forms)})" if forms else "")]
        lines += [f"  {site}" for site in self.sites]
        return "\n".join(lines)


def _dynamo_graphs(model: nn.Module, args: tuple, kwargs: dict) -> list[fx.GraphModule]:
    graphs: list[fx.GraphModule] = []

    def capture(gm: fx.GraphModule, example_inputs: Any):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=capture, dynamic=False)(*args, **kwargs)
    torch._dynamo.reset()
    return graphs


def explain(obj: Any, *example_args: Any, **example_kwargs: Any) -> list[GraphReport]:
    """Attention sites per graph of `obj` (see the module docstring). `print()` the reports to read them."""
    if isinstance(obj, torch.export.ExportedProgram):
        return [GraphReport("exported program", find_attention_sites(obj.graph_module.graph))]
    if isinstance(obj, fx.GraphModule):
        return [GraphReport("graph module", find_attention_sites(obj.graph))]
    if isinstance(obj, nn.Module):
        if not example_args and not example_kwargs:
            raise ValueError("explain(module): pass example inputs, e.g. explain(model, input_ids), so the module "
                             "can be captured; or pass an fx.GraphModule / torch.export.ExportedProgram")
        graphs = _dynamo_graphs(obj, example_args, example_kwargs)
        return [GraphReport(f"dynamo graph {i}", find_attention_sites(gm.graph)) for i, gm in enumerate(graphs)]
    raise TypeError(f"explain: expected an nn.Module with example inputs, an fx.GraphModule or an ExportedProgram, "
                    f"got {type(obj).__name__}")
