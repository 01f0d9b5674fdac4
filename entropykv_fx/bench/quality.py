"""`entropykv-fx bench quality` (also `python benchmarks/quality.py`): accuracy of compressed caches on long contexts.

For every generated case (see `cases.py`), every policy of `entropykv_fx.policies()` and every budget, in two
settings:

- question-aware: context + question are prefilled (and compressed) together, then the answer is generated;
- query-agnostic: the context alone is prefilled and compressed, then each question is asked of a copy of that
  cache (`entropykv_fx.reuse.ask`); the perplexity task scores a text continuation after the compressed prefix.

With `--kvpress-python` the same cases (token ids in `cases.json`) also go through NVIDIA kvpress's presses in
their own virtual environment (`benchmarks/kvpress_env.sh`, runner `kvpress_runner.py`), and both are scored
here by the same code. Outputs in --out: `quality_<tag>.json` (every generation), `.md` (summary) and `.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..compat import with_cache
from .arguments import DTYPE_NAMES, add_arguments
from .cases import QA_TASKS, Case, make_cases, stop_token_ids
from .fanout import compressed_copy, prefill_of, scored_prefill
from .report import write_outputs
from .scoring import answer_recall, rouge_l

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
RUNNER = Path(__file__).with_name("kvpress_runner.py")
# The full grid (>= 50 cases per task and length) on a GPU; kvpress venv from benchmarks/kvpress_env.sh.
FULL_GRID_COMMAND = ("python benchmarks/quality.py --cases 50 --lengths 2048 4096 8192 --budgets 0.5 0.25 0.1 "
                     "--device cuda --dtype bfloat16 --tag gpu --kvpress-python /tmp/kvpress-venv/bin/python")


def continuation_nll(model, cache, continuation_ids: torch.Tensor) -> float:
    """Mean negative log-likelihood (nats) of continuation_ids[1:] fed after `cache` (which it extends)."""
    return continuation_nlls(model, cache, continuation_ids, rows=1)[0]


def continuation_nlls(model, cache, continuation_ids: torch.Tensor, rows: int) -> list[float]:
    """`continuation_nll` of each of the `rows` rows of `cache` (e.g. `fanout.stacked`), one forward for all."""
    ids = continuation_ids.to(model.device).expand(rows, -1)
    with torch.no_grad():
        logits = model(input_ids=ids, **with_cache(cache), use_cache=True).logits
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none").mean(-1).tolist()


def run_policies(model, cases: list[Case], policies: list[str], budgets: list[float], settings: list[str],
                  stops: dict[str, list[int]]) -> list[dict]:
    """Generations / NLLs of every (policy, budget) plus the full cache, one shared prefill per prompt and scorer."""
    from ..config import EntropyKVConfig
    from ..reuse import ask, continue_greedy

    grid = [("full", 1.0)] + [(p, b) for p in policies for b in budgets]
    ids = lambda tokens: torch.tensor([tokens])  # noqa: E731
    records = []

    def record(case, setting, method, budget, question, report, **result):
        records.append(dict(library="entropykv_fx", method=method, budget=budget, setting=setting, task=case.task,
                            length=case.length, case=case.index, question=question,
                            kept_fraction=report.kept_fraction, **result))

    # one prefill per way of scoring (each policy ranks with its own scorer), shared by its policies and budgets
    by_prefill: dict[tuple, list] = {}
    for method, budget in grid:
        config = EntropyKVConfig(policy=method, budget=budget)
        by_prefill.setdefault(prefill_of(config), []).append((method, budget, config))

    def compressed(prompt):
        for group in by_prefill.values():
            full, logits = scored_prefill(model, ids(prompt), group[0][2], policies=[g[2].policy for g in group])
            for method, budget, config in group:
                yield method, budget, logits, *compressed_copy(full, config)

    for case in tqdm(cases, desc="entropykv_fx", unit="case"):
        stop = stops["line" if case.one_line else "eos"]
        if "question_aware" in settings and case.task in QA_TASKS:
            for qi, q in enumerate(case.questions):
                for method, budget, logits, cache, report in compressed(case.context_ids + q.question_ids):
                    tokens = continue_greedy(model, cache, logits, case.max_new_tokens, stop)
                    record(case, "question_aware", method, budget, qi, report, tokens=tokens.tolist())
        if "query_agnostic" in settings:
            for method, budget, _, cache, report in compressed(case.context_ids):
                for qi, q in enumerate(case.questions):
                    if case.task == "perplexity":
                        nll = continuation_nll(model, cache, ids(q.continuation_ids))
                        record(case, "query_agnostic", method, budget, qi, report, nll=nll)
                    else:
                        tokens = ask(model, cache, ids(q.question_ids), case.max_new_tokens, stop)
                        record(case, "query_agnostic", method, budget, qi, report, tokens=tokens.tolist())
    return records


def start_kvpress(args, cases_file: Path, model_dir: Path, out_dir: Path) -> tuple[subprocess.Popen, Path]:
    """Launch the kvpress runner in its venv; it runs alongside the entropykv_fx loop (on a CPU, half the threads each)."""
    out_file = out_dir / f"kvpress_{args.tag}.json"
    command = [args.kvpress_python, str(RUNNER), "--cases", str(cases_file), "--model-dir", str(model_dir),
               "--out", str(out_file), "--budgets", *map(str, args.budgets), "--settings", *args.settings,
               "--presses", *args.kvpress_presses, "--device", args.device, "--dtype", args.dtype]
    env = dict(os.environ)
    if args.device == "cpu":
        theirs = max(1, torch.get_num_threads() // 2)
        env["OMP_NUM_THREADS"] = str(theirs)
        torch.set_num_threads(max(1, torch.get_num_threads() - theirs))
    print("running kvpress alongside:", shlex.join(command), file=sys.stderr)
    return subprocess.Popen(command, env=env), out_file


def finish_kvpress(process: subprocess.Popen, out_file: Path) -> dict:
    if process.wait() != 0:
        raise subprocess.CalledProcessError(process.returncode, process.args)
    return json.loads(out_file.read_text())


def score(records: list[dict], cases: list[Case], tokenizer) -> None:
    """Add the decoded output, the answer recall and ROUGE-L agreement with the same library's full cache."""
    by_key = {(c.task, c.length, c.index): c for c in cases}
    for r in records:
        if "tokens" in r:
            r["output"] = tokenizer.decode(r["tokens"], skip_special_tokens=True).strip()
            question = by_key[r["task"], r["length"], r["case"]].questions[r["question"]]
            r["score"] = answer_recall(r["output"], question.answers)
    reference = {(r["library"], r["setting"], r["task"], r["length"], r["case"], r["question"]): r
                 for r in records if r["method"] in ("full", "none")}
    for r in records:
        ref = reference.get((r["library"], r["setting"], r["task"], r["length"], r["case"], r["question"]))
        if ref is not None and "output" in r:
            r["rouge_l_vs_full"] = rouge_l(r["output"], ref["output"])
        elif ref is not None and "nll" in r:
            r["nll_increase"] = r["nll"] - ref["nll"]


def environment(device: str) -> dict:
    import transformers

    from .. import __version__

    # $ENTROPYKV_COMMIT: set by a caller that knows better than git here (a copy of the tree whose .git lags)
    commit = os.environ.get("ENTROPYKV_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False, cwd=Path(__file__).parent).stdout.strip() \
        or "unknown"
    dirty = not os.environ.get("ENTROPYKV_COMMIT") and bool(subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, check=False,
        cwd=Path(__file__).parent).stdout.strip())
    name = torch.cuda.get_device_name() if device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"
    return {"device": name, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "entropykv_fx": __version__,
            "git_commit": commit + ("+uncommitted changes" if dirty else ""),
            "command": shlex.join(["entropykv-fx", "bench", "quality", *sys.argv[1:]]) if Path(sys.argv[0]).name == "entropykv-fx"
            else shlex.join(["python", *sys.argv])}


def run(args: argparse.Namespace) -> Path:
    from ..models import DEFAULT_MODEL, cache_dir, load_default_model
    from ..policies import POLICIES

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.policies is None:
        args.policies = list(POLICIES)
    unknown = sorted(set(args.policies) - set(POLICIES))
    if unknown:
        raise ValueError(f"unknown policies {unknown}; available: {sorted(POLICIES)}")
    if args.cases < 1:
        raise ValueError(f"--cases must be >= 1, got {args.cases}")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_default_model(dtype=DTYPES[args.dtype], device=args.device)
    cases = make_cases(tokenizer, args.tasks, args.lengths, args.cases, args.seed)
    stops = stop_token_ids(tokenizer)
    cases_file = out_dir / f"cases_{args.tag}.json"
    cases_file.write_text(json.dumps({"model": DEFAULT_MODEL, "stop_token_ids": stops,
                                      "cases": [c.to_json() for c in cases]}))
    policies = [p for p in args.policies if p != "full"]
    kvpress = start_kvpress(args, cases_file, cache_dir(), out_dir) if args.kvpress_python else None
    start = time.perf_counter()
    try:
        records = run_policies(model, cases, policies, args.budgets, args.settings, stops)
    except BaseException:
        if kvpress:
            kvpress[0].kill()
        raise
    meta = {"environment": environment(args.device), "model": DEFAULT_MODEL, "dtype": args.dtype,
            "seed": args.seed, "cases_per_task_and_length": args.cases, "lengths": args.lengths,
            "budgets": args.budgets, "tasks": args.tasks, "settings": args.settings, "full_grid_command": FULL_GRID_COMMAND,
            "prompt_tokens": {f"{c.task}/{c.length}/{c.index}": c.prompt_tokens for c in cases},
            "entropykv_seconds": round(time.perf_counter() - start, 1)}
    del model
    if kvpress:
        kv = finish_kvpress(*kvpress)
        records += kv["records"]
        meta["kvpress"] = {k: v for k, v in kv.items() if k != "records"}
    score(records, cases, tokenizer)
    return write_outputs(records, meta, out_dir / f"quality_{args.tag}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/quality.py", description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run_and_report(parser.parse_args(argv))


def run_and_report(args: argparse.Namespace) -> int:
    """Run the benchmark; errors in the settings or the environment exit with status 2 and one message."""
    try:
        path = run(args)
    except (ValueError, FileNotFoundError, ModuleNotFoundError, subprocess.CalledProcessError) as err:
        print(f"bench quality: error: {err}", file=sys.stderr)
        return 2
    print(f"summary: {path}")
    return 0
