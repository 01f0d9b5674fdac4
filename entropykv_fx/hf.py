"""Hugging Face integration: `optimize(model)` for Llama, Qwen2, Qwen3 and Mistral causal LMs.

The model's attention calls go to `entropykv_attention` (registered with transformers' AttentionInterface),
which runs the entropykv ops over an `EntropyKVCache`. Two hooks on the top-level model frame each forward:
before it, the cache is installed and the positions of the new tokens are recorded; after a prefill, every
layer has been scored and `compress_cache` shrinks the cache to the policy's budgets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.cache_utils import Cache

from . import ops
from .cache import EntropyKVCache, PrefillStats
from .compress import CompressionReport, compress_cache, uncompressed_report
from .config import EntropyKVConfig
from .headwise import HeadwiseLayer
from .policies import POLICIES

ATTN_NAME = "entropykv"
SUPPORTED_MODELS = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "MistralForCausalLM")


class UnsupportedModelError(TypeError):
    pass


@dataclass
class Runtime:
    """Per-model state shared by the hooks and the attention function."""

    config: EntropyKVConfig
    num_layers: int
    cache: EntropyKVCache | None = None
    step_positions: Tensor | None = None  # positions of the tokens of the running forward, -1 for pads
    last_report: CompressionReport | None = None
    hooks: list[Any] = field(default_factory=list)


def entropykv_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any,
                        scaling: float | None = None, dropout: float = 0.0, sliding_window: int | None = None,
                        **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function: q [B,Hq,L,D], k/v [B,Hkv,S,D] -> ([B,L,Hq,D], None).

    Masking comes from positions (the cache's and this step's), never from `attention_mask`, so layers
    may hold different numbers of slots.
    """
    runtime: Runtime | None = getattr(module, "_entropykv", None)
    if runtime is None or runtime.step_positions is None:
        raise RuntimeError("entropykv attention was called outside a model prepared by entropykv_fx.optimize()")
    if dropout:
        raise ValueError("entropykv attention does not implement dropout; call model.eval() before inference")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    window = sliding_window or 0
    q_pos = runtime.step_positions
    cache = runtime.cache
    layer = cache.layers[module.layer_idx] if cache is not None else None
    if isinstance(layer, HeadwiseLayer):  # each head holds its own slots: the layer attends over them itself
        return layer.attention(query, q_pos, scale, window).transpose(1, 2).contiguous(), None
    k_pos = layer.positions if layer is not None else q_pos
    out = ops.attention(query, key, value, q_pos, k_pos, scale, window)
    prefill = layer is not None and k_pos.shape[1] == query.shape[2]  # the layer was empty before this forward
    policy = POLICIES[runtime.config.policy]
    if prefill and policy.needs_scores:
        w = min(runtime.config.window, query.shape[2])
        with torch.no_grad():  # eviction is a decision, not part of any gradient
            layer.stats = PrefillStats(*ops.score(query[:, :, -w:], key, q_pos[:, -w:], k_pos, scale, window))
            if policy.prefill_statistic is not None:
                layer.stats.head_statistic = policy.prefill_statistic(query, key, q_pos, runtime.config)
    return out.transpose(1, 2).contiguous(), None


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
    cache = kwargs.get("past_key_values")
    use_cache = kwargs.get("use_cache")
    if use_cache is None:
        use_cache = model.config.use_cache
    if cache is None and use_cache or isinstance(cache, Cache) and not isinstance(cache, EntropyKVCache):
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"entropykv: the optimized model needs an EntropyKVCache, got a {type(cache).__name__} "
                             "that already holds tokens; pass past_key_values=None to start a new sequence")
        cache = EntropyKVCache(runtime.num_layers)
        kwargs["past_key_values"] = cache
    model_pos, mask_pos = _step_positions(cache, length, batch, kwargs.get("attention_mask"),
                                          kwargs.get("position_ids"), ref.device)
    kwargs["position_ids"] = model_pos
    if cache is not None:
        cache.begin_step(mask_pos)
    runtime.cache, runtime.step_positions = cache, mask_pos
    return args, kwargs


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
    runtime: Runtime = model._entropykv
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


def optimize(model: nn.Module, config: EntropyKVConfig | None = None, **overrides: Any) -> nn.Module:
    """Make `model.generate()` (and plain forwards) compress the KV cache after prefill. Returns `model`.

    `config` defaults to `EntropyKVConfig()`; keyword overrides replace single fields, e.g.
    `optimize(model, policy="entropy", budget=0.25)`. Calling it again on an optimized model only
    changes its configuration: overrides then apply to the model's current config unless `config` is given.
    """
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
        existing.config = cfg
        return model
    AttentionInterface.register(ATTN_NAME, entropykv_attention)
    layers = _decoder_layers(model)
    runtime = Runtime(cfg, num_layers=len(layers))
    model.set_attn_implementation(ATTN_NAME)
    for layer in layers:
        layer.self_attn._entropykv = runtime
    model._entropykv = runtime
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
