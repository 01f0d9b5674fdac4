"""Command line: `entropykv-fx demo | calibrate | bench quality`."""

from __future__ import annotations

import argparse
import sys


def _budget(value: str) -> float | int:
    number = float(value)
    return int(number) if number > 1 else number


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="entropykv-fx", description="Entropy-guided KV-cache compression.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="answer a planted fact from a long prompt with full and compressed caches")
    demo.add_argument("--prompt-tokens", type=int, default=2000, help="length of the text around the fact")
    demo.add_argument("--budgets", type=_budget, nargs="+", default=[0.25, 0.1],
                      help="kept fraction of the prompt (<= 1) or tokens per layer (> 1)")
    demo.add_argument("--policy", default="entropy")
    demo.add_argument("--depth", type=float, default=0.5, help="where the fact sits in the text (0..1)")
    demo.add_argument("--out", default="entropykv_demo", help="folder for the PNG plot")

    cal = sub.add_parser("calibrate", help="static per-layer budgets from sample texts, saved as JSON")
    cal.add_argument("--texts", nargs="*", default=[], help="plain-text files (default: the committed Austen texts)")
    cal.add_argument("--prompt-tokens", type=int, default=2000)
    cal.add_argument("--budget", type=_budget, default=0.25)
    cal.add_argument("--policy", default="entropy")
    cal.add_argument("--out", required=True, help="where to write the calibration JSON")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    from .bench.quality import add_arguments

    add_arguments(bench.add_parser("quality", help="long-context accuracy of every policy and budget (+ kvpress)"))

    args = parser.parse_args(argv)
    if args.command == "bench":
        from .bench.quality import run_and_report

        return run_and_report(args)
    try:
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.prompt_tokens, tuple(args.budgets), args.policy, args.depth, out_dir=args.out)
        else:
            from .calibrate import calibrate_default_model

            path = calibrate_default_model(args.texts, args.out, args.prompt_tokens, policy=args.policy, budget=args.budget)
            print(f"calibration written to {path}")
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"entropykv-fx {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
