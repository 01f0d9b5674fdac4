"""`entropykv-fx demo`: a planted fact in a long public-domain prompt, answered with a full and compressed caches.

For each setting it prints the answer, the prefill time, the decode time per token, the KV bytes held after
prefill and the per-layer budgets, and writes a PNG of per-layer entropy and budget.
"""

from __future__ import annotations

import platform
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import LogitsProcessor, LogitsProcessorList

from . import __version__, optimize, report
from .compress import CompressionReport
from .config import EntropyKVConfig
from .errors import InputError
from .models import DEFAULT_MODEL, load_default_model, text
from .scorers import SCORERS, repeat_prompt_ids

FACT = 'The secret passphrase for the vault is "silver heron".'
QUESTION = "What is the secret passphrase for the vault?"
ANSWER_KEY = "silver heron"


def needle_prompt(tokenizer, n_tokens: int, depth: float, source: str = "emma", offset: int = 0,
                  fact: str = FACT, question: str = QUESTION) -> dict[str, torch.Tensor]:
    """Chat-formatted inputs: `n_tokens` of a committed text with `fact` planted at `depth` (0..1), then `question`."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    ids = tokenizer(text(source))["input_ids"]
    if offset + n_tokens > len(ids):
        raise ValueError(f"the {source!r} text has {len(ids)} tokens; asked for {n_tokens} from offset {offset}")
    window = ids[offset:offset + n_tokens]
    cut = int(n_tokens * depth)
    context = f"{tokenizer.decode(window[:cut])} {fact} {tokenizer.decode(window[cut:])}"
    messages = [{"role": "user", "content": f"{context}\n\n{question}"}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


class _StepClock(LogitsProcessor):
    """Records when generate() asks for each next token: the first call comes right after prefill."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


@dataclass
class Run:
    label: str
    answer: str
    prefill_s: float
    decode_ms_per_token: float
    report: CompressionReport


def timed_generate(model, tokenizer, inputs: dict, label: str, max_new_tokens: int) -> Run:
    clock = _StepClock()
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([clock]), pad_token_id=tokenizer.eos_token_id)
    end = time.perf_counter()
    new = out[0, inputs["input_ids"].shape[1]:]
    decode_steps = max(len(clock.times) - 1, 1)
    decode_ms = 1000 * (end - clock.times[0]) / decode_steps
    return Run(label, tokenizer.decode(new, skip_special_tokens=True).strip(), clock.times[0] - start,
               decode_ms, report(model))


def plot(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_e, ax_b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    scored = [r for r in runs if r.report.layers and r.report.layers[0].entropy == r.report.layers[0].entropy]
    if scored:
        layers = [lr.layer for lr in scored[0].report.layers]
        ax_e.plot(layers, [lr.entropy for lr in scored[0].report.layers], marker="o")
    ax_e.set_ylabel("mean head entropy (nats)")
    ax_e.set_title("Attention entropy and KV budget per layer")
    for r in runs:
        ax_b.plot([lr.layer for lr in r.report.layers], [lr.slots_after for lr in r.report.layers], marker=".", label=r.label)
    ax_b.set_xlabel("layer")
    ax_b.set_yscale("log")  # the compressed runs keep 10-25% of the full cache: a linear axis flattens them
    ax_b.set_ylabel("tokens kept (log scale)")
    ax_b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(prompt_tokens: int = 2000, budgets: tuple[float, ...] = (0.25, 0.1), policy: str | None = None,
             depth: float = 0.5, max_new_tokens: int = 16, out_dir: str | Path = ".",
             scorer: str | None = None) -> list[Run]:
    """The demo (`entropykv-fx demo`); its arguments are checked before the model loads (ConfigError for a policy,
    scorer or budget, InputError for depth or out_dir). policy / scorer None: the library's default composition
    (`EntropyKVConfig`). A scorer="reconstruct" asked for by name repeats the prompt after KVzip's instruction
    (`scorers.repeat_prompt_ids`); the default repeats it bare, as `optimize(model)` does."""
    chosen = EntropyKVConfig(**({"policy": policy} if policy is not None else {}), scorer=scorer)
    for b in budgets:
        chosen.replace(budget=b)
    if not 0.0 <= depth <= 1.0:
        raise InputError(f"demo: depth={depth!r} is invalid: expected a number in [0, 1]")
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise InputError(f"demo: out_dir={str(out_dir)!r} is a file; expected a folder for the plot")
    model, tokenizer = load_default_model()
    inputs = needle_prompt(tokenizer, prompt_tokens, depth)
    n = inputs["input_ids"].shape[1]
    print(f"entropykv_fx {__version__} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"{platform.processor() or platform.machine()} CPU threads={torch.get_num_threads()}")
    print(f"model {DEFAULT_MODEL} | prompt {n} tokens with a planted fact at depth {depth:.0%} | "
          f"question: {QUESTION!r} | expected: {ANSWER_KEY!r}\n")
    runs = []
    method = f"{chosen.policy}/{chosen.scorer}"
    compressed = {"policy": chosen.policy, "scorer": chosen.scorer}
    if scorer is not None and SCORERS[scorer].reconstruct:
        compressed["repeat_prompt"] = repeat_prompt_ids(tokenizer)
    plan = [("full cache", {"policy": "full", "scorer": "window"}),
            *((f"{method} {b:.0%}" if b <= 1 else f"{method} {b}", {**compressed, "budget": b}) for b in budgets)]
    # One progress line per setting on stderr: the first warm-up compiles (about a minute on 2 CPU cores).
    for i, (label, settings) in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {label}: warm-up (compiles on first use), then timed generation", file=sys.stderr,
              flush=True)
        optimize(model, **settings)
        _warm_up(model, tokenizer, inputs)
        runs.append(timed_generate(model, tokenizer, inputs, label, max_new_tokens))
    _print_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(runs, out / "entropykv_demo.png")
    print(f"\nplot of per-layer entropy and budgets: {out / 'entropykv_demo.png'}")
    return runs


def _warm_up(model, tokenizer, inputs: dict) -> None:
    """optimize() compiles its graphs on first use: static shapes first, dynamic ones at a second length (prefill
    and decode). Two short generations pay that here, so the table times steady-state prefill and decode."""
    with warnings.catch_warnings():  # budgets below the always-kept tokens on these short prompts: expected
        warnings.simplefilter("ignore")
        for n in (64, 48):
            timed_generate(model, tokenizer, {k: v[:, -n:] for k, v in inputs.items()}, "warm-up", 3)


def _print_table(runs: list[Run]) -> None:
    width = max(len("setting"), *(len(r.label) for r in runs))
    print(f"{'setting':<{width}} {'found':<6} {'prefill':>8} {'decode/tok':>11} {'KV bytes':>12} {'kept':>6}  answer")
    for r in runs:
        found = "yes" if ANSWER_KEY in r.answer.lower() else "no"
        print(f"{r.label:<{width}} {found:<6} {r.prefill_s:>7.2f}s {r.decode_ms_per_token:>9.1f}ms "
              f"{r.report.bytes_after:>12,} {r.report.kept_fraction:>6.1%}  {r.answer!r}")
    print("\nper-layer budgets (tokens kept):")
    for r in runs:
        print(f"  {r.label:<{width}} {[lr.slots_after for lr in r.report.layers]}")
