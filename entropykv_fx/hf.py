"""The runtime: `optimize(model)` for Llama, Qwen2, Qwen3 and Mistral causal LMs, and the handle it leaves.

What happens to one prefill, in the order it runs (all of it in `Optimized.forward`):

1. `optimize()` registers transformers' own SDPA attention under the name "entropykv" without a mask function
   (masks come from positions) and puts `Optimized.forward` in place of the *decoder's* forward
   (`model.model.forward`); the causal-LM head, the loss and `generate()` stay transformers' own code.
2. A call arrives with the cache under either argument name (`compat.cache_in_call`). The inputs are checked
   before any work (`_check_call`), an `EntropyKVCache` is put in place of a missing or empty cache, and the
   logical positions of the new tokens (-1 for left padding) are recorded on the cache (`begin_step`), whose
   `entropykv::append` op carries them into the graph.
3. The decoder runs compiled by the entropykv Dynamo backend: its graph pass pairs each attention call with its
   cache update and rewrites it into `entropykv::attention`; on a prefill graph it adds `entropykv::score`, whose
   results come back typed (`PrefillStats`, one per layer) onto the cache's layers.
4. After a prefill, `compress.compress_cache` turns the statistics into budgets (the policy), selects and
   gathers each row's kept slots and stacks the rows again; after every step, sliding-window layers drop the
   slots no later query can attend. When the budgets need no statistic (`compress.budgets_before_scores`), the
   graph calls `_compress_layer_now` right after each layer's attention instead, so each layer is compressed
   before the next runs and the prefill never holds every layer's full cache.

Decode steps (one token per row) write into room reserved on the cache (`EntropyKVCache.make_room`) and, on a GPU,
replay a CUDA graph recorded at the first step (`entropykv_fx.step_graph`); see `optimize`.

Compiled graphs are kept per call *kind* (prefill or continuation, one token or several, batch of one or more,
cache layout, hidden-state output), each under its own code object, so any sequence of valid calls runs on a
small, bounded set of graphs, and a new budget or policy never recompiles. `restore(model)` undoes everything.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import CompressedLayer, EntropyKVCache, PrefillStats
from .compat import cache_in_call, check_transformers_version, with_cache
from .composition import Composition
from .compress import (
    CompressionReport,
    LayerReport,
    budgets_before_scores,
    compress_cache,
    compress_layer_now,
    trim_before_budgets,
    trim_layer_now,
    uncompressed_report,
)
from .config import ConfigError, EntropyKVConfig
from .errors import ArgumentTypeError, EntropyKVError, InputError, PositionRangeWarning, short_repr
from .parallel import check_same_positions, check_same_stats, combine_prefill_stats, local_heads, tensor_parallel_group
from .passes.backend import EntropyKVBackend, own_code
from .passes.rewrite_attention import RewriteResult, RewriteSettings
from .policies import POLICIES
from .projections import FusedProjections
from .reconstruct import repeat_context
from .scorers import SCORERS
from .step_graph import StepGraph

logger = logging.getLogger("entropykv_fx")

ATTN_NAME = "entropykv"
SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")
# Keywords of the decoder's forward that select an output or a code path, hence a graph of their own.
_GRAPH_FLAGS = ("output_hidden_states",)
# A prefill's gated MLPs and RMSNorms run this many tokens at a time (`passes.chunk_mlp`, `passes.chunk_norm`; not
# on tensor-parallel shards, whose sharded weights the MLP op does not take): their intermediates then stop growing
# with the prompt.
PREFILL_CHUNK_TOKENS = 16384
# optimize()'s options on a first call (a later call keeps the model's current ones unless given)
_OPTION_DEFAULTS = {"inductor": False, "verify_ranks": False, "cuda_graphs": True, "fuse_projections": True}
# Keywords that the rewritten decoder ignores: positions come from the cache (`begin_step`).
_IGNORED = ("cache_position", "return_dict")
_INDUCTOR_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
_CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # Inductor records CUDA graphs itself in these
# Slots reserved per layer for the coming one-token steps when a cache runs out of room: each refill copies the
# cache once and records a new step graph, so it is amortized over this many tokens.
DECODE_ROOM = 256


class UnsupportedModelError(EntropyKVError, TypeError):
    pass


class NotOptimizedError(EntropyKVError, ValueError):
    """A function that needs `optimize()`'s handle got a model without one (never optimized, or restored)."""


class UnsupportedCallError(EntropyKVError, ValueError):
    """A call the optimized model cannot run correctly; raised before any work, naming what to change."""


class Optimized:
    """What `optimize()` did to a model: its `config`, the `last_report`, `explain()`, `restore()`.

    `model.entropykv` holds it (the functions `entropykv_fx.report/explain/restore(model)` read it from there).
    """

    def __init__(self, model: nn.Module, config: EntropyKVConfig, inductor: bool, mode: str | None,
                 tp_group: Any, verify_ranks: bool, cuda_graphs: bool, fuse_projections: bool) -> None:
        self.model, self.config, self.inductor, self.mode = model, config, inductor, mode
        self.cuda_graphs = cuda_graphs  # decode steps on a GPU replay a recorded graph (entropykv_fx.step_graph)
        self.fuse_projections = fuse_projections  # decode graphs: q/k/v and gate/up in one matmul each
        self.projections: FusedProjections | None = None
        self._step_graph: StepGraph | None = None
        self.tp_group, self.verify_ranks = tp_group, verify_ranks  # tensor parallelism (entropykv_fx.parallel)
        self.decoder: nn.Module = model.model
        self.num_layers = len(self.decoder.layers)
        self.sliding_windows = _sliding_windows(model, self.decoder.layers)
        self.last_report: CompressionReport | None = None
        self.graphs: list[RewriteResult] = []  # what the pass did to every graph compiled for this model
        self._eager_forward = self.decoder.forward  # the decoder's own (bound) forward
        self._attn_implementation = model.config._attn_implementation
        self._compiled: dict[tuple, Any] = {}
        self._stats_sink: EntropyKVCache | None = None  # the cache of the running prefill
        self._sites_run = 0
        self._keep_stats = False  # scored_prefill: leave the prefill uncompressed, statistics on its layers
        self._statistic_of: str | None = None  # scored_prefill: a policy whose own statistic to compute too
        # the running prefill compresses each layer as soon as it has run (budgets known before any statistic),
        # or trims it to a bound of its budget known by then (`trim_before_budgets`), keeping what it held before
        self._budgets_now: Callable[[int], list[int]] | None = None
        self._trim_now: Callable[[CompressedLayer], int] | None = None
        self._compressed_now: dict[int, tuple[LayerReport, list[LayerReport]]] = {}
        self._trimmed_now: dict[int, tuple[tuple[int, int], PrefillStats]] = {}

    # ------------------------------------------------------------------------------------------ set-up
    def install(self) -> None:
        AttentionInterface.register(ATTN_NAME, sdpa_attention_forward)
        self.model.set_attn_implementation(ATTN_NAME)
        self.decoder.forward = self.forward  # an instance attribute: `restore` deletes it
        self.model.entropykv = self
        self._lay_out_projections()
        windows = sorted(set(self.sliding_windows) - {0})
        logger.info("entropykv_fx: optimized %s: %d layers, %s; graphs compile on first use", type(self.model).__name__,
                    self.num_layers, f"sliding windows of {windows} tokens" if windows else "no sliding window")

    def restore(self) -> nn.Module:
        """Undo `optimize()`: the decoder's own forward and attention, compiled graphs dropped. Returns the model."""
        self._compiled.clear()
        self._step_graph = None
        self.fuse_projections = False
        self._lay_out_projections()
        self.decoder.__dict__.pop("forward", None)
        self.model.set_attn_implementation(self._attn_implementation)
        self.model.__dict__.pop("entropykv", None)
        logger.info("entropykv_fx: restored %s", type(self.model).__name__)
        return self.model

    def reconfigure(self, config: EntropyKVConfig, inductor: bool, mode: str | None, verify_ranks: bool,
                    cuda_graphs: bool, fuse_projections: bool) -> None:
        if (inductor, mode, fuse_projections) != (self.inductor, self.mode, self.fuse_projections):
            self._compiled.clear()  # other compilers or matmuls: the graphs are rebuilt on first use
        self._step_graph = None
        self.config, self.inductor, self.mode, self.verify_ranks = config, inductor, mode, verify_ranks
        self.cuda_graphs, self.fuse_projections = cuda_graphs, fuse_projections
        self._lay_out_projections()
        logger.debug("entropykv_fx: reconfigured: %s", config)

    def _lay_out_projections(self) -> None:
        """Fuse the projections (`entropykv_fx.projections`) when asked for and not fused, or fused no more because
        a parameter was replaced (graphs built over the old layout are dropped); unfuse when not asked for."""
        wanted = self.fuse_projections and self.tp_group is None  # tensor-parallel shards stay as transformers laid them
        if self.projections is not None and (not wanted or not self.projections.intact()):
            self.projections.unfuse()
            self.projections = None
            self._compiled.clear()
            self._step_graph = None
        if wanted and self.projections is None:
            self.projections = FusedProjections.fuse(self.model)

    @contextlib.contextmanager
    def eager(self) -> Iterator[nn.Module]:
        """The decoder's own forward (uncompiled, attention still unmasked SDPA) for the block: what export traces."""
        self.decoder.__dict__.pop("forward", None)
        try:
            yield self.model
        finally:
            self.decoder.forward = self.forward

    # ------------------------------------------------------------------------------------------ one call
    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                use_cache: bool | None = None, **kwargs: Any) -> Any:
        """The decoder's forward, rewritten (see the module docstring). Same arguments and outputs as transformers'."""
        cache_arg, cache = cache_in_call(kwargs)
        for name in ("cache", "past_key_values", *_IGNORED):
            kwargs.pop(name, None)
        ref = self._check_call(input_ids, inputs_embeds, attention_mask, position_ids, kwargs, cache)
        use_cache = self.decoder.config.use_cache if use_cache is None else use_cache
        if not use_cache and cache is None:  # nothing to keep, nothing to compress: the unmodified model
            return self._plain(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        cache = self._entropykv_cache(cache, cache_arg, ref.shape[0])
        prefill = cache.seen_tokens == 0
        if prefill:  # a parameter replaced since the last sequence: lay the projections out again
            self._lay_out_projections()
        model_pos, mask_pos = _step_positions(cache, ref.shape[1], ref.shape[0], attention_mask, position_ids,
                                              ref.device)
        embeds = inputs_embeds if inputs_embeds is not None else self.decoder.embed_tokens(input_ids)
        reconstruct = prefill and self._reconstructs()
        if reconstruct:  # one forward over the prompt and its repetition in chunks (entropykv_fx.reconstruct)
            valid = mask_pos >= 0
            if position_ids is not None and bool((mask_pos != valid.long().cumsum(-1) - 1)[valid].any()):
                raise UnsupportedCallError("entropykv: scorer='reconstruct' repeats the prompt at the following "
                                           "positions, so it needs the default position_ids (0, 1, ... after left "
                                           "padding); pass none, or use another scorer")
            prompt_pos, length = mask_pos, embeds.shape[1]
            repeat = torch.tensor(self.config.repeat_prompt, dtype=torch.long, device=embeds.device)
            self._check_reconstruction_range((mask_pos >= 0).sum(-1).tolist())
            embeds, mask_pos = repeat_context(embeds, mask_pos, self.decoder.embed_tokens(repeat),
                                              self.config.reconstruct_chunk)
            model_pos = mask_pos.clamp(min=0)
        if not prefill:
            self._decode_layout(cache, embeds.shape[1])
        forward = self._graph_for(prefill, embeds.shape[0], embeds.shape[1], cache, kwargs)
        inputs = (embeds, model_pos, mask_pos)
        replayable = self._replayable(prefill, cache, inputs, kwargs)
        if replayable and self._step_graph is not None and self._step_graph.fits(cache, inputs, kwargs):
            cache.begin_step(self._step_graph.load(inputs)[2])
            return self._step_graph.replay()
        if replayable:  # this step runs eagerly on tensors of its own, which the next steps' graph then reads
            embeds, model_pos, mask_pos = inputs = tuple(t.clone() for t in inputs)

        def step() -> Any:
            # No duck sizing: layers whose lengths happen to be equal would otherwise get equality guards, and the
            # next prompt, with other coincidences, a 10-30 s recompile.
            with torch.fx.experimental._config.patch(use_duck_shape=False):
                return forward(inputs_embeds=embeds, position_ids=model_pos, use_cache=True, **with_cache(cache),
                               **kwargs)

        cache.begin_step(mask_pos)
        self._stats_sink, self._sites_run = cache, 0
        if prefill:
            self._compressed_now, self._trimmed_now = {}, {}
            now = not self._keep_stats and self.tp_group is None
            self._budgets_now = budgets_before_scores(self.config, self.num_layers) if now else None
            self._trim_now = trim_before_budgets(self.config, self.num_layers) if now else None
        try:
            out = step()
        finally:
            self._stats_sink = None
        if self._sites_run != self.num_layers:
            raise RuntimeError(f"entropykv: only {self._sites_run} of {self.num_layers} attention layers ran through "
                               "the rewritten graph in this forward, so its results are not trustworthy")
        if replayable:
            self._step_graph = StepGraph.record(step, cache, inputs, kwargs)
        with torch.no_grad():
            if reconstruct:  # callers see a prefill of their prompt: the repetition leaves no trace
                cache.end_reconstruction(prompt_pos)
                out.last_hidden_state = out.last_hidden_state[:, :length]
                if out.hidden_states is not None:
                    out.hidden_states = tuple(h[:, :length] for h in out.hidden_states)
            headwise = POLICIES[self.config.policy].headwise
            if prefill and self.tp_group is not None:  # every rank decides from all heads' statistics
                combine_prefill_stats(cache, self.tp_group, SCORERS[self.config.scorer].combine, heads=headwise)
                if self.verify_ranks and headwise:  # ranks hold other heads: compare what their plans come from
                    check_same_stats(cache, self.tp_group)
            # Sliding-window layers first drop what no later query can attend, so no budget is spent on it.
            cache.drop_unreachable(self.sliding_windows)
            if prefill and not self._keep_stats:
                self.last_report = self._compress(cache)
                if self.verify_ranks and self.tp_group is not None and not headwise:
                    check_same_positions(cache, self.tp_group)
        return out

    def _check_call(self, input_ids: Tensor | None, inputs_embeds: Tensor | None, attention_mask: Tensor | None,
                    position_ids: Tensor | None, kwargs: dict, cache: Any) -> Tensor:
        """Refuse, before any work, what this runtime would get wrong; returns the ids or embeddings."""
        if (input_ids is None) == (inputs_embeds is None):
            raise UnsupportedCallError("entropykv: pass exactly one of input_ids [batch, length] or inputs_embeds "
                                       "[batch, length, hidden]")
        ref = input_ids if input_ids is not None else inputs_embeds
        if ref.dim() != (2 if input_ids is not None else 3) or ref.shape[0] == 0 or ref.shape[1] == 0:
            raise UnsupportedCallError(f"entropykv: input_ids must be [batch, length] and inputs_embeds [batch, "
                                       f"length, hidden], both non-empty; got {tuple(ref.shape)}")
        new_sequence = not isinstance(cache, EntropyKVCache) or cache.seen_tokens == 0
        if input_ids is not None:
            vocab = self.decoder.config.vocab_size
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise UnsupportedCallError(f"entropykv: input_ids must hold integer token ids, got dtype {input_ids.dtype}")
            # Checked on a new sequence only: later tokens come from the model's own logits (and a check syncs).
            if new_sequence and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab:
                raise UnsupportedCallError(f"entropykv: input_ids must be token ids in 0..{vocab - 1} (the model's "
                                           f"vocabulary), got values in {int(input_ids.min())}..{int(input_ids.max())}")
        elif inputs_embeds.shape[-1] != self.decoder.config.hidden_size:
            raise UnsupportedCallError(f"entropykv: inputs_embeds must be [batch, length, "
                                       f"{self.decoder.config.hidden_size}] (the model's hidden size); got "
                                       f"{tuple(inputs_embeds.shape)}")
        if attention_mask is not None and new_sequence and attention_mask.dim() == 2 \
                and attention_mask.shape[1] != ref.shape[1]:
            raise UnsupportedCallError(f"entropykv: attention_mask must be [batch, {ref.shape[1]}] on a new sequence "
                                       f"(one column per input token); got {tuple(attention_mask.shape)}")
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != ref.shape[0]
                                           or attention_mask.shape[1] < ref.shape[1]):
            raise UnsupportedCallError(f"entropykv: attention_mask must be 2-D [batch, past + new tokens] "
                                       f"({ref.shape[0]} rows, >= {ref.shape[1]} columns); got "
                                       f"{tuple(attention_mask.shape)}")
        if position_ids is not None and (position_ids.dim() != 2 or position_ids.shape[-1] != ref.shape[1]
                                         or position_ids.shape[0] not in (1, ref.shape[0])):
            raise UnsupportedCallError(f"entropykv: position_ids must be [batch or 1, {ref.shape[1]}]; got "
                                       f"{tuple(position_ids.shape)}")
        if position_ids is not None and position_ids.dtype.is_floating_point:
            raise UnsupportedCallError(f"entropykv: position_ids must be integers, got dtype {position_ids.dtype}")
        if kwargs.get("output_attentions"):
            raise UnsupportedCallError("entropykv: output_attentions=True is not supported: the rewritten attention "
                                       "never forms the attention matrix; restore(model) to inspect attention")
        dropout = float(getattr(self.decoder.config, "attention_dropout", 0.0) or 0.0)
        if self.model.training and dropout > 0 and torch.is_grad_enabled():
            raise UnsupportedCallError(f"entropykv: attention dropout ({dropout}) is not supported (the compressed "
                                       "attention has none); call model.eval() or run under torch.no_grad()")
        return ref

    def _check_reconstruction_range(self, lengths: list[int]) -> None:
        """Warn when the reconstruction prefill of prompts of `lengths` tokens (one per row) reaches past the model's
        trained positions: a row's last chunk's repetition runs to its length + repeat prompt + that chunk.
        Unchunked (one repetition of the whole prompt, to 16000 positions) the default policy found 19% of the
        needles at 25% kept in 8000-token prompts on SmolLM2-135M (trained to 8192 positions), against 95% in 2k
        and 4k ones (H100, benchmarks/results/sweep_h100_s33*.json)."""
        trained = getattr(self.decoder.config, "max_position_embeddings", None)
        chunk, repeat = self.config.reconstruct_chunk, len(self.config.repeat_prompt)
        reach, length = max((n + repeat + n - (n - 1) // chunk * chunk, n) for n in lengths)
        if trained and reach > trained:
            fits = trained - max(lengths) - repeat
            remedy = (f"reconstruct_chunk={fits} or less keeps it in range" if fits >= 1 else
                      "choose a scorer without repetition (e.g. policy='uniform', scorer 'window')")
            warnings.warn(f"entropykv: scorer='reconstruct' repeats a {length}-token prompt in chunks of {chunk} "
                          f"tokens (repeat prompt: {repeat}), reaching position {reach - 1}, past the model's "
                          f"max_position_embeddings={trained}: the repetition attends at distances the model was not "
                          f"trained on and the scores degrade; {remedy}", PositionRangeWarning, stacklevel=2)

    def _entropykv_cache(self, cache: Any, cache_arg: str, batch: int) -> EntropyKVCache:
        if isinstance(cache, EntropyKVCache):
            if len(cache.layers) != self.num_layers:
                raise UnsupportedCallError(f"entropykv: the cache has {len(cache.layers)} layers, the model "
                                           f"{self.num_layers}")
            if cache.next_positions is not None and cache.next_positions.shape[0] != batch:
                raise UnsupportedCallError(f"entropykv: batch size changed from {cache.next_positions.shape[0]} to "
                                           f"{batch} on a cache that already holds tokens; start a new cache")
            return cache
        if cache is not None and not isinstance(cache, Cache):
            raise UnsupportedCallError(f"entropykv: {cache_arg} must be a transformers Cache, got "
                                       f"{type(cache).__name__}")
        if cache is not None and cache.get_seq_length() > 0:
            raise UnsupportedCallError(f"entropykv: the optimized model needs an EntropyKVCache, got a "
                                       f"{type(cache).__name__} that already holds tokens; pass {cache_arg}=None "
                                       "to start a new sequence")
        return EntropyKVCache(self.num_layers)

    def _decode_layout(self, cache: EntropyKVCache, length: int) -> None:
        """One-token steps write into room reserved after each layer's slots (`EntropyKVCache.make_room`), so a step
        never copies the cache and its graph can be replayed; longer continuations append to the plain layout."""
        if length == 1 and cache.can_reserve():
            if cache.room < 1:
                cache.make_room(DECODE_ROOM, self.sliding_windows)
        else:
            cache.compact()

    def _replayable(self, prefill: bool, cache: EntropyKVCache, inputs: tuple[Tensor, ...], kwargs: dict) -> bool:
        """Whether this step runs from a CUDA graph (`entropykv_fx.step_graph`): a one-token step on a GPU into
        room, with no output options, unless `cuda_graphs=False` or Inductor's own CUDA graphs are on."""
        return (self.cuda_graphs and not prefill and inputs[0].is_cuda and inputs[0].shape[1] == 1 and cache.room >= 1
                and self.mode not in _CUDA_GRAPH_MODES and not torch.is_grad_enabled()
                and not any(isinstance(v, Tensor) or v for v in kwargs.values()))

    def _plain(self, **kwargs: Any) -> Any:
        """The decoder's own forward with the model's own attention implementation (masks included)."""
        self.model.set_attn_implementation(self._attn_implementation)
        try:
            return self._eager_forward(**kwargs)
        finally:
            self.model.set_attn_implementation(ATTN_NAME)

    def _reconstructs(self) -> bool:
        """Whether a prefill is a reconstruction prefill: the `reconstruct` scorer, when its scores are used (a
        policy that evicts by score) or kept (`scored_prefill`)."""
        policy = POLICIES[self.config.policy]
        return SCORERS[self.config.scorer].reconstruct and (
            self._keep_stats or (policy.evicts and policy.token_scores is None))

    def _compress(self, cache: EntropyKVCache) -> CompressionReport:
        policy = POLICIES[self.config.policy]
        if policy.evicts:
            shard = policy.headwise and self.tp_group is not None  # a plan over all heads, this rank's share kept
            report = compress_cache(cache, self.config, local_heads(cache, self.tp_group) if shard else None,
                                    self._compressed_now, {i: held for i, (held, _) in self._trimmed_now.items()})
        else:
            report = uncompressed_report(cache, self.config)
            for layer in cache.layers:
                layer.stats = None
        logger.debug("entropykv_fx: prefill of %d tokens: budgets %s", report.prompt_tokens,
                     [r.budget for r in report.layers])
        return report

    # ------------------------------------------------------------------------------------------ graphs
    def _settings(self, prefill: bool) -> tuple[RewriteSettings, tuple]:
        """Rewrite settings of a graph and the part of the config they depend on (the key of its graphs).

        Prefill graphs always score (a policy change then needs no new graph); only a policy with a statistic
        of its own (matrix entropy) adds it, or the statistic `scored_prefill` asks for."""
        if not prefill:
            return RewriteSettings(None, self.sliding_windows), ()
        policy = POLICIES[self._statistic_of or self.config.policy]
        cfg = self.config
        rank_queries = SCORERS[cfg.scorer].rank_queries
        repeat = len(cfg.repeat_prompt) if self._reconstructs() else None
        chunk = cfg.reconstruct_chunk if repeat is not None else 1
        # Inductor would trace into the Python of `_compress_layer_now`: its prefills compress after the forward
        now = None if self.inductor else self._compress_layer_now
        shared = dict(rank_queries=rank_queries, repeat_tokens=repeat, reconstruct_chunk=chunk, compress_layer=now)
        if policy.prefill_statistic is None:
            return (RewriteSettings(cfg.window, self.sliding_windows, None, **shared),
                    (cfg.window, rank_queries, repeat, chunk))
        statistic = _statistic(policy.prefill_statistic, cfg)
        return (RewriteSettings(cfg.window, self.sliding_windows, statistic, **shared),
                (cfg.window, rank_queries, repeat, chunk, policy.name, cfg.matrix_states, cfg.matrix_rank))

    def _graph_for(self, prefill: bool, batch: int, length: int, cache: EntropyKVCache, kwargs: dict) -> Any:
        settings, depends_on = self._settings(prefill)
        layout = tuple(layer.layout_key() for layer in cache.layers) if not prefill else ()
        flags = tuple(bool(kwargs.get(name)) for name in _GRAPH_FLAGS)
        key = (prefill, batch == 1, length == 1, layout, flags, depends_on)
        compiled = self._compiled.get(key)
        if compiled is None:
            backend = EntropyKVBackend(settings, self.inductor, self.mode, results=self.graphs,
                                       on_stats=self._receive_stats if prefill else None, on_run=self._count_sites,
                                       projections=self.projections,
                                       token_chunk=PREFILL_CHUNK_TOKENS if self.tp_group is None else None)
            compiled = torch.compile(own_code(self._eager_forward), backend=backend, dynamic=True)
            self._compiled[key] = compiled
            logger.info("entropykv_fx: new graph kind #%d: %s, %s, batch %s%s", len(self._compiled),
                        "prefill" if prefill else "continuation", "one token" if length == 1 else "several tokens",
                        "1" if batch == 1 else "> 1", f", flags {flags}" if any(flags) else "")
        return compiled

    def _receive_stats(self, layers: list[int], tensors: list[Tensor]) -> None:
        for layer, stats in PrefillStats.unflatten(layers, tensors).items():
            if layer in self._trimmed_now:  # the statistics of the slots it kept, with the ranking over all of them
                stats = self._trimmed_now[layer][1]
            if layer not in self._compressed_now:
                self._stats_sink.layers[layer].stats = stats

    def _compress_layer_now(self, layer: int, keys: Tensor, values: Tensor, positions: Tensor,
                            *stats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """A prefill graph calls this right after layer `layer`'s attention and scoring
        (`RewriteSettings.compress_layer`): when the policy's budgets need no other layer's statistics, the layer
        is compressed there and then (`compress.compress_layer_now`), and the graph releases its full keys and
        values before the next layer runs; when they need every layer's statistics but the layer's share is bounded
        as soon as it has run (`compress.trim_before_budgets`: the ceiling of `entropy` and `entropy_focus`, the
        running bar of the default's cache-wide top-k), a prompt of one row is trimmed to that bound
        (`compress.trim_layer_now`) and compressed to its budget after the forward. Otherwise (and for
        sliding-window layers, which first drop what no later query can attend) the layer is compressed after the
        forward only."""
        if self.sliding_windows[layer] or (self._budgets_now is None and self._trim_now is None):
            return keys, values, positions
        held = CompressedLayer.holding(keys, values, positions, PrefillStats(*stats))
        with torch.no_grad():  # a selection, not part of any gradient: the cache holds no autograd graph
            if self._budgets_now is not None:
                self._compressed_now[layer] = compress_layer_now(held, layer, lambda n: self._budgets_now(n)[layer],
                                                                 self.config)
            else:  # a batch of one row (a batch is compressed after the forward)
                before = trim_layer_now(held, self._trim_now(held), self.config) if held.keys.shape[0] == 1 else None
                if before is not None:
                    self._trimmed_now[layer] = before, held.stats
        return held.keys, held.values, held.positions

    def _count_sites(self, n: int) -> None:
        self._sites_run += n

    # ------------------------------------------------------------------------------------------ tools
    def graphs_of(self, run: Any) -> list[RewriteResult]:
        """What the pass does to each graph that `run()` compiles, starting from no compiled graphs (explain)."""
        self._compiled.clear()
        start = len(self.graphs)
        run()
        return self.graphs[start:]

    @torch.no_grad()
    def scored_prefill(self, input_ids: Tensor, statistic_of: str | None = None) -> tuple[EntropyKVCache, Tensor]:
        """(the uncompressed cache of a prefill of `input_ids` [B, L] with every layer's `PrefillStats`, logits of
        the last position [B, V]); `statistic_of` names a policy whose own statistic to compute as well. For
        compressing one prefill several ways (`compress.compress_cache` on copies)."""
        cache = EntropyKVCache(self.num_layers)
        self._keep_stats, self._statistic_of = True, statistic_of
        try:
            out = self.model(input_ids=input_ids, **with_cache(cache), use_cache=True, logits_to_keep=1)
        finally:
            self._keep_stats, self._statistic_of = False, None
        return cache, out.logits[:, -1]


def _statistic(fn: Any, config: EntropyKVConfig) -> Any:
    """The policy's prefill statistic with this config bound, as the graph pass calls it."""
    def prefill_statistic(query: Tensor, keys: Tensor, q_pos: Tensor) -> Tensor:
        with torch.no_grad():  # like the scores: a decision, not part of any gradient
            return fn(query, keys, q_pos, config)
    return prefill_statistic


def _step_positions(cache: EntropyKVCache, length: int, batch: int, attention_mask: Tensor | None,
                    position_ids: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(positions for the model with pads clamped to 0, positions for masking with pads = -1)."""
    if attention_mask is not None:
        valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if length > 1 and bool((valid[:, :-1] & ~valid[:, 1:]).any()):  # a one-token step need not wait for the GPU
            raise UnsupportedCallError("entropykv: right padding (or a hole in attention_mask) is not supported; "
                                       "pad on the left (tokenizer.padding_side = 'left')")
    else:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    if position_ids is None:
        start = cache.next_positions if cache.next_positions is not None else torch.zeros(batch, dtype=torch.long,
                                                                                           device=device)
        position_ids = start[:, None] + valid.long().cumsum(-1) - 1
        position_ids = position_ids.clamp(min=0)
    position_ids = position_ids.to(device).expand(batch, length)
    return position_ids, position_ids.masked_fill(~valid, -1)


def _sliding_windows(model: nn.Module, layers: nn.ModuleList) -> tuple[int, ...]:
    """Each layer's sliding window (0 = full attention), as transformers applies it."""
    cfg = model.config
    types = getattr(cfg, "layer_types", None)
    windows = []
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
        if types is not None and types[i] != "sliding_attention":
            window = None
        windows.append(int(window or 0))
    return tuple(windows)


def optimize(model: nn.Module, config: EntropyKVConfig | Composition | None = None, *, inductor: bool | None = None,
             mode: str | None = None, verify_ranks: bool | None = None, cuda_graphs: bool | None = None,
             fuse_projections: bool | None = None, **overrides: Any) -> nn.Module:
    """Make `model.generate()` (and plain forwards) compress the KV cache after prefill. Returns `model`.

    The decoder is compiled with the entropykv Dynamo backend (see the module docstring); the rewritten graphs
    run eagerly, or through Inductor with `inductor=True` (`mode` as in torch.compile, e.g. "reduce-overhead").
    `config` defaults to `EntropyKVConfig()`; keyword overrides replace single fields, e.g.
    `optimize(model, policy="entropy", budget=0.25)`; a `Composition` (`entropykv_fx.composition`) passed as
    `config` or `policy` sets the policy with its parameters. Calling it again on an optimized model changes its
    configuration: overrides apply to its current config unless `config` is given, and the options `inductor`,
    `mode`, `verify_ranks`, `cuda_graphs` and `fuse_projections` keep their current values unless given (`mode`
    follows `inductor` when that is given). A new budget or policy does not recompile; a change of `inductor`, `mode`
    or `fuse_projections` drops the compiled graphs, which compile again on first use.
    `model.entropykv` is the handle (`Optimized`); `restore(model)` undoes it. Defaults of a first call:
    inductor=False, mode=None, verify_ranks=False, cuda_graphs=True, fuse_projections=True.

    Decoding (one token per row, e.g. `generate()`) writes into room reserved after each layer's kept slots
    (`DECODE_ROOM` at a time). On a GPU, `cuda_graphs=True` replays each step from a CUDA graph recorded at the
    first step (`entropykv_fx.step_graph`); steps run eagerly instead (same tokens, slower) with
    `cuda_graphs=False`, on a CPU, under Inductor's own CUDA-graph modes (`mode="reduce-overhead"`), with
    gradients enabled, with output options such as `output_hidden_states`, and for head-wise policies (whose
    layers keep per-head lengths, so no room).
    `fuse_projections=True` moves, at this call, each layer's q/k/v weights (and biases) into one tensor and its
    gate/up weights into another, each `nn.Linear` keeping a view of its rows (`entropykv_fx.projections`: same
    memory, same `state_dict`, `save_pretrained` works); decode graphs then compute each group with one matmul.
    `restore` or `fuse_projections=False` give every Linear its own tensor again. It is not applied to
    tensor-parallel models, offloaded (meta) weights, or graphs compiled with gradients enabled.

    A model sharded by transformers' tensor parallelism (`from_pretrained(..., tp_plan="auto")` under torchrun)
    works with every policy and the attention scorers: every rank combines all heads' prefill statistics before
    deciding, so all keep the same positions (head-wise policies: each rank keeps its heads' share of one plan over
    all heads; `entropykv_fx.parallel`); `verify_ranks=True` checks that after every prefill (two more
    collectives per layer; head-wise: that the ranks' statistics are equal) and raises RankDivergenceError if not.

    Raises, before any work: UnsupportedModelError (not a model of a supported architecture, or sharded by tensor
    parallelism with what that does not support), ArgumentTypeError (`config` not an EntropyKVConfig, `inductor`,
    `verify_ranks`, `cuda_graphs` or `fuse_projections` not a bool or None),
    InputError (a bad `mode`), ConfigError (a bad field, or a calibration file made for another architecture
    or layer/head count), TransformersVersionError (a known-broken transformers release). A calibration file is
    read once, here (when the config is built): editing or deleting it afterwards changes nothing.
    """
    check_transformers_version()
    if isinstance(config, Composition):  # optimize(model, Composition(...)): the policy, other fields as they are
        config, overrides = None, {**overrides, "policy": config}
    if config is not None and not isinstance(config, EntropyKVConfig):
        raise ArgumentTypeError(f"entropykv_fx.optimize: config must be an EntropyKVConfig or None, got "
                                f"{short_repr(config)}; pass fields as keywords instead, e.g. "
                                "optimize(model, policy='entropy', budget=0.25)")
    given = {"inductor": inductor, "verify_ranks": verify_ranks, "cuda_graphs": cuda_graphs,
             "fuse_projections": fuse_projections}
    for flag, value in given.items():
        if value is not None and not isinstance(value, bool):
            raise ArgumentTypeError(f"entropykv_fx.optimize: {flag}={short_repr(value)} is invalid: expected True, "
                                    "False, or None (keep the current value)")
    if mode is not None and mode not in _INDUCTOR_MODES:
        raise InputError(f"entropykv_fx.optimize: mode={short_repr(mode)} is invalid: expected None or one of "
                         f"{_INDUCTOR_MODES}")
    name = type(model).__name__
    if not isinstance(model, nn.Module) or name not in SUPPORTED_MODELS:
        shown = name if isinstance(model, nn.Module) else short_repr(model)
        raise UnsupportedModelError(f"entropykv_fx.optimize: {shown} is not supported: model must be a transformers "
                                    f"model of one of {', '.join(SUPPORTED_MODELS)}")
    existing: Optimized | None = model.__dict__.get("entropykv")
    flags = {flag: (getattr(existing, flag) if existing is not None else default) if given[flag] is None
             else given[flag] for flag, default in _OPTION_DEFAULTS.items()}
    if mode is None and inductor is None and existing is not None:  # mode follows inductor when that is given
        mode = existing.mode
    if mode is not None and not flags["inductor"]:
        raise InputError(f"entropykv_fx.optimize: mode={mode!r} is an Inductor mode; pass inductor=True with it")
    base = config or (existing.config if existing is not None else EntropyKVConfig())
    cfg = base.replace(**overrides) if overrides else base
    group = _check_tensor_parallel(model, cfg)
    if cfg.calibration is not None:  # parsed once when cfg was built; a file for another model fails here
        cfg.calibration.check_model(model)
    if any(t >= model.config.vocab_size for t in cfg.repeat_prompt):
        raise ConfigError(f"entropykv_fx.optimize: repeat_prompt holds token ids {sorted(set(cfg.repeat_prompt))} but "
                          f"the model's vocabulary is 0..{model.config.vocab_size - 1}")
    if existing is not None:
        existing.reconfigure(cfg, flags["inductor"], mode, flags["verify_ranks"], flags["cuda_graphs"],
                             flags["fuse_projections"])
    else:
        Optimized(model, cfg, flags["inductor"], mode, group, flags["verify_ranks"], flags["cuda_graphs"],
                  flags["fuse_projections"]).install()
    return model


def _check_tensor_parallel(model: nn.Module, cfg: EntropyKVConfig) -> Any:
    """The tensor-parallel process group of a sharded model (None if not sharded); UnsupportedModelError for what
    `entropykv_fx.parallel` does not support."""
    group = tensor_parallel_group(model)
    ranks = torch.distributed.get_world_size(group) if group is not None else int(getattr(model, "tp_size", None) or 1)
    if ranks == 1:
        return None
    kv_heads = getattr(model.config, "num_key_value_heads", None) or model.config.num_attention_heads
    problem = None
    if group is None:
        problem = "its process group was not found (no DTensor weights)"
    elif SCORERS[cfg.scorer].from_keys:
        problem = f"scorer {cfg.scorer!r} scores from each rank's keys"
    elif kv_heads % ranks:
        problem = f"its {kv_heads} KV heads do not divide by the ranks"
    if problem:
        raise UnsupportedModelError(
            f"entropykv_fx.optimize: {type(model).__name__} is sharded by tensor parallelism ({ranks} ranks) and "
            f"{problem}; supported: every policy with the scorers window, last_query or reconstruct, and KV heads "
            "that divide by the ranks")
    return group


def optimized(model: nn.Module) -> Optimized:
    """The handle `optimize()` left on `model`; ValueError if there is none."""
    handle = model.__dict__.get("entropykv") if isinstance(model, nn.Module) else None
    if handle is None:
        raise NotOptimizedError("entropykv_fx: this model was not prepared by entropykv_fx.optimize() (or it was "
                                "restored); call entropykv_fx.optimize(model) first")
    return handle


def restore(model: nn.Module) -> nn.Module:
    """Undo `optimize(model)`: the model's own forward and attention again, compiled graphs released."""
    return optimized(model).restore()


@contextlib.contextmanager
def compressing(model: nn.Module, config: EntropyKVConfig | None = None, **overrides: Any) -> Iterator[nn.Module]:
    """`with compressing(model, policy="uniform", budget=0.25): model.generate(...)`: optimized inside the block
    only; afterwards the model is as before (restored, or back to its previous configuration)."""
    previous = model.__dict__.get("entropykv")
    state = (previous.config, previous.inductor, previous.mode, previous.verify_ranks,
             previous.cuda_graphs, previous.fuse_projections) if previous is not None else None
    optimize(model, config, **overrides)
    try:
        yield model
    finally:
        if state is None:
            restore(model)
        else:
            previous.reconfigure(*state)


def report(model: nn.Module) -> CompressionReport:
    """The per-layer report (entropy, budget, slots, bytes) of the optimized model's last prefill (with the config
    it ran under: `report.policy`; a later optimize() shows in the next prefill's report). NotOptimizedError
    without a prefill."""
    handle = optimized(model)
    if handle.last_report is None:
        raise NotOptimizedError("entropykv_fx.report: no prefill has run on this model since optimize()")
    return handle.last_report
