"""Dead-code elimination that keeps in-place mutations.

FX's own `eliminate_dead_code` treats every `call_method` node as pure, so an in-place method whose result is unused,
`x.copy_(y)`, is dropped, and with it what the model meant to write. Dynamo emits exactly that for transformers'
tensor-parallel row-wise layers (`output.copy_(wait_tensor(all_reduce(output)))`), and for any in-place tensor method
in a model's or a hook's code; dropping it silently changes the model's output.
"""

from __future__ import annotations

import torch
from torch import fx


def mutates(node: fx.Node) -> bool:
    """Whether running `node` has an effect besides its result: FX's own notion, plus in-place tensor methods
    (`x.add_(y)` as a method call, or `torch.Tensor.add_` as a function)."""
    if node.is_impure():
        return True
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and getattr(torch.Tensor, getattr(node.target, "__name__", ""), None) is node.target:
        name = node.target.__name__
    else:
        return False
    return isinstance(name, str) and name.endswith("_") and not name.startswith("_")


def eliminate_dead_code(graph: fx.Graph) -> None:
    """Remove the nodes nothing uses, keeping every node that `mutates`."""
    graph.eliminate_dead_code(is_impure_node=mutates)
