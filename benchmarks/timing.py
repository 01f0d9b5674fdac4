"""Timing helpers and model shapes shared by speed.py and kvpress_speed.py: plain torch, no entropykv_fx import
(kvpress_speed.py runs in the kvpress venv, whose transformers entropykv_fx does not accept).

    python benchmarks/timing.py RUN.json      # (re)write RUN.md, the table of a run's JSON (for runs cut short)
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import Tensor

from entropykv_fx.compat import with_cache

# The speed benchmarks time the layer-wise decode path (one attention call per layer, StaticDecoder's layout): the
# `uniform` policy with its `window` scorer, the fast preset (README). The default (cache_topk with reconstruct
# scores) is the accurate one and costs a reconstruction prefill and one attention call per KV head.
FAST_POLICY = "uniform"

SHAPES = {  # Llama-3-8B: 32 layers, 32 query / 8 KV heads of 128, vocabulary 128256
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # SmolLM2-135M (the quality benchmarks' model): 30 layers, 9 query / 3 KV heads of 64
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=1000, rope_theta=10000.0),
}


def random_llama(shape: str, device: torch.device, max_context: int):
    """The benchmark model: a Llama of SHAPES[shape] with random bf16 weights (seeded by the caller) and SDPA."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max_context + 1024)
    config._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = LlamaForCausalLM(config).eval()
    torch.set_default_dtype(torch.float32)
    return model


def commit() -> str:
    """The code's commit: $ENTROPYKV_COMMIT when the caller knows it better (a copy whose .git lags), else git's."""
    if os.environ.get("ENTROPYKV_COMMIT"):
        return os.environ["ENTROPYKV_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=False, cwd=Path(__file__).parent).stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def run_environment(device: torch.device, shape: str, model) -> tuple[dict, float, int]:
    """(what a run's JSON records about the machine and model, copy bandwidth in B/s, weight bytes read per token)."""
    bandwidth = copy_bandwidth(device)
    weight_bytes = sum(p.nbytes for p in model.parameters()) - model.model.embed_tokens.weight.nbytes
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"{platform.machine()} CPU",
           "torch": torch.__version__, "python": platform.python_version(), "shape": shape, "dtype": "bfloat16",
           "copy_bandwidth_GBps": round(bandwidth / 1e9, 1), "weights_read_per_token_GB": round(weight_bytes / 1e9, 2),
           "transformers": transformers.__version__,
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv), "commit": commit()}
    return env, bandwidth, weight_bytes


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def seconds(fn, device: torch.device):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def cuda_ms(run, steps: int) -> float:
    """ms per call of `run` over `steps` calls, timed by CUDA events (the GPU's time, launch gaps included)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(steps):
        run()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / steps


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * src.nbytes * 20 / (begin.elapsed_time(end) / 1e3)


def peak_gib(device: torch.device) -> float:
    """Peak memory since `reset_peak`: CUDA's allocated bytes; on a Linux CPU the process's resident set (VmHWM:
    interpreter and libraries included; run with MALLOC_MMAP_THRESHOLD_=65536 so that freed tensors leave it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status")
    if not status.exists():
        return float("nan")
    return int(re.search(r"VmHWM:\s+(\d+) kB", status.read_text()).group(1)) / 2**20


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: the peak resident set restarts from the current one


def eager_decode_ms(model, cache, token: Tensor, n: int, steps: int, device: torch.device) -> tuple[float, Tensor]:
    """ms/token of `model` called token by token on its own cache (the first call is not timed); first logits."""
    with torch.no_grad():
        first = model(token, **with_cache(cache), use_cache=True,
                      position_ids=torch.full_like(token, n)).logits[:, -1]
        _, total = seconds(lambda: [model(token, **with_cache(cache), use_cache=True,
                                          position_ids=torch.full_like(token, n + 1 + i)) for i in range(steps)], device)
    return total / steps * 1e3, first


def write_markdown(path: Path, env: dict, rows: list[dict]) -> None:
    lines = [f"# Speed and memory ({env['device']}, {env['shape']}, bf16)", "",
             " · ".join(f"{k}={v}" for k, v in env.items()), ""]
    keys = list(dict.fromkeys(k for row in rows for k in row))
    lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    run = Path(sys.argv[1])
    data = json.loads(run.read_text())
    write_markdown(run.with_suffix(".md"), data["env"], data["rows"])
