"""The Dynamo backend: rewrite attention (rewrite_attention), then run the graph eagerly or through Inductor.

`torch.compile(model, backend="entropykv")` uses the default settings (no scoring); `entropykv_fx.optimize()`
builds its own backend with the model's settings and a callback that receives each prefill's scores.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx

from ..errors import EntropyKVError
from ..projections import FusedProjections
from .chunk_mlp import chunk_mlp
from .chunk_norm import chunk_norm
from .fuse_projections import fuse_projections
from .rewrite_attention import RewriteResult, RewriteSettings, rewrite_attention
from .static_cache import STATE_PREFIX

StatsCallback = Callable[[list[int], Sequence[Tensor]], None]

# Selection sorts stay aten.sort calls: Inductor's fused Triton sort (a persistent reduction) of the pooled
# scores fails to compile on the H100 (Triton 3.6, "PassManager::run failed" in TritonGPUCoalesce).
INDUCTOR_CONFIGS = {"triton.persistent_reductions": False}


class UnrewrittenAttentionError(EntropyKVError, RuntimeError):
    """A graph holds attention that the pass could not rewrite, and running it unrewritten would be wrong."""


@dataclass
class EntropyKVBackend:
    """A torch.compile backend. `results` records what the pass did to every graph it compiled.

    inductor: compile the rewritten graph with Inductor (`mode` as in torch.compile, e.g. "reduce-overhead"
        for CUDA graphs) instead of running it eagerly.
    strict: refuse (UnrewrittenAttentionError) a graph with an attention site left alone.
    on_stats: receives (scored layers, [entropy, kv_scores, layer_scores(, statistic)] * layers) after each
        prefill graph; without it scores are not computed.
    on_run: called with the number of rewritten sites after every run of a compiled graph.
    projections: the model's fused projections; decode graphs run without gradients compute each group with one
        matmul (`passes.fuse_projections`).
    token_chunk: prefill graphs run without gradients compute their gated MLPs and (unless Inductor compiles
        them) RMSNorms this many tokens at a time (`passes.chunk_mlp`, `passes.chunk_norm`); None: as the model
        wrote them.
    """

    settings: RewriteSettings = field(default_factory=RewriteSettings)
    inductor: bool = False
    mode: str | None = None
    strict: bool = True
    on_stats: StatsCallback | None = None
    on_run: Callable[[int], None] | None = None
    projections: FusedProjections | None = None
    token_chunk: int | None = None
    results: list[RewriteResult] = field(default_factory=list)

    def __repr__(self) -> str:  # short: Dynamo quotes the backend in its error messages
        return f"EntropyKVBackend(inductor={self.inductor}, mode={self.mode!r}, strict={self.strict})"

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        settings = self.settings if self.on_stats is not None else RewriteSettings(None, self.settings.sliding_windows)
        gm, result = rewrite_attention(gm, settings)
        self.results.append(result)
        if self.strict and result.left_alone:
            raise UnrewrittenAttentionError("entropykv: cannot rewrite this graph's attention:\n  " +
                                            "\n  ".join(str(o) for o in result.left_alone))
        # Prefill is compute-bound (fusing buys little); a graph that records gradients keeps one matmul per weight,
        # since the fused view reaches past the first weight, where its gradient cannot go.
        if self.projections is not None and not result.prefill and not torch.is_grad_enabled():
            fuse_projections(gm, example_inputs, self.projections)
        if self.token_chunk is not None and result.prefill and not torch.is_grad_enabled():  # the ops have no backward
            result.chunked_mlps = chunk_mlp(gm, self.token_chunk)
            if not self.inductor:  # Inductor fuses a norm into one kernel that holds no float32 copy of its input
                result.chunked_norms = chunk_norm(gm, self.token_chunk)
        run = self._compile(gm, example_inputs)
        n_stats, sites = result.stats_per_layer * len(result.scored_layers), result.rewritten
        if not n_stats and self.on_run is None:
            return run

        def run_and_report(*args: Any) -> Any:
            outs = run(*args)
            if self.on_run is not None:
                self.on_run(sites)
            if not n_stats:
                return outs
            self.on_stats(result.scored_layers, outs[-n_stats:])
            return outs[:-n_stats]

        return run_and_report

    def _compile(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        if not self.inductor:
            return gm.forward
        from torch._inductor.compile_fx import compile_fx

        register_state(gm)
        patches = {**INDUCTOR_CONFIGS, **(torch._inductor.list_mode_options(self.mode) if self.mode else {})}
        return compile_fx(gm, example_inputs, config_patches=patches)


def register_state(gm: fx.GraphModule) -> None:
    """Give the buffers our passes added to a Dynamo graph module (static caches' positions and fill state) a
    source, as Dynamo does for the model's own. AOTAutograd then lifts them like model buffers: inputs that may
    be mutated and that keep their addresses, which CUDA graphs neither copy nor refuse."""
    from torch._dynamo.source import ConstantSource

    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:  # not a Dynamo graph: nothing to declare
        return
    for name, _ in gm.named_buffers():
        if name.startswith(STATE_PREFIX):
            sources.setdefault(name, ConstantSource(name))


def own_code(forward: Any) -> Any:
    """`forward` behind a function with a code object of its own, to compile it apart from anything else.

    Dynamo keeps compiled graphs (and its recompile limit of 8) per code object, and every transformers model
    forward goes through one shared decorator: without this, a few compiled models in one process would
    exhaust the limit and fall back to running uncompiled (for optimize(): unrewritten).
    """
    def entropykv_forward(*args: Any, **kwargs: Any) -> Any:
        return forward(*args, **kwargs)

    code = entropykv_forward.__code__.replace()
    return functools.wraps(forward)(types.FunctionType(code, entropykv_forward.__globals__, code.co_name, None,
                                                       entropykv_forward.__closure__))


def _registered(gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Callable[..., Any]:
    """`backend="entropykv"`; torch.compile's `options` may set `inductor`, `mode` and `strict`."""
    return EntropyKVBackend(**options)(gm, example_inputs)


torch._dynamo.register_backend(_registered, name="entropykv")
