"""Command-line options of the quality benchmark, kept free of torch so that `entropykv-fx --help` is instant."""

from __future__ import annotations

import argparse

TASKS = ("single_needle", "multi_key", "multi_key_last", "multi_value", "variable_tracking", "perplexity")
SETTINGS = ("question_aware", "query_agnostic")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
KVPRESS_PRESSES = ("snapkv", "pyramidkv", "streamingllm", "adakv_snapkv", "expected_attention", "knorm", "tova", "kvzip")


def kept_fraction(value: str) -> float:
    number = float(value)
    if not 0.0 < number < 1.0:
        raise argparse.ArgumentTypeError(f"budgets are kept fractions in (0, 1), got {value}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cases", type=int, default=5, help="generated cases per task and prompt length")
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096], help="prompt lengths (tokens)")
    parser.add_argument("--budgets", type=kept_fraction, nargs="+", default=[0.25, 0.1],
                        help="kept fractions of the prompt, each in (0, 1)")
    parser.add_argument("--policies", nargs="+", default=None,
                        help="entropykv_fx policies to run (default: all of entropykv_fx.policies(); 'full' always "
                             "runs as the reference)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS, help="case kinds")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=SETTINGS,
                        help="question-aware (context + question compressed together) and/or query-agnostic "
                             "(context compressed once, then asked)")
    parser.add_argument("--device", default="auto", help="torch device; auto: cuda when available, else cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPE_NAMES, help="model and cache dtype")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated cases")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")
    parser.add_argument("--tag", default="cpu", help="name part of the output files: quality_<tag>.*")
    parser.add_argument("--kvpress-python", help="python of the kvpress venv (benchmarks/kvpress_env.sh); "
                                                 "without it kvpress is not run")
    parser.add_argument("--kvpress-presses", nargs="+", default=list(KVPRESS_PRESSES), choices=KVPRESS_PRESSES,
                        help="kvpress presses to run next to entropykv_fx")
