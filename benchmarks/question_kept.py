"""How much of the question the default keeps when the question is compressed with its context (question-aware).

    python benchmarks/question_kept.py --length 2048 --cases 4 --seed 23 --windows 32 64 --out benchmarks/results

Single-needle prompts (`entropykv_fx.bench.cases`, SmolLM2-135M-Instruct: context, then the chat template's
question and answer prefix), scored once with the default's `reconstruct` scorer; for each `window` and budget,
the default (`cache_topk`) compresses a copy, and for the question's tokens outside the last `window` (the
always-kept ones) we count the fraction of (layer, KV head) pairs that keep each, averaged over those tokens.
A question longer than the window loses its first tokens (the key it asks about) in most heads at low budgets.
Writes `question_kept.md` to --out.
"""

from __future__ import annotations

from pathlib import Path

import torch
from layer_allocation import diagnostic_parser

from entropykv_fx.bench.cases import make_case
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.bench.quality import DTYPES, environment
from entropykv_fx.config import EntropyKVConfig
from entropykv_fx.models import load_default_model


def kept_share(cache, first: int, last: int) -> float | None:
    """Mean over the prompt positions first..last-1 of the fraction of (layer, KV head) pairs that keep each; None
    for an empty range."""
    if last <= first:
        return None
    wanted = torch.arange(first, last)
    shares = [torch.isin(wanted, head.positions[0]).float().mean() for layer in cache.layers for head in layer.heads]
    return float(torch.stack(shares).mean())


def main() -> None:
    parser = diagnostic_parser(__doc__.split("\n")[0], seed=23)
    parser.add_argument("--cases", type=int, default=4)
    parser.add_argument("--windows", type=int, nargs="+", default=[32, 64], help="always-kept last prompt tokens")
    args = parser.parse_args()
    model, tokenizer = load_default_model(dtype=DTYPES[args.dtype], device=args.device)
    lines = [f"# Question tokens kept by the default ({args.length}-token single-needle prompts, question-aware)\n",
             *(f"- {k}: {v}" for k, v in environment(args.device).items()),
             (f"- command: python benchmarks/question_kept.py --length {args.length} --cases {args.cases} --seed "
              f"{args.seed} --windows {' '.join(map(str, args.windows))} --budgets {' '.join(map(str, args.budgets))}"),
             ("\nShare of (layer, KV head) pairs that keep a question token outside the always-kept `window`, "
              "averaged over those tokens (— : the whole question is inside the window).\n"),
             "| case | prompt | question tokens | " + " | ".join(f"window {w}, {b:g} kept" for w in args.windows
                                                     for b in args.budgets) + " |",
             "|---" * (3 + len(args.windows) * len(args.budgets)) + "|"]
    for index in range(args.cases):
        case = make_case(tokenizer, "single_needle", args.length, index, args.seed)
        ids = case.context_ids + case.questions[0].question_ids
        full, _ = scored_prefill(model, torch.tensor([ids]), EntropyKVConfig(), policies=["cache_topk"])
        cells = []
        for window in args.windows:
            for budget in args.budgets:
                small, _ = compressed_copy(full, EntropyKVConfig(budget=budget, window=window))
                share = kept_share(small, len(case.context_ids), len(ids) - window)
                cells.append("—" if share is None else f"{100 * share:.1f}%")
        lines.append(f"| {index} | {len(ids)} | {len(case.questions[0].question_ids)} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "question_kept.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
