"""A decode step of an optimized model, recorded once as a CUDA graph and replayed: what `generate()` runs on a GPU.

Why: an eager decode step of an 8B model launches hundreds of small kernels from Python, and the GPU waits for
them (`benchmarks/speed.py`: 8x the bandwidth-bound step at 8k context). A step that feeds one token per row into a
cache with room (`cache.EntropyKVCache.make_room`) touches tensors whose shapes and addresses stay the same from
step to step, so the whole compiled decoder (the model's own modules, rewritten by the graph pass) can be replayed
from a CUDA graph, the way transformers' compiled generation replays its static cache.

The first step over a new room runs eagerly (its output is that call's) and then records the graph; the following
steps copy their inputs (embeddings, positions) into the recorded ones and replay. A graph is replayed only for
the cache it was recorded over, while every tensor of that cache is where it was (checked from the tensors'
addresses at each step); anything else records anew.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .cache import EntropyKVCache


def _addresses(cache: EntropyKVCache) -> tuple:
    return tuple((t.data_ptr(), tuple(t.shape)) for layer in cache.layers for t in layer.buffers())


class StepGraph:
    """One recorded decode step over one cache. `inputs`: the step's tensors (embeddings [B, 1, H], model positions
    [B, 1], mask positions [B, 1]), copied into the graph's own at each replay."""

    def __init__(self, cache: EntropyKVCache, inputs: tuple[Tensor, ...], options: dict[str, Any]) -> None:
        self.cache = weakref.ref(cache)  # a finished generation's cache is not kept alive by its graph
        self.addresses = _addresses(cache)
        self.inputs = inputs
        self.options = options
        self.graph = torch.cuda.CUDAGraph()
        self.output: Any = None

    @classmethod
    def record(cls, step: Callable[[], Any], cache: EntropyKVCache, inputs: tuple[Tensor, ...],
               options: dict[str, Any]) -> StepGraph:
        """Record `step()` (which reads `inputs` and writes the cache's room) without running it: the cache is
        left as it was."""
        recorded = cls(cache, inputs, options)
        with torch.cuda.graph(recorded.graph):
            recorded.output = step()
        return recorded

    def fits(self, cache: EntropyKVCache, inputs: tuple[Tensor, ...], options: dict[str, Any]) -> bool:
        """Whether replaying this graph is exactly the step `inputs` asks for on `cache`."""
        return (self.cache() is cache and options == self.options
                and all(a.shape == b.shape and a.dtype == b.dtype for a, b in zip(inputs, self.inputs))
                and _addresses(cache) == self.addresses)

    def load(self, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Copy the step's inputs into the graph's; returns the graph's (the cache must see those)."""
        for mine, given in zip(self.inputs, inputs):
            mine.copy_(given)
        return self.inputs

    def replay(self) -> Any:
        """Run the recorded step; returns the decoder's output, its hidden states copied out of the graph."""
        self.graph.replay()
        out = self.output
        return type(out)(**{**out, "last_hidden_state": out.last_hidden_state.clone()})
