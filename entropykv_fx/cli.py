"""Command line: `entropykv-fx demo | calibrate | export | run | bench quality`.

Bad input (an option argparse refuses, or any EntropyKVError, FileNotFoundError or missing optional package) is one
line on stderr and exit status 2; any other failure is one line (its type and message) and exit status 1, with the
traceback only under `--debug` or ENTROPYKV_FX_DEBUG=1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

from .errors import EntropyKVError, InputError  # needs no torch: --help stays instant

RUNNABLE_FORMATS = ("tensorrt", "onnx", "aoti", "pt2")  # in the order `run` picks one when a directory holds several


def _budget(value: str) -> float | int:
    """A kept fraction in (0, 1] or a token count > 1 written as an integer (e.g. 512): never truncated; "1" is the
    whole prompt, as before."""
    try:
        return int(value) if int(value) > 1 else _fraction(value)
    except ValueError:
        return _fraction(value)


def _fraction(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 < number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a budget: expected a fraction in (0, 1] or a token "
                                         "count > 1 written as an integer")
    return number


def _positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not an int >= 1")
    return number


def _unit_float(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number in [0, 1]")
    return number


def _export_default_model(fmt: str, calibration: str, out: str, prompt_length: int, max_new_tokens: int) -> Path:
    """`entropykv-fx export`: SmolLM2 optimized with the calibration's budgets and policy, exported to `out`."""
    if not Path(calibration).is_file():
        raise FileNotFoundError(f"calibration file {calibration} not found; write one with "
                                f"`entropykv-fx calibrate --out {calibration}`")
    import entropykv_fx

    from .config import Calibration, EntropyKVConfig
    from .exported import prepare_export_dir
    from .models import DEFAULT_MODEL_SHAPE, load_default_model

    # Everything is checked before the model loads: the calibration, its settings, the output directory.
    record = Calibration.read(calibration)
    # The budgets were measured with this policy, window and sink count: export with the same.
    settings = {k: getattr(record, k) for k in ("policy", "window", "sink_tokens") if getattr(record, k) is not None}
    config = EntropyKVConfig(budget_source="calibrated", calibration_file=calibration, **settings)
    record.check_shape(DEFAULT_MODEL_SHAPE)  # `entropykv-fx export` exports the default model
    prepare_export_dir(out, [])
    model, _ = load_default_model()
    model = entropykv_fx.optimize(model, config)
    if fmt == "onnx":
        from .exporters.onnx import export_onnx

        return export_onnx(model, out, prompt_length=prompt_length, max_new_tokens=max_new_tokens)
    if fmt == "tensorrt":  # without TensorRT: an error naming the checked ONNX files it still writes
        from .exporters.tensorrt import export_tensorrt

        return export_tensorrt(model, out, prompt_length=prompt_length, max_new_tokens=max_new_tokens)
    return entropykv_fx.export(model, out, prompt_length=prompt_length, max_new_tokens=max_new_tokens)


def _run_exported(directory: str, prompt: str, fmt: str | None, max_new_tokens: int | None,
                  trust_code: bool = False) -> str:
    """`entropykv-fx run`: greedy continuation of `prompt` with the programs exported to `directory`."""
    from .exported import CODE_FORMATS, check_new_tokens, read_layout
    from .models import DEFAULT_MODEL, DEFAULT_VOCAB_SIZE

    layout = read_layout(directory)
    available = [f for f in RUNNABLE_FORMATS if layout.programs.get(f)]
    allowed = [f for f in available if trust_code or f not in CODE_FORMATS]
    if fmt is not None and fmt not in available:
        raise InputError(f"--format {fmt}: {directory} holds no {fmt} programs; it holds: {available}")
    if fmt is None and not allowed:
        raise InputError(f"{directory} holds only {available} programs, which can run code when loaded; pass "
                         "--trust-code if you made this directory or trust who did")
    if max_new_tokens is not None:
        check_new_tokens("run --max-new-tokens", max_new_tokens, layout)
    # `run` tokenizes with the default model's tokenizer: an export of another model would get wrong token ids.
    if layout.tokenizer not in (None, DEFAULT_MODEL) or layout.vocab_size != DEFAULT_VOCAB_SIZE:
        raise InputError(f"{directory} was exported from {layout.tokenizer or layout.model or 'another model'} "
                         f"(vocabulary of {layout.vocab_size}); `entropykv-fx run` tokenizes with {DEFAULT_MODEL}'s "
                         f"tokenizer (vocabulary of {DEFAULT_VOCAB_SIZE}); run it from Python with its own tokenizer "
                         "(entropykv_fx.exported.ExportedGenerator or exporters.onnx.OrtGenerator)")
    fmt = fmt or allowed[0]
    if fmt == "onnx":
        from .exporters.onnx import OrtGenerator

        generator = OrtGenerator(directory)
    elif fmt == "tensorrt":
        from .exporters.tensorrt import TrtGenerator

        generator = TrtGenerator(directory, trust_code=trust_code)
    else:
        from .exported import ExportedGenerator

        generator = ExportedGenerator(directory, kind=fmt, trust_code=trust_code)
    from .models import load_default_model

    _, tokenizer = load_default_model()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    tokens = generator.generate(ids, max_new_tokens or generator.layout.max_new_tokens)
    return tokenizer.decode(tokens[0].tolist(), skip_special_tokens=True)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default unless it is required, has none, or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.required or action.default in (None, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    """The CLI's options, each with its unit and default (building it imports no torch: `--help` is instant)."""
    from .bench.arguments import add_arguments

    fmt = _HelpFormatter
    parser = argparse.ArgumentParser(prog="entropykv-fx", description="Entropy-guided KV-cache compression.",
                                     formatter_class=fmt)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an unexpected error (also: ENTROPYKV_FX_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", formatter_class=fmt,
                          help="answer a planted fact from a long prompt with full and compressed caches",
                          description="Plant a fact in a long Jane Austen passage, ask for it with the full cache and "
                                      "with compressed ones, print answers, times and KV bytes, and plot the budgets.")
    demo.add_argument("--prompt-tokens", type=_positive_int, default=2000, help="length of the text around the fact (tokens)")
    demo.add_argument("--budgets", type=_budget, nargs="+", default=[0.25, 0.1],
                      help="kept fraction of the prompt in (0, 1], or tokens per layer as an integer > 1; one run each")
    demo.add_argument("--policy", default=None,
                      help="compression policy (default: the library's, cache_topk): cache_topk, cache_topk_layer, "
                           "uniform, entropy, pyramidkv, streaming, snapkv, adakv, entropy_head or matrix_entropy "
                           "(entropykv_fx.policies() describes them)")
    demo.add_argument("--scorer", default=None,
                      help="how tokens are ranked inside each budget (default: the policy's own): window, last_query, "
                           "key_norm or reconstruct (entropykv_fx.scorers; a reconstruct named here repeats the prompt "
                           "after KVzip's instruction)")
    demo.add_argument("--depth", type=_unit_float, default=0.5, help="where the fact sits in the text (0..1)")
    demo.add_argument("--out", default="entropykv_demo", help="folder for the PNG plot")

    cal = sub.add_parser("calibrate", formatter_class=fmt,
                         help="static per-layer budgets from sample texts, saved as JSON")
    cal.add_argument("--texts", nargs="*", default=[], help="plain-text files (none: the committed Austen texts)")
    cal.add_argument("--prompt-tokens", type=_positive_int, default=2000, help="tokens per calibration sample")
    cal.add_argument("--budget", type=_budget, default=0.25,
                     help="kept fraction of the prompt in (0, 1], or tokens per layer as an integer > 1")
    cal.add_argument("--policy", default="entropy", help="policy whose budgets are measured")
    cal.add_argument("--out", required=True, help="where to write the calibration JSON")

    exp = sub.add_parser("export", formatter_class=fmt,
                         help="export SmolLM2 with calibrated budgets to ONNX, TensorRT or AOTInductor programs")
    exp.add_argument("--format", choices=("onnx", "tensorrt", "aoti"), required=True,
                     help="onnx: prefill.onnx + decode.onnx for ONNX Runtime; tensorrt: that pair checked for "
                          "TensorRT's parser, then engines (needs TensorRT); aoti: torch.export programs and their "
                          "AOTInductor packages")
    exp.add_argument("--calibration", required=True, help="calibration JSON from `entropykv-fx calibrate`")
    exp.add_argument("--out", required=True, help="folder for the programs and layout.json")
    exp.add_argument("--prompt-length", type=_positive_int, required=True,
                     help="static prompt length (tokens; shorter prompts are left-padded)")
    exp.add_argument("--max-new-tokens", type=_positive_int, required=True, help="tokens the decode program can append")

    run = sub.add_parser("run", formatter_class=fmt,
                         help="greedy generation with programs written by `entropykv-fx export`")
    run.add_argument("directory", help="folder written by `entropykv-fx export`")
    run.add_argument("--prompt", required=True, help="text to continue")
    run.add_argument("--format", choices=RUNNABLE_FORMATS, help="which exported programs to run (default: the "
                                                                "first held, in this order)")
    run.add_argument("--max-new-tokens", type=_positive_int,
                     help="tokens to generate, 1 to the exported maximum (default: the exported maximum)")
    run.add_argument("--trust-code", action="store_true",
                     help="allow programs that run code when loaded (pt2, aoti, tensorrt); without it only ONNX runs")

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="benchmark", required=True)
    add_arguments(bench.add_parser("quality", formatter_class=fmt,
                                   help="long-context accuracy of every policy and budget (+ kvpress)"))
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The library's progress lines (export phases, new compiled graphs): one line each on stderr.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    library = logging.getLogger("entropykv_fx")
    library.addHandler(handler)
    library.setLevel(logging.INFO)
    try:
        if args.command == "bench":
            from .bench.quality import run_and_report

            return run_and_report(args)
        if args.command == "demo":
            from .demo import run_demo

            run_demo(args.prompt_tokens, tuple(args.budgets), args.policy, args.depth, out_dir=args.out,
                     scorer=args.scorer)
        elif args.command == "export":
            path = _export_default_model(args.format, args.calibration, args.out, args.prompt_length,
                                         args.max_new_tokens)
            print(f"{args.format} programs and {path.name} written to {path.parent}")
        elif args.command == "run":
            print(_run_exported(args.directory, args.prompt, args.format, args.max_new_tokens, args.trust_code))
        else:
            from .calibrate import calibrate_default_model

            path = calibrate_default_model(args.texts, args.out, args.prompt_tokens, policy=args.policy, budget=args.budget)
            print(f"calibration written to {path}")
    except (EntropyKVError, FileNotFoundError, ModuleNotFoundError) as err:
        print(f"entropykv-fx {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # anything else: one line, the traceback on request
        if args.debug or os.environ.get("ENTROPYKV_FX_DEBUG") == "1":
            raise
        print(f"entropykv-fx {args.command}: unexpected error: {type(err).__name__}: {_one_line(err)} (re-run with "
              "--debug or ENTROPYKV_FX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    return 0


def _one_line(err: BaseException, limit: int = 500) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
