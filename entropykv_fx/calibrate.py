"""Calibration: static per-layer budgets measured on sample texts.

Dynamic budgets depend on each prompt's entropies, so every prompt gives the cache a different shape.
Averaging the per-layer kept fractions over sample prompts gives one fixed allocation: with
`budget_source="calibrated"` the cache shape depends only on the prompt length, which exported programs need.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .config import EntropyKVConfig, model_shape
from .errors import InputError
from .hf import optimize, report


def calibrate(model: nn.Module, samples: Iterable[torch.Tensor], path: str | Path,
              config: EntropyKVConfig | None = None, **overrides: Any) -> Path:
    """Prefill each sample (input ids [1, n]) with dynamic budgets; write the mean kept fraction per layer.
    The policy is `uniform` unless `config` or `policy=` names another (static budgets are for layer-wise policies).

    The fractions are rescaled so their mean equals the mean measured over the samples (rounding aside),
    and the JSON also records the policy, the budget, the number of samples and their lengths, and the model it
    was measured on (class name, layer, KV-head and attention-head counts: `optimize()` refuses the file for
    another model). For a head-wise policy it also stores the grouping: each KV head's mean kept fraction
    (`head_fractions`) and whether it was stored int8 in most samples (`int8_heads`).

    Raises, before any prefill: InputError for an output path that cannot be written (a directory, a symbolic
    link, a missing parent that cannot be created), ConfigError for a bad field.
    """
    out = writable_output(path, "calibrate")
    # calibrations give static budgets (exports, StaticCacheModel), which take layer-wise policies: uniform by default
    cfg = (config or EntropyKVConfig(policy="uniform")).replace(budget_source="dynamic", calibration_file=None,
                                                                 **overrides)
    optimize(model, cfg)
    per_sample: list[list[float]] = []
    per_head: list[list[list[float]]] = []
    int8_votes: list[list[list[bool]]] = []
    lengths: list[int] = []
    with torch.no_grad():
        for ids in samples:
            model(ids.to(model.device), use_cache=True)
            rep = report(model)
            per_sample.append([lr.slots_after / rep.prompt_tokens for lr in rep.layers])
            if rep.layers[0].heads:
                per_head.append([[h.slots / rep.prompt_tokens for h in lr.heads] for lr in rep.layers])
                int8_votes.append([[h.storage == "int8" for h in lr.heads] for lr in rep.layers])
            lengths.append(rep.prompt_tokens)
    if not per_sample:
        raise InputError("calibrate: no samples were given; expected at least one [1, n] tensor of token ids")
    fractions = [min(1.0, sum(col) / len(col)) for col in zip(*per_sample)]
    record = {"layer_fractions": fractions, "policy": cfg.policy, "budget": cfg.budget, "window": cfg.window,
              "sink_tokens": cfg.sink_tokens, "samples": len(lengths), "prompt_tokens": lengths,
              **model_shape(model)}
    if per_head:
        record["head_fractions"] = [[min(1.0, sum(col) / len(col)) for col in zip(*layer)] for layer in zip(*per_head)]
        record["int8_heads"] = [[2 * sum(col) > len(col) for col in zip(*layer)] for layer in zip(*int8_votes)]
    out.write_text(json.dumps(record, indent=1))
    return out


def writable_output(path: str | Path, who: str) -> Path:
    """`path` as a file `who` can write (parent created), checked before any work: InputError names it."""
    out = Path(path)
    if out.is_dir() or out.is_symlink():
        raise InputError(f"{who}: out={str(path)!r} is {'a directory' if out.is_dir() else 'a symbolic link'}; "
                         "expected the path of a JSON file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{who}: out={str(path)!r}: cannot create its folder ({err.strerror})") from None
    if not os.access(out.parent, os.W_OK | os.X_OK) or out.exists() and not os.access(out, os.W_OK):
        raise InputError(f"{who}: out={str(path)!r} is not writable; expected a writable file path")
    return out


def text_samples(tokenizer, texts: list[str], prompt_tokens: int, max_samples: int = 8) -> list[torch.Tensor]:
    """Cut texts into consecutive `prompt_tokens`-token samples (at most `max_samples`)."""
    samples = []
    for body in texts:
        ids = tokenizer(body)["input_ids"]
        for start in range(0, len(ids) - prompt_tokens + 1, prompt_tokens):
            samples.append(torch.tensor([ids[start:start + prompt_tokens]]))
            if len(samples) == max_samples:
                return samples
    if not samples:
        raise InputError(f"calibrate: prompt_tokens={prompt_tokens} is invalid for these texts: they hold no "
                         f"{prompt_tokens}-token sample; give longer texts or fewer tokens")
    return samples


def calibrate_default_model(text_files: list[str], path: str | Path, prompt_tokens: int = 2000,
                            **overrides: Any) -> Path:
    """`entropykv-fx calibrate`: calibrate SmolLM2-135M-Instruct on text files (default: the committed texts).
    Arguments, texts and the output path are checked before the model loads."""
    from .models import load_default_model, text

    writable_output(path, "calibrate")
    if not isinstance(prompt_tokens, int) or prompt_tokens < 1:
        raise InputError(f"calibrate: prompt_tokens={prompt_tokens!r} is invalid: expected an int >= 1")
    EntropyKVConfig(**overrides)  # a bad policy or budget fails here, not after the model loaded
    missing = [f for f in text_files if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"calibrate: text files not found: {missing}")
    bodies = [Path(f).read_text(encoding="utf-8") for f in text_files] or [text("emma"), text("persuasion")]
    model, tokenizer = load_default_model()
    samples = text_samples(tokenizer, bodies, prompt_tokens)
    return calibrate(model, tqdm(samples, desc="calibrating", unit="prompt"), path, **overrides)
