"""`optimize()` under transformers' tensor parallelism against one device (issue 20): memory, decode time, tokens.

    python benchmarks/tp_speed.py checkpoint --dir /tmp/tp8b                 # random Llama-3-8B-shaped bf16 weights
    python benchmarks/tp_speed.py run --dir /tmp/tp8b --out OUT --tag one    # one GPU
    torchrun --nproc-per-node 2 benchmarks/tp_speed.py run --dir /tmp/tp8b --out OUT --tag tp2   # tp_plan="auto"
    python benchmarks/tp_speed.py compare OUT/tp_speed_one.json OUT/tp_speed_tp2.json --out OUT
    # smoke run on CPU (gloo): --shape tiny --device cpu to checkpoint and run, smaller --context

`run` loads the checkpoint (sharded with `tp_plan="auto"` when started by torchrun), then for each `--policies`
entry: `optimize(model, policy=..., budget=--fraction)`, one greedy `generate()` of a seeded prompt, timing every
decode step inside it (`generate_speed.StepClock`), the first step's logits, the tokens, each rank's peak memory and
the KV bytes its cache holds. Rank 0 writes `tp_speed_<tag>.json`. `compare` puts two runs side by side:
ms/token, peak memory per rank, and how far the tokens agree. bf16 reductions differ between one device and two
(the ranks' partial sums of o_proj and down_proj are added by an all-reduce), so tokens may part after a near tie:
`compare` reports the leading tokens equal and the largest difference among the first step's top 256 logits (row 0),
not a yes/no.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # the repository root (see speed.py)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, StoppingCriteriaList  # noqa: E402

import entropykv_fx  # noqa: E402
from benchmarks.generate_speed import StepClock  # noqa: E402
from benchmarks.timing import SHAPES, commit, peak_gib, reset_peak  # noqa: E402


def make_checkpoint(args) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[args.shape], max_position_embeddings=args.context + 1024)
    with torch.device(args.device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(args.dir)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters to {args.dir}", flush=True)


def run(args) -> None:
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    device = torch.device(args.device, int(os.environ.get("LOCAL_RANK", "0"))) if args.device == "cuda" else \
        torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    sharding = {"tp_plan": "auto"} if ranks > 1 else {"device_map": str(device)}
    model = LlamaForCausalLM.from_pretrained(args.dir, dtype=torch.bfloat16, **sharding).eval()
    model.generation_config.eos_token_id = None
    ids = torch.randint(1, model.config.vocab_size, (args.batch, args.context),
                        generator=torch.Generator().manual_seed(1)).to(device)
    env = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "CPU", "ranks": ranks,
           "backend": dist.get_backend() if dist.is_initialized() else None, "torch": torch.__version__,
           "transformers": transformers.__version__, "commit": commit(), "context": args.context,
           "batch": args.batch, "kept_fraction": args.fraction, "steps": args.steps,
           "command": "python " + " ".join(sys.argv)}
    rows = []
    for policy in args.policies:
        entropykv_fx.optimize(model, policy=policy, budget=args.fraction, verify_ranks=ranks > 1)
        reset_peak(device)
        clock = StepClock(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.steps + 1, min_new_tokens=args.steps + 1, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([clock]), pad_token_id=0,
                                 output_scores=True, return_dict_in_generate=True)
        gaps = [(b - a) * 1e3 for a, b in zip(clock.times, clock.times[1:])]
        report = entropykv_fx.report(model)
        mine = {"rank": rank, "peak_GiB": round(peak_gib(device), 2), "kv_bytes": report.bytes_after}
        per_rank = [None] * ranks
        if ranks > 1:
            dist.all_gather_object(per_rank, mine)
        else:
            per_rank = [mine]
        rows.append({"policy": policy, "decode_ms": round(statistics.median(gaps[args.warmup:]), 3),
                     "first_step_ms": round(gaps[0], 1), "ranks": per_rank,
                     "tokens": out.sequences[:, args.context:].tolist(),
                     "first_top_logits": top_logits(out.scores[0][0])})
        if rank == 0:
            print(json.dumps({k: v for k, v in rows[-1].items() if k not in ("tokens", "first_top_logits")}),
                  flush=True)
    if rank == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"tp_speed_{args.tag}.json").write_text(json.dumps({"env": env, "rows": rows}))


def top_logits(logits: torch.Tensor, k: int = 256) -> dict[str, list]:
    """The `k` largest logits [V] of a step, by token id (what a greedy or top-k decision reads)."""
    top = logits.float().topk(min(k, logits.shape[-1]))
    return {str(i): v for i, v in zip(top.indices.tolist(), top.values.tolist())}


def leading_equal(a: list[list[int]], b: list[list[int]]) -> int:
    """Tokens equal from the start, the least over the batch rows."""
    return min(next((i for i, (x, y) in enumerate(zip(ra, rb)) if x != y), len(ra)) for ra, rb in zip(a, b))


def compare(args) -> None:
    one, many = (json.loads(Path(p).read_text()) for p in (args.one, args.many))
    lines = [f"# Tensor parallelism: {many['env']['ranks']} ranks vs one ({many['env']['device']})", "",
             f"one: `{one['env']['command']}` (commit {one['env']['commit']})",
             f"ranks: `{many['env']['command']}` (commit {many['env']['commit']}, {many['env']['backend']})",
             (f"context {one['env']['context']}, batch {one['env']['batch']}, kept {one['env']['kept_fraction']}, "
              f"torch {many['env']['torch']}, transformers {many['env']['transformers']}"), "",
             ("| policy | ms/token one | ms/token ranks | peak GiB one | peak GiB per rank | KV bytes one | KV bytes "
              "per rank | leading tokens equal | max first-step logit diff (top 256) |"), "|---" * 9 + "|"]
    for a, b in zip(one["rows"], many["rows"]):
        shared = a["first_top_logits"].keys() & b["first_top_logits"].keys()
        diff = max(abs(a["first_top_logits"][t] - b["first_top_logits"][t]) for t in shared)
        peaks = ", ".join(str(r["peak_GiB"]) for r in b["ranks"])
        kv = ", ".join(f"{r['kv_bytes']:,}" for r in b["ranks"])
        lines.append(f"| {a['policy']} | {a['decode_ms']} | {b['decode_ms']} | {a['ranks'][0]['peak_GiB']} | {peaks} | "
                     f"{a['ranks'][0]['kv_bytes']:,} | {kv} | {leading_equal(a['tokens'], b['tokens'])} of "
                     f"{len(a['tokens'][0])} | {diff:.4g} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"tp_speed_{many['env']['ranks']}ranks.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("checkpoint", "run"):
        p = sub.add_parser(name)
        p.add_argument("--dir", type=Path, required=True)
        p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
        p.add_argument("--context", type=int, default=32768)
    sub.choices["checkpoint"].add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    run_parser = sub.choices["run"]
    run_parser.add_argument("--batch", type=int, default=1)
    run_parser.add_argument("--fraction", type=float, default=0.2)
    run_parser.add_argument("--policies", nargs="+", default=["uniform", "entropy", "adakv"])
    run_parser.add_argument("--steps", type=int, default=32)
    run_parser.add_argument("--warmup", type=int, default=4)
    run_parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    run_parser.add_argument("--tag", default="tp")
    comp = sub.add_parser("compare")
    comp.add_argument("one", type=Path)
    comp.add_argument("many", type=Path)
    comp.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    {"checkpoint": make_checkpoint, "run": run, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
