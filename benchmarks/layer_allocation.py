"""Where KVzip's cache-wide top-k puts each layer's budget, beside the layer's window attention entropy.

    python benchmarks/layer_allocation.py --length 2048 --seed 9 --budgets 0.25 0.1 --out benchmarks/results

One single-needle context (`entropykv_fx.bench.cases`, SmolLM2-135M-Instruct), scored once with the `reconstruct`
scorer; for each budget, the fraction of its tokens each layer keeps under `cache_topk_layer` (one top-k over every
layer's reconstruction scores), and each layer's mean head entropy over the observation window (nats; at most
log n). Writes `layer_allocation.md` to --out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from entropykv_fx.bench.cases import make_case
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.bench.quality import DTYPES, environment
from entropykv_fx.config import EntropyKVConfig
from entropykv_fx.models import load_default_model


def diagnostic_parser(description: str, seed: int) -> argparse.ArgumentParser:
    """The options of the single-model diagnostics of the default's allocation (this one, question_kept.py)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--length", type=int, default=2048, help="prompt tokens")
    parser.add_argument("--seed", type=int, default=seed, help="case seed")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1], help="kept fractions")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--out", default="benchmarks/results")
    return parser


def main() -> None:
    args = diagnostic_parser(__doc__.split("\n")[0], seed=9).parse_args()
    model, tokenizer = load_default_model(dtype=DTYPES[args.dtype], device=args.device)
    case = make_case(tokenizer, "single_needle", args.length, 0, args.seed)
    full, _ = scored_prefill(model, torch.tensor([case.context_ids]), EntropyKVConfig(scorer="reconstruct"),
                             policies=["cache_topk_layer"])
    entropy = [float(layer.stats.entropy.mean()) for layer in full.layers]
    kept = {}
    for budget in args.budgets:
        _, report = compressed_copy(full, EntropyKVConfig(policy="cache_topk_layer", budget=budget))
        kept[budget] = [layer.slots_after / layer.slots_before for layer in report.layers]
    lines = ["# Layer budgets of `cache_topk_layer` (reconstruct scores) beside window attention entropy\n",
             *(f"- {k}: {v}" for k, v in environment(args.device).items()),
             (f"- case: single_needle, {len(case.context_ids)} context tokens (log n = "
              f"{math.log(len(case.context_ids)):.2f} nats), seed {args.seed}, {args.dtype}\n"),
             "| layer | window entropy (nats) | " + " | ".join(f"kept at {b:g}" for b in args.budgets) + " |",
             "|---" * (2 + len(args.budgets)) + "|"]
    for i, h in enumerate(entropy):
        lines.append(f"| {i} | {h:.2f} | " + " | ".join(f"{100 * kept[b][i]:.0f}%" for b in args.budgets) + " |")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "layer_allocation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
