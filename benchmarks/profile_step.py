"""Where a decode step's time goes (issue 18): GPU kernel time by kind, and each weight matrix's GEMV bandwidth.

    python benchmarks/profile_step.py --out benchmarks/results --tag h200

Llama-3-8B shape, random bf16 weights, batch 1, one prompt of `--context` tokens compressed to `--fraction`.
For each decode path (`StaticDecoder` bf16, int8, and `inductor=True`, replayed from their CUDA graph; the
optimized model's own decode step, as `generate()` calls it, with and without fused projections and with
`inductor=True`) the PyTorch
profiler records `--steps` steps; kernels are grouped by kind (matmul, decode attention, cache write,
the rest) and summed per step, next to the step's wall time (the gap is time the GPU waited). Then each weight
shape of one layer, and the fused q/k/v and gate/up shapes, is timed alone as a batch-1 `F.linear` replayed from a
CUDA graph (`triton.testing.do_bench_cudagraph`, weights rotating past the L2 cache): its bandwidth against the copy
bandwidth measured in the same run says what fusing projections could buy.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root (see speed.py)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
import triton  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from triton.testing import do_bench_cudagraph  # noqa: E402

import entropykv_fx  # noqa: E402
from benchmarks.speed import step_ms  # noqa: E402
from benchmarks.timing import FAST_POLICY, SHAPES, cuda_ms, random_llama, run_environment  # noqa: E402
from entropykv_fx.compat import cache_of  # noqa: E402
from entropykv_fx.decode import StaticDecoder  # noqa: E402

KINDS = [  # first match wins; names of cuBLAS / CUTLASS / nvjet GEMM kernels, our Triton kernels, Inductor's
    ("matmul", re.compile(r"gemm|gemv|nvjet|cutlass|xmma|sm90_|splitK|dot_kernel", re.IGNORECASE)),
    ("decode attention", re.compile(r"_decode_split|_decode_merge")),
    ("cache write", re.compile(r"index_copy|scatter|write_in_place|quantize", re.IGNORECASE)),
    ("argmax / softmax", re.compile(r"argmax|reduce_kernel|softmax", re.IGNORECASE)),
]


def kind_of(name: str) -> str:
    return next((kind for kind, pattern in KINDS if pattern.search(name)), "elementwise / other")


def kernel_breakdown(run, steps: int) -> tuple[dict, list[dict]]:
    """(GPU µs per step by kind, the 15 kernels with the most time per step) over `steps` calls of `run`."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            run()
        torch.cuda.synchronize()
    per_kind: dict[str, float] = defaultdict(float)
    kernels = []
    for event in prof.key_averages():
        us = event.self_device_time_total / steps
        if us <= 0:
            continue
        per_kind[kind_of(event.key)] += us
        kernels.append({"kernel": event.key[:90], "kind": kind_of(event.key), "us_per_step": round(us, 1),
                        "calls_per_step": round(event.count / steps, 1)})
    per_kind = {k: round(v, 1) for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])}
    per_kind["total"] = round(sum(per_kind.values()), 1)
    return per_kind, sorted(kernels, key=lambda r: -r["us_per_step"])[:15]


def gemv_rows(config, bandwidth: float) -> list[dict]:
    """Batch-1 F.linear per weight shape of one layer (and fused shapes): µs and % of copy bandwidth."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * h // config.num_attention_heads
    shapes = {"q_proj": (h, h), "k_proj / v_proj": (kv, h), "o_proj": (h, h), "gate_proj / up_proj": (i, h),
              "down_proj": (h, i), "fused q/k/v": (h + 2 * kv, h), "fused gate/up": (2 * i, h),
              "lm_head": (config.vocab_size, h)}
    rows = []
    for name, (out_features, in_features) in shapes.items():
        nbytes = out_features * in_features * 2
        copies = max(2, triton.cdiv(256 << 20, nbytes))  # rotate past the L2 cache
        weights = [torch.randn(out_features, in_features, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, in_features, device="cuda", dtype=torch.bfloat16)

        def run(weights=weights, x=x):
            for w in weights:
                F.linear(x, w)

        us = do_bench_cudagraph(run, rep=50, return_mode="median") * 1e3 / copies
        rows.append({"weight": name, "shape": f"{out_features}x{in_features}", "MB": round(nbytes / 1e6, 1),
                     "us": round(us, 2), "pct_copy_bandwidth": round(100 * nbytes / (us * 1e-6) / bandwidth, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--no-inductor", action="store_true", help="skip the inductor=True paths")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="h200")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = random_llama(args.shape, device, args.context + 64)
    env, bandwidth, weight_bytes = run_environment(device, args.shape, model)
    env.update(triton=triton.__version__, context=args.context, kept_fraction=args.fraction, steps=args.steps)
    result: dict = {"env": env, "paths": []}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_step_{args.tag}.json"

    entropykv_fx.optimize(model, policy=FAST_POLICY, budget=args.fraction)
    ids = torch.randint(1, model.config.vocab_size, (1, args.context), device=device)
    with torch.no_grad():
        cache = cache_of(model(ids, use_cache=True, logits_to_keep=1))
    variants = [("StaticDecoder bf16", {}), ("StaticDecoder int8", {"int8": True})]
    if not args.no_inductor:
        variants.append(("StaticDecoder bf16, inductor=True", {"inductor": True}))
    for name, options in variants:
        decoder = StaticDecoder(model, cache, max_new_tokens=4 * args.steps + 8, **options)
        wall = step_ms(decoder, args.steps, device)
        run = decoder.compiled()
        with torch.no_grad():
            per_kind, top = kernel_breakdown(run, args.steps)
        decoder.rewind()
        ideal = (weight_bytes + decoder.kv_bytes) / bandwidth * 1e3
        row = {"path": name, "wall_ms": round(wall, 3), "gpu_kernel_ms": round(per_kind["total"] / 1e3, 3),
               "ideal_ms": round(ideal, 3), "kv_GB": round(decoder.kv_bytes / 1e9, 3), "us_per_step_by_kind": per_kind,
               "top_kernels": top}
        result["paths"].append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(result, indent=1))
        del decoder, run
        torch.cuda.empty_cache()
    token = ids[:, -1:]
    steps = [{"inductor": False, "fuse_projections": True}, {"inductor": False, "fuse_projections": False}] + [
        {"inductor": True, "fuse_projections": True}] * (not args.no_inductor)
    for options in steps:  # the optimized model's own step (what generate() runs), replayed after the first
        entropykv_fx.optimize(model, policy=FAST_POLICY, budget=args.fraction, **options)
        with torch.no_grad():
            step_cache = cache_of(model(ids, use_cache=True, logits_to_keep=1))

            def run(step_cache=step_cache, model=model):
                model(token, past_key_values=step_cache, use_cache=True)

            run(), run()  # the first step reserves room, runs eagerly and records the graph
            wall = cuda_ms(run, args.steps)
            per_kind, top = kernel_breakdown(run, args.steps)
        shown = ", ".join(f"{k}={v}" for k, v in options.items())
        row = {"path": f"optimize({shown}) decode step", "wall_ms": round(wall, 3),
               "gpu_kernel_ms": round(per_kind["total"] / 1e3, 3), "us_per_step_by_kind": per_kind,
               "top_kernels": top}
        result["paths"].append(row)
        print(json.dumps(row), flush=True)
        path.write_text(json.dumps(result, indent=1))
        del step_cache
    del cache, model
    torch.cuda.empty_cache()
    result["gemv"] = gemv_rows(transformers.LlamaConfig(**SHAPES[args.shape]), bandwidth)
    print(json.dumps(result["gemv"]), flush=True)
    path.write_text(json.dumps(result, indent=1))
    path.with_suffix(".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    env = result["env"]
    lines = [f"# Decode step profile ({env['device']}, {env['shape']}, bf16 weights)", "",
             " · ".join(f"{k}={v}" for k, v in env.items()), "",
             "## GPU kernel time per step, by kind (µs; CUDA-graph replays under the PyTorch profiler)", ""]
    kinds = list(dict.fromkeys(k for p in result["paths"] for k in p["us_per_step_by_kind"]))
    lines += ["| path | wall ms | kernels ms | ideal ms | " + " | ".join(kinds) + " |",
              "|---" * (4 + len(kinds)) + "|"]
    lines += [f"| {p['path']} | {p['wall_ms']} | {p['gpu_kernel_ms']} | {p.get('ideal_ms', '')} | " +
              " | ".join(str(p["us_per_step_by_kind"].get(k, "")) for k in kinds) + " |" for p in result["paths"]]
    for p in result["paths"]:
        lines += ["", f"### {p['path']}: top kernels", "", "| kernel | kind | µs/step | calls/step |", "|---|---|---|---|"]
        lines += [f"| `{k['kernel']}` | {k['kind']} | {k['us_per_step']} | {k['calls_per_step']} |" for k in p["top_kernels"]]
    if result.get("gemv"):
        lines += ["", "## Batch-1 `F.linear` per weight shape (CUDA graph, weights rotating past L2)", "",
                  "| weight | shape | MB | µs | % of copy bandwidth |", "|---|---|---|---|---|"]
        lines += [f"| {r['weight']} | {r['shape']} | {r['MB']} | {r['us']} | {r['pct_copy_bandwidth']} |"
                  for r in result["gemv"]]
        total = statistics.fmean([r["pct_copy_bandwidth"] for r in result["gemv"]])
        lines += ["", f"Mean over shapes: {total:.1f}% of copy bandwidth."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
