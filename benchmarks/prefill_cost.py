"""Prefill time and peak memory of each policy/scorer composition against the unmodified model's prefill (issue
17: what the `reconstruct` scorer and the default composition cost).

    python benchmarks/prefill_cost.py --shape llama3-8b --contexts 2048 8192 32768 --device cuda --tag h200

Per context: the unmodified model's prefill (SDPA, its own cache), then `optimize(model, policy=P, scorer=S,
budget=--budget)` for each --compositions entry P/S: one untimed call (graphs compile), then the median of --repeats timed prefills (synchronized),
the peak memory of one of them, and the ratio to the unmodified prefill. Random bf16 weights at the shape's sizes.
Peak: CUDA's allocated bytes; on a CPU (Linux) the process's peak resident set, interpreter and libraries included
(`timing.peak_gib`): run it as `MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/prefill_cost.py --device cpu ...`.
Writes prefill_cost_<tag>.json and .md to --out; with --profile, also prefill_profile_<tag>.txt: per prefill, the
GPU kernels that took the most time (torch.profiler), to show where a composition's extra cost goes; with
--peak-allocations, prefill_peak_<tag>.txt: per prefill, the largest tensors alive at its memory peak (allocated
during the prefill; the weights are not among them), each with the innermost frames of code that allocated it
(`torch.cuda.memory` history).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from timing import SHAPES, peak_gib, random_llama, reset_peak, run_environment, seconds, write_markdown

import entropykv_fx


def timed_prefill(model, ids, repeats: int, device: torch.device) -> tuple[float, float]:
    """(median seconds, peak GiB) of `repeats` prefills of ids after one untimed call."""
    with torch.no_grad():
        model(ids, use_cache=True, logits_to_keep=1)
        times = []
        for i in range(repeats):
            if i == repeats - 1:
                reset_peak(device)
            times.append(seconds(lambda: model(ids, use_cache=True, logits_to_keep=1), device)[1])
    return statistics.median(times), peak_gib(device)


def kernel_table(model, ids, rows: int) -> str:
    """torch.profiler's table of the `rows` kernels with the most device time over one prefill."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.no_grad(), torch.profiler.profile(activities=activities) as prof:
        model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="device_time_total", row_limit=rows, max_name_column_width=60)


def peak_allocations(model, ids, rows: int) -> str:
    """The `rows` largest blocks alive at the peak of one prefill's allocations, with where they were allocated."""
    torch.cuda.memory._record_memory_history(max_entries=1_000_000, stacks="python")  # C++ frames say nothing here
    try:
        with torch.no_grad():
            model(ids, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()
        trace = torch.cuda.memory._snapshot()["device_traces"][torch.cuda.current_device()]
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    live, total, peak, at_peak = {}, 0, 0, {}
    for event in trace:  # replay allocations and frees; keep what was alive when the total peaked
        if event["action"] == "alloc":
            live[event["addr"]] = event
            total += event["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif event["action"] == "free_completed" and event["addr"] in live:
            total -= live.pop(event["addr"])["size"]
    lines = [f"peak of this prefill's own allocations: {peak / 2**30:.2f} GiB"]
    for event in sorted(at_peak.values(), key=lambda e: -e["size"])[:rows]:
        frames = [f"{f['filename'].rsplit('/', 2)[-1]}:{f['line']} {f['name']}" for f in event.get("frames", [])
                  if "torch/" not in f["filename"]][:3]  # compiled graphs' code shows as <eval_with_key>
        lines.append(f"{event['size'] / 2**30:7.3f} GiB  " + " <- ".join(frames))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--compositions", nargs="+", default=["uniform/window", "uniform/last_query", "uniform/key_norm",
                                                              "uniform/reconstruct", "cache_topk/reconstruct"],
                        help="policy/scorer pairs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--budget", type=float, default=0.25, help="kept fraction of every composition")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also profile one prefill per entry and keep its ROWS costliest kernels (CUDA only)")
    parser.add_argument("--peak-allocations", type=int, default=0, metavar="ROWS",
                        help="also record one prefill's allocations per entry and keep the ROWS largest alive at its "
                             "peak (CUDA only)")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_llama(args.shape, device, max(args.contexts) * 2 + 64)
    env, _, _ = run_environment(device, args.shape, model)
    env["entropykv_fx"], env["budget"] = entropykv_fx.__version__, args.budget
    stem = Path(args.out) / f"prefill_cost_{args.tag}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    rows, profiles, peaks = [], [], []
    for n in args.contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        if "entropykv" in model.__dict__:
            entropykv_fx.restore(model)
        plain, plain_peak = timed_prefill(model, ids, args.repeats, device)
        if args.profile:
            profiles.append(f"## {n} tokens, unmodified\n{kernel_table(model, ids, args.profile)}")
        if args.peak_allocations:
            peaks.append(f"## {n} tokens, unmodified\n{peak_allocations(model, ids, args.peak_allocations)}")
        rows.append(dict(context=n, prefill="unmodified", ms=round(plain * 1e3, 1), ratio=1.0,
                         peak_GiB=round(plain_peak, 3)))
        for composition in args.compositions:
            policy, scorer = composition.split("/")
            entropykv_fx.optimize(model, policy=policy, scorer=scorer, budget=args.budget)
            t, peak = timed_prefill(model, ids, args.repeats, device)
            if args.profile:
                profiles.append(f"## {n} tokens, {composition}\n{kernel_table(model, ids, args.profile)}")
            if args.peak_allocations:
                peaks.append(f"## {n} tokens, {composition}\n{peak_allocations(model, ids, args.peak_allocations)}")
            rows.append(dict(context=n, prefill=composition, ms=round(t * 1e3, 1), ratio=round(t / plain, 2),
                             peak_GiB=round(peak, 3)))
            print(rows[-1], flush=True)
        stem.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        write_markdown(stem.with_suffix(".md"), env, rows)
        header = " · ".join(f"{k}={v}" for k, v in env.items())
        for kind, texts in (("profile", profiles), ("peak", peaks)):
            if texts:
                (stem.parent / f"prefill_{kind}_{args.tag}.txt").write_text("\n\n".join([header, *texts]) + "\n")
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
