"""Ahead-of-time export: rewritten prefill and decode programs with flat tensor inputs and outputs.

    entropykv_fx.export(model, "out/", prompt_length=512, max_new_tokens=64)   # model optimized with calibrated budgets

writes `prefill.pt2` and `decode.pt2` (torch.export programs holding entropykv ops), `prefill.aoti.pt2` and
`decode.aoti.pt2` (AOTInductor packages of the same programs lowered to plain torch: they run without this
package or transformers) and `layout.json` (the cache layout: per-layer capacities, heads, dtype).
`entropykv_fx.exported.ExportedGenerator` runs either pair.

Programs (L = prompt_length, C_i = budget_i + max_new_tokens, per layer i the triple k_i, v_i, kpos_i):
  prefill(input_ids [B, L], positions [B, L]) -> (logits [B, V], k_0 [B, Hkv, C_0, D], v_0, kpos_0 [B, C_0], ...)
  decode(token [B, 1], position [B, 1], step [], k_0, v_0, kpos_0, ...) -> (logits [B, V], k_0, v_0, kpos_0, ...)
positions are logical token positions, -1 for left padding and for empty slots; decode step t writes slot
budget_i + t. Budgets must be static, so they come from a calibration file (`entropykv_fx.calibrate`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, fx, nn

from . import ops
from .cache import CompressedLayer, EntropyKVCache, PrefillStats, pad_slots
from .compat import with_cache
from .compress import kept_slots, layer_budgets
from .config import MAX_TOKENS, EntropyKVConfig
from .errors import ExportError, short_repr
from .exported import ExportLayout, prepare_export_dir, writable_path, write_layout
from .passes.backend import INDUCTOR_CONFIGS
from .passes.decompose import decompositions
from .passes.rewrite_attention import RewriteSettings, rewrite_attention
from .policies import POLICIES
from .scorers import SCORERS

logger = logging.getLogger("entropykv_fx")
PT2_FILES = ["prefill.pt2", "decode.pt2"]
AOTI_FILES = ["prefill.aoti.pt2", "decode.aoti.pt2"]


class _Prefill(nn.Module):
    def __init__(self, model: nn.Module, forward: Any, num_layers: int) -> None:
        super().__init__()
        self.model, self.forward_fn, self.num_layers = model, forward, num_layers

    def forward(self, input_ids: Tensor, positions: Tensor) -> tuple[Tensor, ...]:
        cache = EntropyKVCache(self.num_layers)
        cache.step_positions = positions
        out = self.forward_fn(input_ids=input_ids, position_ids=positions.clamp(min=0), **with_cache(cache),
                              use_cache=True, logits_to_keep=1)
        return (out.logits[:, -1], *(t for layer in cache.layers for t in (layer.keys, layer.values, layer.positions)))


class _SlotLayer(CompressedLayer):
    """A layer of fixed capacity whose update writes the new entries at `slot` (entropykv::write)."""

    def __init__(self, keys: Tensor, values: Tensor, positions: Tensor, slot: Tensor) -> None:
        super().__init__()
        self.keys, self.values, self.positions, self.slot = keys, values, positions, slot
        self.is_initialized, self.dtype, self.device = True, keys.dtype, keys.device

    def update(self, key_states: Tensor, value_states: Tensor, positions: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        self.keys, self.values, self.positions = ops.write(self.keys, self.values, self.positions, key_states,
                                                           value_states, positions, self.slot, layer)
        return self.keys, self.values


class _Decode(nn.Module):
    def __init__(self, model: nn.Module, forward: Any, budgets: list[int]) -> None:
        super().__init__()
        self.model, self.forward_fn, self.budgets = model, forward, budgets

    def forward(self, token: Tensor, position: Tensor, step: Tensor, *flat_cache: Tensor) -> tuple[Tensor, ...]:
        cache = EntropyKVCache(len(self.budgets))
        cache.layers = [_SlotLayer(*flat_cache[3 * i:3 * i + 3], step + budget) for i, budget in enumerate(self.budgets)]
        cache.step_positions = position
        out = self.forward_fn(input_ids=token, position_ids=position.clamp(min=0), **with_cache(cache),
                              use_cache=True)
        return (out.logits[:, -1], *(t for layer in cache.layers for t in (layer.keys, layer.values, layer.positions)))


def _compress_layers(budgets: list[int], capacities: list[int], config: EntropyKVConfig):
    """`RewriteSettings.compress_layer` for the prefill program: right after each layer's attention, its cache
    becomes its kept slots (`compress.kept_slots`), padded to its capacity with empty slots (position -1), so the
    program never holds every layer's full cache."""
    def compress_layer(layer: int, keys: Tensor, values: Tensor, positions: Tensor, entropy: Tensor, kv_scores: Tensor,
                       layer_scores: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        held = CompressedLayer.holding(keys, values, positions, PrefillStats(entropy, kv_scores, layer_scores))
        k, v, pos = kept_slots(held, budgets[layer], config)
        capacity = capacities[layer]
        return pad_slots(k, capacity, 2, 0), pad_slots(v, capacity, 2, 0), pad_slots(pos, capacity, 1, -1)
    return compress_layer


def _no_statistics(graph: fx.Graph, scores: dict[int, tuple[fx.Node, ...]]) -> None:
    """`use_scores` of a program that returns no statistics: the compressed cache is all it needs them for."""


def _rewritten(module: nn.Module, args: tuple, settings: RewriteSettings, use_scores=None) -> torch.export.ExportedProgram:
    """Export, rewrite attention into entropykv ops, export again (the final program holds the rewrite)."""
    with torch.no_grad():
        gm = torch.export.export(module, args, strict=False).module()
        kwargs = {"use_scores": use_scores} if use_scores else {}
        gm, result = rewrite_attention(gm, settings, **kwargs)
        if not result.outcomes:
            raise ExportError("export: the model's graph holds no attention site to rewrite")
        if result.left_alone:
            raise ExportError("export: attention sites could not be rewritten:\n  " +
                              "\n  ".join(str(o) for o in result.left_alone))
        return torch.export.export(gm, args, strict=False)


def _static_runtime(model: nn.Module) -> tuple[Any, EntropyKVConfig]:
    """The entropykv runtime and config of a model optimized with static (calibrated) layer-wise budgets."""
    runtime = model.__dict__.get("entropykv")  # optimize()'s handle
    if runtime is None:
        raise ExportError("export: optimize the model first, e.g. entropykv_fx.optimize(model, "
                          "budget_source='calibrated', calibration_file='budgets.json')")
    config: EntropyKVConfig = runtime.config
    if config.budget_source != "calibrated":
        raise ExportError("export: exported programs need static budgets, but this model's budgets are dynamic "
                          "(computed per prompt); calibrate with entropykv_fx.calibrate(...) or `entropykv-fx "
                          "calibrate` and optimize(model, budget_source='calibrated', calibration_file=...)")
    if POLICIES[config.policy].headwise:
        raise ExportError(f"export: policy {config.policy!r} uses the head-wise layout, which export does not "
                          "support yet; export a layer-wise policy (entropy, uniform, pyramidkv, streaming, full)")
    return runtime, config


def static_budgets(model: nn.Module, prompt_length: int) -> list[int]:
    """Per-layer kept-token counts the exported prefill will select (cheap: no tracing), e.g. to check limits.
    Warns (BudgetFloorWarning) where the always-kept sink_tokens + window override the calibrated budgets."""
    runtime, config = _static_runtime(model)
    return layer_budgets([math.nan] * runtime.num_layers, prompt_length, config)


def check_export(model: nn.Module, prompt_length: int, max_new_tokens: int, batch: int) -> None:
    """What every exporter checks before touching the output directory or tracing: an optimized model with
    calibrated layer-wise budgets and sizes that are ints >= 1 (ExportError naming the argument)."""
    _, config = _static_runtime(model)
    if SCORERS[config.scorer].reconstruct:
        raise ExportError("export: scorer='reconstruct' needs a reconstruction prefill (the prompt run twice), which "
                          "exported programs do not run; optimize with scorer='window', 'last_query' or 'key_norm'")
    for name, value in (("prompt_length", prompt_length), ("max_new_tokens", max_new_tokens), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_TOKENS:
            raise ExportError(f"export: {name}={short_repr(value)} is invalid: it must be >= 1 (an int, at most "
                              f"{MAX_TOKENS})")


def build_programs(model: nn.Module, *, prompt_length: int, max_new_tokens: int,
                   batch: int = 1) -> tuple[torch.export.ExportedProgram, torch.export.ExportedProgram, ExportLayout]:
    """The rewritten (prefill, decode) programs of an optimized model (calibrated budgets) and their cache layout
    (without programs: the writers add theirs)."""
    check_export(model, prompt_length, max_new_tokens, batch)
    runtime, config = _static_runtime(model)
    n = runtime.num_layers
    budgets = static_budgets(model, prompt_length)
    capacities = [b + max_new_tokens for b in budgets]
    settings = RewriteSettings(config.window, runtime.sliding_windows, rank_queries=SCORERS[config.scorer].rank_queries)
    device = next(model.parameters()).device
    ids = torch.zeros(batch, prompt_length, dtype=torch.long, device=device)
    positions = torch.arange(prompt_length, device=device).expand(batch, -1).contiguous()
    with runtime.eager():  # trace the model's own decoder, not optimize()'s compiled one
        logger.info("entropykv_fx: tracing the prefill program (%d tokens, %d layers)", prompt_length, n)
        prefill = _rewritten(_Prefill(model, model.forward, n), (ids, positions),
                             replace(settings, compress_layer=_compress_layers(budgets, capacities, config)),
                             _no_statistics)
        with torch.no_grad():
            cache = prefill.module()(ids, positions)[1:]
        step = torch.tensor(0, device=device)
        logger.info("entropykv_fx: tracing the decode program (%d new tokens)", max_new_tokens)
        decode = _rewritten(_Decode(model, model.forward, budgets), (ids[:, :1], positions[:, -1:] + 1, step, *cache),
                            RewriteSettings(None, runtime.sliding_windows))
    k = cache[0]
    layout = ExportLayout(
        num_layers=n, batch=batch, prompt_length=prompt_length, max_new_tokens=max_new_tokens, budgets=tuple(budgets),
        capacities=tuple(capacities), kv_heads=k.shape[1], head_dim=k.shape[-1],
        dtype=str(k.dtype).removeprefix("torch."), device=device.type, vocab_size=model.config.vocab_size,
        model=type(model).__name__, tokenizer=getattr(model.config, "name_or_path", None) or None,
        policy=config.policy, window=config.window, sink_tokens=config.sink_tokens,
        calibration_file=str(config.calibration_file))
    return prefill, decode, layout


def export(model: nn.Module, out_dir: str | Path, *, prompt_length: int, max_new_tokens: int, batch: int = 1,
           aoti: bool = True) -> Path:
    """Export an optimized model (calibrated budgets) to `out_dir`; returns the path of `layout.json`.

    Raises ExportError before any tracing for a model it cannot export (not optimized, dynamic budgets, head-wise
    policy), a bad size, or a directory it cannot write safely. Warns (BudgetFloorWarning) when `prompt_length`
    is so short that sink_tokens + window override some layers' calibrated budgets."""
    check_export(model, prompt_length, max_new_tokens, batch)
    prepare_export_dir(out_dir, PT2_FILES + (AOTI_FILES if aoti else []))
    prefill, decode, layout = build_programs(model, prompt_length=prompt_length, max_new_tokens=max_new_tokens,
                                             batch=batch)
    return write_programs(prefill, decode, layout, out_dir, aoti=aoti)


def write_programs(prefill: torch.export.ExportedProgram, decode: torch.export.ExportedProgram, layout: ExportLayout,
                   out_dir: str | Path, aoti: bool = True) -> Path:
    """Save programs from `build_programs` (and their AOTInductor packages) to `out_dir`; returns the layout path."""
    out = prepare_export_dir(out_dir, PT2_FILES + (AOTI_FILES if aoti else []))
    for file, ep in zip(PT2_FILES, (prefill, decode)):
        torch.export.save(ep, writable_path(out, file))
    if aoti:
        for file, ep in zip(AOTI_FILES, (prefill, decode)):
            logger.info("entropykv_fx: compiling %s with AOTInductor", file)
            torch._inductor.aoti_compile_and_package(ep.run_decompositions(decompositions()),
                                                     package_path=str(writable_path(out, file)),
                                                     inductor_configs=INDUCTOR_CONFIGS)
    return write_layout(out, replace(layout, programs={"pt2": tuple(PT2_FILES),
                                                       "aoti": tuple(AOTI_FILES) if aoti else ()}))
