"""Per-decoded-token latency: ONNX Runtime (CPU) vs PyTorch, on SmolLM2-135M-Instruct in fp32.

The model is optimized with static budgets (every layer keeps `--fraction` of the prompt), then exported once
(`aot.build_programs`) to ONNX (`OrtGenerator`) and to torch.export programs (`ExportedGenerator(kind="pt2")`).
Decode cost per token = (time of generate(N new tokens) - time of generate(1)) / (N - 1), median over repeats;
generate(1) is the prefill (plus one argmax). Also reports whether each runner's greedy tokens equal PyTorch's.

    python benchmarks/ort_latency.py --threads 2 --out benchmarks/results/ort_latency_cpu.json
    python benchmarks/ort_latency.py --device cuda        # PyTorch side on the GPU; ORT always on the CPU
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime
import torch
import transformers

import entropykv_fx
from entropykv_fx.aot import build_programs, write_programs
from entropykv_fx.exported import ExportedGenerator
from entropykv_fx.exporters.onnx import OrtGenerator, write_onnx
from entropykv_fx.models import load_default_model, text


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of `fn()` in seconds over `repeats` runs (after one warm-up), and its last result."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def latency(generate, new_tokens: int, repeats: int) -> dict:
    """Prefill and per-decoded-token milliseconds of `generate(n)`, and the tokens of generate(new_tokens)."""
    prefill, _ = timed(lambda: generate(1), repeats)
    full, tokens = timed(lambda: generate(new_tokens), repeats)
    return {"prefill_ms": round(1e3 * prefill, 2),
            "decode_ms_per_token": round(1e3 * (full - prefill) / (new_tokens - 1), 2),
            "tokens": np.asarray(tokens).reshape(-1).tolist()}


def cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def optimized(fraction: float, calibration: Path, device: str):
    model, tokenizer = load_default_model(device=device, show_progress=False)
    calibration.write_text(json.dumps({"layer_fractions": [fraction] * model.config.num_hidden_layers}))
    return entropykv_fx.optimize(model, budget_source="calibrated", calibration_file=str(calibration)), tokenizer


def markdown(report: dict) -> str:
    env = report["environment"]
    rows = [f"| {name} | {r['prefill_ms']:.1f} | {r['decode_ms_per_token']:.2f} | "
            f"{'-' if r.get('tokens_equal_pytorch') is None else ('yes' if r['tokens_equal_pytorch'] else 'no')} |"
            for name, r in report["runners"].items()]
    return "\n".join([
        f"# ORT vs PyTorch decode latency: {report['model']} fp32",
        "",
        f"`{env['command']}`",
        "",
        f"CPU: {env['cpu']}, {env['threads']} threads; PyTorch device: {env['pytorch_device']}; torch {env['torch']}, "
        f"transformers {env['transformers']}, onnxruntime {env['onnxruntime']}.",
        f"Prompt {report['prompt_length']} tokens, {report['new_tokens']} new tokens, every layer keeps "
        f"{report['fraction']:.0%} of the prompt (budgets {report['budgets'][0]}), median of {report['repeats']} "
        f"repeats. Export: build_programs {report['export_s']['build_programs']:.0f} s, ONNX "
        f"{report['export_s']['onnx']:.0f} s.",
        "",
        "| runner | prefill ms (generate 1 token) | decode ms/token | greedy tokens = PyTorch |",
        "|---|---|---|---|",
        *rows, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-length", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fraction", type=float, default=0.25, help="kept fraction of the prompt, every layer")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="PyTorch side; ORT runs on the CPU")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch and ORT intra-op threads")
    parser.add_argument("--no-pt2", action="store_true", help="skip the torch.export programs")
    parser.add_argument("--out", type=Path, help="JSON report (a .md table is written beside it)")
    args = parser.parse_args()
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time is generate(N) - generate(1))")
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ort_latency_"))
    atexit.register(shutil.rmtree, work, True)  # the exported programs take about 2 GB

    model, tokenizer = optimized(args.fraction, work / "budgets.json", args.device)
    ids = tokenizer(text("emma"), return_tensors="pt")["input_ids"][:, :args.prompt_length]

    def pytorch(n: int) -> torch.Tensor:
        with torch.no_grad():
            out = model.generate(ids.to(args.device), max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[:, ids.shape[1]:].cpu()

    runners = {"pytorch (optimized model, generate)": latency(pytorch, args.new_tokens, args.repeats)}
    print(runners, file=sys.stderr)

    if args.device != "cpu":  # the ONNX graphs are exported from a CPU model
        del model
        model, _ = optimized(args.fraction, work / "budgets.json", "cpu")
    start = time.perf_counter()
    prefill, decode, layout = build_programs(model, prompt_length=args.prompt_length, max_new_tokens=args.new_tokens)
    export_s = {"build_programs": time.perf_counter() - start}
    start = time.perf_counter()
    write_onnx(prefill, decode, layout, work / "onnx")
    export_s["onnx"] = time.perf_counter() - start
    print(f"export: {export_s}", file=sys.stderr)

    ort = OrtGenerator(work / "onnx", threads=args.threads)
    runners["onnxruntime (OrtGenerator, CPU)"] = latency(lambda n: ort.generate(ids.numpy(), n), args.new_tokens,
                                                         args.repeats)
    if not args.no_pt2:
        write_programs(prefill, decode, layout, work / "pt2", aoti=False)
        pt2 = ExportedGenerator(work / "pt2", kind="pt2", trust_code=True)
        runners["torch.export programs (ExportedGenerator pt2, CPU)"] = latency(
            lambda n: pt2.generate(ids, n), args.new_tokens, args.repeats)
    reference = runners["pytorch (optimized model, generate)"]["tokens"]
    for name, result in list(runners.items())[1:]:
        result["tokens_equal_pytorch"] = result["tokens"] == reference

    report = {
        "model": "SmolLM2-135M-Instruct", "dtype": "float32", "prompt_length": int(ids.shape[1]),
        "new_tokens": args.new_tokens, "repeats": args.repeats, "fraction": args.fraction,
        "budgets": list(layout.budgets), "export_s": {k: round(v, 1) for k, v in export_s.items()},
        "environment": {"command": " ".join(["python", *sys.argv]), "cpu": cpu_name(), "threads": args.threads,
                        "pytorch_device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "runners": runners}
    table = markdown(report)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(table)


if __name__ == "__main__":
    main()
