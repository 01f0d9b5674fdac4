"""Tiny random-weight models of every supported architecture, for fast CPU tests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

# ENTROPYKV_TEST_DEVICE=cuda runs the model-level tests with CUDA tensors (on the GPU machine).
DEVICE = torch.device(os.environ.get("ENTROPYKV_TEST_DEVICE", "cpu"))

_COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, eos_token_id=None, bos_token_id=None)

ARCHS = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**_COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**_COMMON)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**_COMMON, head_dim=32)),
    # A sliding window shorter than the test prompts, so the window is really exercised.
    "mistral": lambda: MistralForCausalLM(MistralConfig(**_COMMON, sliding_window=24)),
}


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ARCHS[arch]().to(DEVICE, dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def random_prompt(length: int, batch: int = 1, seed: int = 1, vocab: int = 97) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab, (batch, length), generator=generator).to(DEVICE)


def left_padded(prompts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 1-D prompts, left-padded with 0 (the tiny models' pad id), and its attention mask."""
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, n - len(p):], mask[i, n - len(p):] = p, 1
    return ids, mask


def calibrated(tmp_path: Path, arch: str, fractions: list[float]) -> torch.nn.Module:
    """A tiny model optimized with static budgets: layer i keeps fractions[i] of the prompt (as exports need)."""
    import entropykv_fx

    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"layer_fractions": fractions}))
    return entropykv_fx.optimize(tiny_model(arch), budget_source="calibrated", calibration_file=str(path))
