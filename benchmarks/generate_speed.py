"""`model.generate()` on an optimized model vs the static step (issue 18): Llama-3-8B shape, random bf16 weights.

    python benchmarks/generate_speed.py --out benchmarks/results --tag h200
    python benchmarks/generate_speed.py --shape tiny --device cpu --contexts 256 --steps 8   # smoke run

Per context and kept fraction (batch 1, greedy, `min_new_tokens` so every step runs): the wall time of each
decode step *inside* `generate()` (a stopping criterion synchronizes and reads the clock after every step, so
transformers' own per-step work is included), median over the steps after `--warmup`; with CUDA graph replay
(the default), with `optimize(..., cuda_graphs=False)` (every step eager) and with
`optimize(..., fuse_projections=False)` (replayed, q/k/v and gate/up as separate matmuls), with `--inductor` also
`optimize(..., inductor=True)` (the rewritten graphs compiled by Inductor, then replayed); then `StaticDecoder` replayed from a
CUDA graph over the same compressed cache (the low-level fast path), the bandwidth ideal (weights + kept KV read
once / copy bandwidth measured in this run), and transformers' own eager `generate()` over its full cache.
`--policies` times other policies' `generate()` the same way (`policy/scorer` names a scorer; head-wise policies
decode over their packed layout, which `StaticDecoder` does not take, so their ideal uses the bytes `report()`
counts). Decode time depends on the kept sizes, not on how they were scored: `cache_topk/window` times the
default's layout without its reconstruction prefill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root (see speed.py)
import torch  # noqa: E402
from transformers import StoppingCriteria, StoppingCriteriaList  # noqa: E402

import entropykv_fx  # noqa: E402
from benchmarks.speed import step_ms  # noqa: E402
from benchmarks.timing import FAST_POLICY, SHAPES, random_llama, run_environment, sync, write_markdown  # noqa: E402
from entropykv_fx.compat import cache_of  # noqa: E402
from entropykv_fx.decode import StaticDecoder  # noqa: E402
from entropykv_fx.policies import POLICIES  # noqa: E402


class StepClock(StoppingCriteria):
    """Never stops generation; records the time after each step, once the GPU has finished it."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, []

    def __call__(self, input_ids, scores, **kwargs):
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def generate_steps(model, ids, steps: int, device: torch.device) -> tuple[list[float], torch.Tensor]:
    """(ms of each decode step after the first token, in order; the generated tokens)."""
    clock = StepClock(device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, do_sample=False,
                             stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0)
    gaps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]
    return gaps, out[:, ids.shape[1]:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--contexts", type=int, nargs="+", default=[131072, 32768, 8192])
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.2, 0.1])
    parser.add_argument("--steps", type=int, default=48, help="timed decode steps per generate()")
    parser.add_argument("--warmup", type=int, default=4, help="decode steps not timed (graph recording, refills)")
    parser.add_argument("--policies", nargs="+", default=[FAST_POLICY],
                        help="policies to time, each `policy` or `policy/scorer` (default: the fast preset)")
    parser.add_argument("--inductor", action="store_true",
                        help="also optimize(inductor=True): the rewritten graphs compiled by Inductor, then replayed")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--tag", default="h200")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = random_llama(args.shape, device, max(args.contexts) + args.steps + args.warmup + 8)
    model.generation_config.eos_token_id = None
    env, bandwidth, weight_bytes = run_environment(device, args.shape, model)
    env.update(steps=args.steps, warmup=args.warmup)
    print(json.dumps(env), flush=True)
    rows: list[dict] = []

    def record(row: dict) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"generate_speed_{args.tag}.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
        write_markdown(args.out / f"generate_speed_{args.tag}.md", env, rows)

    total = args.steps + args.warmup
    for n in args.contexts:
        ids = torch.randint(1, model.config.vocab_size, (1, n), device=device)
        if "entropykv" in model.__dict__:  # transformers' own generate() first
            entropykv_fx.restore(model)
        hf_gaps, _ = generate_steps(model, ids, min(total, args.warmup + 16), device)
        record({"path": "transformers generate(), full cache", "context": n, "kept_fraction": 1.0,
                "decode_ms": round(statistics.median(hf_gaps[args.warmup:]), 3)})
        for fraction in args.fractions:
            ideals = {}
            for name in args.policies:
                policy, _, scorer = name.partition("/")
                chosen = dict(policy=policy, budget=fraction, scorer=scorer or None)
                tokens = {}
                for shown, graphs, fuse in (("cuda_graphs=True", True, True), ("cuda_graphs=False", False, True),
                                            ("fuse_projections=False", True, False)):
                    entropykv_fx.optimize(model, **chosen, inductor=False, cuda_graphs=graphs, fuse_projections=fuse)
                    gaps, tokens[shown] = generate_steps(model, ids, total, device)
                    record({"path": f"optimize({shown}) generate()", "policy": name, "context": n,
                            "kept_fraction": fraction, "decode_ms": round(statistics.median(gaps[args.warmup:]), 3),
                            "first_step_ms": round(gaps[0], 1), "max_step_ms": round(max(gaps[args.warmup:]), 3)})
                graph_ms = rows[-3]["decode_ms"]
                same = bool(torch.equal(tokens["cuda_graphs=True"], tokens["cuda_graphs=False"]))
                if POLICIES[policy].headwise:
                    cache_bytes = entropykv_fx.report(model).bytes_after
                    ideal = ideals[name] = (weight_bytes + cache_bytes) / bandwidth * 1e3
                    record({"path": "(head-wise: no StaticDecoder)", "policy": name, "context": n,
                            "kept_fraction": fraction, "kv_GB": round(cache_bytes / 1e9, 3), "ideal_ms": round(ideal, 3),
                            "generate_vs_ideal": round(graph_ms / ideal, 3), "tokens_equal_graph_vs_eager": same})
                    continue
                with torch.no_grad():
                    out = model(ids, use_cache=True, logits_to_keep=1)
                    decoder = StaticDecoder(model, cache_of(out), max_new_tokens=args.steps + 2)
                    del out
                    cache_bytes = decoder.kv_bytes
                    static = step_ms(decoder, args.steps, device)
                del decoder
                ideal = ideals[name] = (weight_bytes + cache_bytes) / bandwidth * 1e3
                record({"path": "StaticDecoder (same compressed cache)", "policy": name, "context": n,
                        "kept_fraction": fraction, "decode_ms": round(static, 3), "kv_GB": round(cache_bytes / 1e9, 3),
                        "ideal_ms": round(ideal, 3), "generate_vs_static": round(graph_ms / static, 3),
                        "generate_vs_ideal": round(graph_ms / ideal, 3), "tokens_equal_graph_vs_eager": same})
            if args.inductor:  # the first policy
                policy, _, scorer = args.policies[0].partition("/")
                entropykv_fx.optimize(model, policy=policy, scorer=scorer or None, budget=fraction, inductor=True,
                                      cuda_graphs=True, fuse_projections=True)
                gaps, _ = generate_steps(model, ids, total, device)
                ideal = ideals[args.policies[0]]
                record({"path": "optimize(inductor=True) generate()", "policy": args.policies[0], "context": n,
                        "kept_fraction": fraction,
                        "decode_ms": round(statistics.median(gaps[args.warmup:]), 3),
                        "first_step_ms": round(gaps[0], 1), "ideal_ms": round(ideal, 3),
                        "generate_vs_ideal": round(statistics.median(gaps[args.warmup:]) / ideal, 3)})
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
