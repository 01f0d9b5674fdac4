"""Hugging Face integration: `optimize(model)` for Llama, Qwen2, Qwen3 and Mistral causal LMs.

The model keeps transformers' own SDPA attention, and its cache becomes an `EntropyKVCache`, whose updates are
`entropykv::append` ops. The forward is compiled through the entropykv Dynamo backend, whose graph pass
(`passes.rewrite_attention`) turns each attention call into `entropykv::attention` over its layer's cache and,
on prefill graphs, adds `entropykv::score`. Two hooks frame each forward: before it, the cache is installed and
the positions of the new tokens are recorded; after a prefill, `compress_cache` shrinks the cache to the
policy's budgets from the scores the graph returned.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .cache import EntropyKVCache, PrefillStats
from .compat import cache_in_call, check_transformers_version
from .compress import CompressionReport, compress_cache, uncompressed_report
from .config import EntropyKVConfig
from .errors import EntropyKVError
from .passes.backend import EntropyKVBackend, own_code
from .passes.rewrite_attention import RewriteSettings
from .policies import POLICIES

# transformers' SDPA attention under our name: registering no mask function for it makes transformers pass
# attention_mask=None, since masks come from positions after the rewrite (layers hold different lengths).
ATTN_NAME = "entropykv"
SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(EntropyKVError, TypeError):
    pass


@dataclass
class Runtime:
    """Per-model state shared by the hooks and the compiled forward."""

    config: EntropyKVConfig
    num_layers: int
    eager_forward: Any  # the model's own forward, which the compiled one wraps
    sliding_windows: tuple[int, ...]
    cache: EntropyKVCache | None = None
    step_positions: Tensor | None = None  # positions of the tokens of the running forward, -1 for pads
    last_report: CompressionReport | None = None
    inductor: bool = False  # compile the rewritten graphs with Inductor (else run them eagerly)
    mode: str | None = None  # Inductor mode, e.g. "reduce-overhead" (CUDA graphs)
    sites_run: int = 0  # attention sites the rewritten graphs ran in the current forward
    backend: EntropyKVBackend | None = None
    hooks: list[Any] = field(default_factory=list)

    def receive_stats(self, layers: list[int], tensors: list[Tensor]) -> None:
        k = len(tensors) // max(len(layers), 1)
        for i, layer in enumerate(layers):
            self.cache.layers[layer].stats = PrefillStats(*tensors[k * i:k * i + k])

    def count_sites(self, n: int) -> None:
        self.sites_run += n

    def compile(self, model: nn.Module, statistic_of: str | None = None) -> None:
        """(Re)build the compiled forward for the current config; `statistic_of` names a policy whose prefill
        statistic to compute instead of this policy's own (a shared prefill serving several policies)."""
        policy = POLICIES[self.config.policy]
        measure = POLICIES[statistic_of or policy.name].prefill_statistic
        statistic = _statistic(measure, self.config) if measure is not None else None
        settings = RewriteSettings(self.config.window if policy.needs_scores else None, self.sliding_windows, statistic)
        self.backend = EntropyKVBackend(settings, self.inductor, self.mode, on_stats=self.receive_stats,
                                        on_run=self.count_sites)
        model.forward = torch.compile(own_code(self.eager_forward), backend=self.backend, dynamic=True)


def _statistic(fn: Any, config: EntropyKVConfig) -> Any:
    """The policy's prefill statistic with this config bound, as the graph pass calls it."""
    def prefill_statistic(query: Tensor, keys: Tensor, q_pos: Tensor) -> Tensor:
        with torch.no_grad():  # like the scores: a decision, not part of any gradient
            return fn(query, keys, q_pos, config)
    return prefill_statistic


def _step_positions(cache: EntropyKVCache | None, length: int, batch: int,
                    attention_mask: Tensor | None, position_ids: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """(positions for the model with pads clamped to 0, positions for masking with pads = -1)."""
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"entropykv: attention_mask must be 2-D [batch, length] (got {attention_mask.dim()}-D); "
                             "masks are built per layer from positions")
        valid = attention_mask[:, -length:].to(device=device, dtype=torch.bool)
        if bool((valid[:, :-1] & ~valid[:, 1:]).any()):
            raise ValueError("entropykv: right padding (or a hole in attention_mask) is not supported; "
                             "pad on the left (tokenizer.padding_side = 'left')")
    else:
        valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    if position_ids is None:
        start = cache.next_positions if cache is not None and cache.next_positions is not None else torch.zeros(batch, dtype=torch.long, device=device)
        position_ids = start[:, None] + valid.long().cumsum(-1) - 1
        position_ids = position_ids.clamp(min=0)
    position_ids = position_ids.to(device).expand(batch, length)
    return position_ids, position_ids.masked_fill(~valid, -1)


def _before_forward(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    runtime: Runtime = model._entropykv
    input_ids = args[0] if args else kwargs.get("input_ids")
    embeds = kwargs.get("inputs_embeds")
    ref = input_ids if input_ids is not None else embeds
    batch, length = ref.shape[0], ref.shape[1]
    cache_arg, cache = cache_in_call(kwargs)
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = model.config.use_cache
    if cache is None and use_cache or isinstance(cache, Cache) and not isinstance(cache, EntropyKVCache):
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"entropykv: the optimized model needs an EntropyKVCache, got a {type(cache).__name__} "
                             f"that already holds tokens; pass {cache_arg}=None to start a new sequence")
        cache = EntropyKVCache(runtime.num_layers)
        kwargs[cache_arg] = cache
    model_pos, mask_pos = _step_positions(cache, length, batch, kwargs.get("attention_mask"),
                                          kwargs.get("position_ids"), ref.device)
    kwargs["position_ids"] = model_pos
    if cache is not None:
        cache.begin_step(mask_pos)
    runtime.cache, runtime.step_positions, runtime.sites_run = cache, mask_pos, 0
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    runtime: Runtime = model._entropykv
    if runtime.sites_run != runtime.num_layers:
        raise RuntimeError(f"entropykv: only {runtime.sites_run} of {runtime.num_layers} attention layers ran through "
                           "the rewritten graph in this forward, so its results are not trustworthy; usually "
                           "torch.compile fell back to eager (see its recompile warnings; torch._dynamo.reset() "
                           "clears old graphs)")
    cache = runtime.cache
    prefill = cache is not None and cache.seen_tokens == cache.step_positions.shape[1] > 0  # first forward
    if prefill and POLICIES[runtime.config.policy].evicts:
        with torch.no_grad():
            runtime.last_report = compress_cache(cache, runtime.config)
    elif prefill:
        runtime.last_report = uncompressed_report(cache, runtime.config)
    runtime.cache = runtime.step_positions = None
    return output


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


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


def optimize(model: nn.Module, config: EntropyKVConfig | None = None, *, inductor: bool = False,
             mode: str | None = None, **overrides: Any) -> nn.Module:
    """Make `model.generate()` (and plain forwards) compress the KV cache after prefill. Returns `model`.

    The forward is compiled with the entropykv Dynamo backend (see the module docstring); the rewritten
    graphs run eagerly, or through Inductor with `inductor=True` (`mode` as in torch.compile, e.g.
    "reduce-overhead"). `config` defaults to `EntropyKVConfig()`; keyword overrides replace single fields,
    e.g. `optimize(model, policy="entropy", budget=0.25)`. Calling it again on an optimized model changes its
    configuration (overrides apply to its current config unless `config` is given) and recompiles.
    """
    check_transformers_version()
    if mode is not None and not inductor:
        raise ValueError(f"entropykv_fx.optimize: mode={mode!r} is an Inductor mode; pass inductor=True with it")
    name = type(model).__name__
    if name not in SUPPORTED_MODELS:
        raise UnsupportedModelError(f"entropykv_fx.optimize: {name} is not supported; supported models: "
                                    f"{', '.join(SUPPORTED_MODELS)}")
    existing: Runtime | None = getattr(model, "_entropykv", None)
    base = config or (existing.config if existing is not None else EntropyKVConfig())
    cfg = base.replace(**overrides) if overrides else base
    if cfg.budget_source == "calibrated":
        cfg.layer_fractions(len(_decoder_layers(model)))  # a file made for another model fails here, not mid-generate
    if existing is not None:
        existing.config, existing.inductor, existing.mode = cfg, inductor, mode
        existing.compile(model)
        return model
    AttentionInterface.register(ATTN_NAME, sdpa_attention_forward)
    layers = _decoder_layers(model)
    runtime = Runtime(cfg, len(layers), model.forward, _sliding_windows(model, layers), inductor=inductor, mode=mode)
    model.set_attn_implementation(ATTN_NAME)
    model._entropykv = runtime
    runtime.compile(model)
    runtime.hooks = [model.register_forward_pre_hook(_before_forward, with_kwargs=True),
                     model.register_forward_hook(_after_forward, with_kwargs=True)]
    return model


def report(model: nn.Module) -> CompressionReport:
    """The per-layer report (entropy, budget, slots, bytes) of the optimized model's last prefill."""
    runtime: Runtime | None = getattr(model, "_entropykv", None)
    if runtime is None:
        raise ValueError("entropykv_fx.report: this model was not prepared by entropykv_fx.optimize()")
    if runtime.last_report is None:
        raise ValueError("entropykv_fx.report: no prefill has run on this model yet")
    return runtime.last_report
