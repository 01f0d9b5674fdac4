"""Why proportional entropy budgets lose: per layer, its entropy, its budget and whether it keeps the needle.

    python benchmarks/entropy_diagnosis.py --cases 6 --length 2048 --budget 0.25 --out benchmarks/results

For question-aware needle cases (`bench.cases`, select split: even indices), one scored prefill per question, then
`entropy` and `uniform` budgets compress copies of the cache. Per layer it reports the mean head entropy (nats),
the `entropy` policy's budget as a multiple of the uniform one, the share of the asked value's tokens each policy
keeps in that layer, and that share under each policy's own budget. Writes `entropy_diagnosis_<tag>.md`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from entropykv_fx.bench.cases import make_cases
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.bench.quality import DTYPES, environment
from entropykv_fx.config import EntropyKVConfig
from entropykv_fx.models import load_default_model


def value_positions(tokenizer, context_ids: list[int], value: str) -> list[int]:
    """Positions of the asked value's tokens in the context (its last occurrence)."""
    for prefix in (" ", ""):
        ids = tokenizer(prefix + value, add_special_tokens=False)["input_ids"]
        for start in range(len(context_ids) - len(ids), -1, -1):
            if context_ids[start:start + len(ids)] == ids:
                return list(range(start, start + len(ids)))
    raise ValueError(f"value {value!r} not found in the context tokens")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=6, help="select-split cases per task")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--budget", type=float, default=0.25)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="cpu")
    args = parser.parse_args(argv)
    model, tokenizer = load_default_model(dtype=DTYPES[args.dtype], device=args.device)
    cases = [c for c in make_cases(tokenizer, ["single_needle", "multi_key"], [args.length], 2 * args.cases, seed=1)
             if c.index % 2 == 0]
    n_layers = model.config.num_hidden_layers
    rows = {key: [[] for _ in range(n_layers)] for key in ("entropy", "ratio", "uniform", "entropy_policy")}
    for case in cases:
        q = case.questions[0]
        needle = set(value_positions(tokenizer, case.context_ids, q.answers[0]))
        full, _ = scored_prefill(model, torch.tensor([case.context_ids + q.question_ids]),
                                 EntropyKVConfig(policy="uniform"))  # window scores, as uniform and entropy rank
        kept = {}
        for policy in ("uniform", "entropy"):
            cache, report = compressed_copy(full, EntropyKVConfig(policy=policy, budget=args.budget))
            kept[policy] = ([len(needle & set(layer.positions[0].tolist())) / len(needle) for layer in cache.layers],
                            [r.budget for r in report.layers], [r.entropy for r in report.layers])
        for i in range(n_layers):
            rows["entropy"][i].append(kept["entropy"][2][i])
            rows["ratio"][i].append(kept["entropy"][1][i] / kept["uniform"][1][i])
            rows["uniform"][i].append(kept["uniform"][0][i])
            rows["entropy_policy"][i].append(kept["entropy"][0][i])
        print(f"case {case.task}/{case.index} done", file=sys.stderr, flush=True)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    env = environment(args.device)
    lines = [f"# Per-layer entropy, budget and needle retention ({len(cases)} select-split cases, {args.length} tokens, "
             f"{args.budget:g} kept)\n", *(f"- {k}: {v}" for k, v in env.items()),
             "\n| layer | mean head entropy (nats) | `entropy` budget / uniform | value tokens kept, `uniform` "
             "| value tokens kept, `entropy` |", "|---|---|---|---|---|"]
    for i in range(n_layers):
        lines.append(f"| {i} | {mean(rows['entropy'][i]):.2f} | {mean(rows['ratio'][i]):.2f} | "
                     f"{100 * mean(rows['uniform'][i]):.0f}% | {100 * mean(rows['entropy_policy'][i]):.0f}% |")
    order = sorted(range(n_layers), key=lambda i: mean(rows["entropy"][i]))
    third = n_layers // 3
    for name, group in (("lowest-entropy third", order[:third]), ("highest-entropy third", order[-third:])):
        lines.append(f"\n{name} (layers {sorted(group)}): budget x{mean([mean(rows['ratio'][i]) for i in group]):.2f} "
                     f"of uniform; value tokens kept {100 * mean([mean(rows['uniform'][i]) for i in group]):.0f}% "
                     f"(uniform) vs {100 * mean([mean(rows['entropy_policy'][i]) for i in group]):.0f}% (entropy)")
    out = Path(args.out) / f"entropy_diagnosis_{args.tag}.md"
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
