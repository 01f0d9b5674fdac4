"""Compression for models that keep their own static KV buffers (gpt-fast style), through the graph pass.

    model = StaticCacheModel(gpt, policy="uniform", budget=0.5)   # gpt(idx, input_pos) writes k_cache[:, :, input_pos]
    logits = model(prompt, torch.arange(n))                       # prefill: scored, then compressed in place
    logits = model(token, torch.tensor([n]))                      # decode: written into the next free slot

The forward is compiled with `passes.static_cache` (buffer writes -> entropykv::write into the next free slot,
attention masked by positions) followed by `passes.rewrite_attention` (attention -> entropykv ops, scoring on
multi-token calls). After a prefill, each layer's kept tokens are packed at the start of its buffers (positions
-1 after them), so later tokens follow them. The buffers keep their size: the model allocated them; what
compression buys here is room, since `max_seq_len` now bounds the kept tokens, not all tokens seen.
A call whose positions start again at 0 begins a new sequence (`reset()` does the same by hand). Layer-wise
policies with entropy-based budgets only (default `uniform`); shapes are static, so a new prompt length compiles a
new prefill graph, and the decode graph suits CUDA graphs: `StaticCacheModel(gpt, inductor=True,
mode="reduce-overhead")`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .cache import CompressedLayer, PrefillStats
from .compress import kept_slots, layer_budgets
from .config import EntropyKVConfig
from .passes.backend import EntropyKVBackend, own_code
from .passes.rewrite_attention import RewriteSettings
from .passes.static_cache import StaticLayer, rewrite_static_caches
from .policies import POLICIES
from .scorers import SCORERS


class StaticCacheModel:
    """Wraps a static-buffer model (see the module docstring); call it like the model."""

    def __init__(self, model: nn.Module, config: EntropyKVConfig | None = None, *, inductor: bool = False,
                 mode: str | None = None, **overrides: Any) -> None:
        # the library's default (cache_topk, reconstruct) needs a reconstruction prefill: the static default is uniform
        cfg = (config or EntropyKVConfig(policy="uniform")).replace(**overrides) if overrides or config is None \
            else config
        if POLICIES[cfg.policy].allocate is None or cfg.budget_source != "dynamic":
            raise ValueError(f"StaticCacheModel: policy {cfg.policy!r} with budget_source={cfg.budget_source!r} is "
                             "not supported; use a policy whose layer budgets come from entropies alone, with "
                             "dynamic budgets (entropy, uniform, pyramidkv, streaming, full)")
        if SCORERS[cfg.scorer].reconstruct:
            raise ValueError("StaticCacheModel: scorer='reconstruct' needs a reconstruction prefill (the prompt run "
                             "twice), which static buffers do not hold; use scorer='window', 'last_query' or 'key_norm'")
        self.model, self.config = model, cfg
        self.layers: list[StaticLayer] = []
        self.stats: dict[int, PrefillStats] = {}
        policy = POLICIES[cfg.policy]
        self.backend = EntropyKVBackend(RewriteSettings(cfg.window if policy.needs_scores else None,
                                                        rank_queries=SCORERS[cfg.scorer].rank_queries),
                                        inductor=inductor, mode=mode, on_stats=self._receive)
        self.compiled = torch.compile(own_code(model.__call__), backend=self._compile, dynamic=False)

    def _compile(self, gm, example_inputs):
        known = self.layers

        def new_layer(keys: Tensor, values: Tensor) -> StaticLayer:
            i = len(fresh)
            if i < len(known) and known[i].keys is keys:  # a recompile (new prompt length): same buffers and state
                layer = known[i]
            else:
                b, s = keys.shape[0], keys.shape[2]
                layer = StaticLayer(keys, values, torch.full((b, s), -1, dtype=torch.long, device=keys.device),
                                    torch.zeros((), dtype=torch.long, device=keys.device))
            fresh.append(layer)
            return layer

        fresh: list[StaticLayer] = []
        layers, skipped = rewrite_static_caches(gm, example_inputs, new_layer)
        if skipped or not layers:
            raise ValueError("StaticCacheModel: cannot rewrite this model's attention: " +
                             ("; ".join(skipped) or "no attention over static KV buffers was found"))
        self.layers = layers
        return self.backend(gm, example_inputs)

    def _receive(self, layers: list[int], tensors: list[Tensor]) -> None:
        self.stats = PrefillStats.unflatten(layers, tensors)

    def reset(self) -> None:
        """Forget the sequence: every slot empty."""
        for layer in self.layers:
            layer.positions.fill_(-1)
            layer.slot.zero_()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; positions (`input_pos`, the second argument) starting again at 0 begin a new sequence."""
        input_pos = kwargs.get("input_pos", args[1] if len(args) > 1 else None)
        if isinstance(input_pos, Tensor) and input_pos.numel() and int(input_pos.min()) == 0 and any(
                int(layer.slot) for layer in self.layers):
            self.reset()
        self.stats = {}
        with torch.no_grad():
            out = self.compiled(*args, **kwargs)
            if self.stats and POLICIES[self.config.policy].evicts:
                self._compress()
        return out

    def kept_slots(self) -> list[int]:
        return [int(layer.slot) for layer in self.layers]

    def _compress(self) -> None:
        cfg = self.config
        n_tokens = int((self.layers[0].positions >= 0).sum(-1).max())
        entropies = [float(self.stats[i].entropy.mean()) if i in self.stats else math.nan for i in range(len(self.layers))]
        for i, (layer, budget) in enumerate(zip(self.layers, layer_budgets(entropies, n_tokens, cfg))):
            view = CompressedLayer.holding(layer.keys, layer.values, layer.positions, self.stats.get(i))
            keys, values, positions = kept_slots(view, budget, cfg)
            kept = positions.shape[-1]
            layer.keys[:, :, :kept], layer.values[:, :, :kept] = keys, values
            layer.keys[:, :, kept:], layer.values[:, :, kept:] = 0, 0
            layer.positions[:, :kept] = positions
            layer.positions[:, kept:] = -1
            layer.slot.fill_(kept)
