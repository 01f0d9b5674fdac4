"""Needle retrieval and perplexity under every policy x scorer x budget, fast enough for hundreds of questions per
cell on a GPU.

    python benchmarks/policy_sweep.py --cases 50 --device cuda --dtype bfloat16 --out DIR

Cases are `entropykv_fx.bench.cases` from the committed Austen texts: by default `single_needle`, `multi_key_last`
(one to three distractor needles before the asked one) and `perplexity` (the mean NLL of 128 tokens of the text
that follows a compressed context, tabulated as ΔNLL against the full cache, and the ROUGE-L of 32 greedy tokens
against the full cache's greedy continuation, --continuation-tokens), at 2k, 4k and 8k tokens. A case with an even index belongs to the *select* split (for choosing settings), an odd one to the
*report* split (for the tables). Each question is prefilled once per scorer (`bench.fanout.scored_prefill`) and
every (policy, budget) compresses a copy of that cache, physically (`compress_cache`).

Scoring is **greedy answer match, teacher-forced**: the full cache's greedy answer (its tokens up to the last
character of the expected value) is the target, and a compressed cache scores 1 when, fed the target's tokens
after the prompt, its argmax at every position is the target's next token, i.e. when greedy decoding would
reproduce the answer. One forward instead of one per generated token, and one for many methods: the compressed
copies of a prompt's cache are stacked into one left-aligned batch (`fanout.stacked`, at most --batch-rows rows),
which on a GPU replaces thousands of small kernel launches and host syncs per case by a few. When the full cache answers
wrong, the target is the expected value's own tokens (and the full cache scores 0). Question-aware: context +
question are compressed together; query-agnostic: the context alone is compressed, then the question is fed.

Writes `sweep_<tag>.json` (every record) and `sweep_<tag>.md` (device, versions, commit, command, Wilson 95%
intervals, report split) to --out, and re-writes both after every case, so a run cut short keeps its results;
at the end, `sweep_<tag>.png` plots the report split (accuracy with its intervals and ΔNLL against the kept
fraction).
The model is small, so one GPU serves several processes: `--shard K/N` runs every N-th case from the K-th (tag
`<tag>_K`), and `--merge A.json B.json ... --tag T` writes the tables of their records together.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

from entropykv_fx.bench.cases import make_case
from entropykv_fx.bench.fanout import compressed_copy, layer_kinds, prefill_config, prefill_of, scored_prefill, stacked
from entropykv_fx.bench.quality import DTYPES, continuation_nll, continuation_nlls, environment
from entropykv_fx.bench.scoring import answer_recall, rouge_l
from entropykv_fx.compat import with_cache
from entropykv_fx.config import EntropyKVConfig
from entropykv_fx.models import load_default_model
from entropykv_fx.reuse import continue_greedy
from entropykv_fx.scorers import REPEAT_INSTRUCTION, repeat_prompt_ids

# name -> EntropyKVConfig fields besides the budget; "full" is always run
VARIANTS = {
    "uniform/window": dict(policy="uniform"),
    "uniform/window/nopool": dict(policy="uniform", pooling="none"),
    "uniform/last_query": dict(policy="uniform", scorer="last_query"),
    "uniform/key_norm": dict(policy="uniform", scorer="key_norm"),
    "entropy/window": dict(policy="entropy"),
    "entropy/last_query": dict(policy="entropy", scorer="last_query"),
    "pyramidkv/window": dict(policy="pyramidkv"),
    "pyramidkv/last_query": dict(policy="pyramidkv", scorer="last_query"),
    "snapkv/window": dict(policy="snapkv"),
    "snapkv/last_query": dict(policy="snapkv", scorer="last_query"),
    "adakv/window": dict(policy="adakv"),
    "adakv/last_query": dict(policy="adakv", scorer="last_query"),
    "matrix_entropy/window": dict(policy="matrix_entropy"),
    "matrix_entropy/last_query": dict(policy="matrix_entropy", scorer="last_query"),
    "matrix_entropy/window/layer_tiers_only": dict(policy="matrix_entropy", head_groups=1),
    "matrix_entropy/window/head_tiers_only": dict(policy="matrix_entropy", layer_groups=1),
    "entropy_head/window": dict(policy="entropy_head"),
    "streaming": dict(policy="streaming"),
    "uniform/reconstruct": dict(policy="uniform", scorer="reconstruct"),
    "uniform/reconstruct/prompted": dict(policy="uniform", scorer="reconstruct", repeat_prompt=REPEAT_INSTRUCTION),
    "pyramidkv/reconstruct": dict(policy="pyramidkv", scorer="reconstruct"),
    "adakv/reconstruct/prompted": dict(policy="adakv", scorer="reconstruct", repeat_prompt=REPEAT_INSTRUCTION),
    "matrix_entropy/reconstruct/prompted": dict(policy="matrix_entropy", scorer="reconstruct", repeat_prompt=REPEAT_INSTRUCTION),
    "snapkv/reconstruct/prompted": dict(policy="snapkv", scorer="reconstruct", repeat_prompt=REPEAT_INSTRUCTION),
    "snapkv/reconstruct": dict(policy="snapkv", scorer="reconstruct"),
    "adakv/reconstruct": dict(policy="adakv", scorer="reconstruct"),
    "matrix_entropy/reconstruct": dict(policy="matrix_entropy", scorer="reconstruct"),
    "entropy/reconstruct": dict(policy="entropy", scorer="reconstruct"),
    "entropy_focus/window": dict(policy="entropy_focus"),
    "entropy_focus/reconstruct": dict(policy="entropy_focus", scorer="reconstruct"),
    "entropy_focus_per_head/reconstruct": dict(policy="entropy_focus_per_head", scorer="reconstruct"),
    "entropy_per_head/window": dict(policy="entropy_per_head"),
    "entropy_per_head/reconstruct": dict(policy="entropy_per_head", scorer="reconstruct"),
    "pyramidkv_per_head/window": dict(policy="pyramidkv_per_head"),
    "pyramidkv_per_head/reconstruct": dict(policy="pyramidkv_per_head", scorer="reconstruct"),
    "cache_topk/window": dict(policy="cache_topk", scorer="window"),
    "cache_topk/last_query": dict(policy="cache_topk", scorer="last_query"),
    "cache_topk/reconstruct": dict(policy="cache_topk", scorer="reconstruct"),
    "cache_topk/reconstruct/chunk512": dict(policy="cache_topk", scorer="reconstruct", reconstruct_chunk=512),
    "cache_topk/reconstruct/chunk2048": dict(policy="cache_topk", scorer="reconstruct", reconstruct_chunk=2048),
    "cache_topk/reconstruct/unchunked": dict(policy="cache_topk", scorer="reconstruct", reconstruct_chunk=2**20),
    "cache_topk/reconstruct/window64": dict(policy="cache_topk", scorer="reconstruct", window=64),
    "cache_topk/reconstruct/window128": dict(policy="cache_topk", scorer="reconstruct", window=128),
    "cache_topk/reconstruct/share25": dict(policy="cache_topk", scorer="reconstruct", head_share=0.25),
    "cache_topk/reconstruct/share50": dict(policy="cache_topk", scorer="reconstruct", head_share=0.5),
    "cache_topk/reconstruct/share100": dict(policy="cache_topk", scorer="reconstruct", head_share=1.0),
    "cache_topk/reconstruct/prompted": dict(policy="cache_topk", scorer="reconstruct", repeat_prompt=REPEAT_INSTRUCTION),
    "cache_topk_layer/window": dict(policy="cache_topk_layer", scorer="window"),
    "cache_topk_layer/reconstruct": dict(policy="cache_topk_layer", scorer="reconstruct"),
    "cache_topk_layer/reconstruct/prompted": dict(policy="cache_topk_layer", scorer="reconstruct",
                                                  repeat_prompt=REPEAT_INSTRUCTION),
}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson 1927, JASA 22:209)."""
    if n == 0:
        return math.nan, math.nan
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(centre - half, 0.0), min(centre + half, 1.0)  # exact bounds, without rounding's -0


def answer_target(tokenizer, generated: list[int], answers: list[str]) -> tuple[list[int], bool]:
    """(target tokens, whether the full cache answered right): its greedy tokens up to the answer, else the answer's."""
    for k in range(1, len(generated) + 1):
        if answer_recall(tokenizer.decode(generated[:k], skip_special_tokens=True), answers) == 1.0:
            return generated[:k], True
    return tokenizer(" " + answers[0], add_special_tokens=False)["input_ids"], False


@torch.no_grad()
def forced_matches(model, caches: list, first_logits: torch.Tensor | None, feed: list[int], target: list[int]
                   ) -> list[bool]:
    """For each single-row cache of one prompt: would greedy decoding after it (+ `feed`, e.g. the question)
    produce `target`? One forward for all of them (`fanout.stacked`)."""
    ids = feed + target[:-1]
    predicted = torch.empty(len(caches), 0, dtype=torch.long)
    if ids:
        batch = stacked(caches)
        tokens = torch.tensor([ids], device=model.device).expand(len(caches), -1)
        logits = model(input_ids=tokens, **with_cache(batch), use_cache=True).logits
        predicted = logits[:, len(feed) - 1 if feed else 0:].argmax(-1).cpu()
    if not feed:
        predicted = torch.cat([first_logits.argmax().cpu().expand(len(caches), 1), predicted], 1)
    return (predicted[:, :len(target)] == torch.tensor(target)).all(-1).tolist()


@torch.no_grad()
def greedy_rows(model, batch, first_logits: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy tokens [rows, steps] continuing every row of a `stacked` batch of caches of one prompt, the first token
    of each from `first_logits` [vocab] (the prompt's last position, which compression after the prefill leaves
    the same for all of them)."""
    token = first_logits.argmax().expand(batch.next_positions.shape[0]).to(model.device)
    tokens = [token]
    for _ in range(steps - 1):
        token = model(input_ids=token[:, None], **with_cache(batch), use_cache=True).logits[:, -1].argmax(-1)
        tokens.append(token)
    return torch.stack(tokens, 1).cpu()


def in_batches(compressed: list[tuple], rows: int):
    """`compressed` (name, budget, cache, report) in groups of at most `rows` whose caches can be `stacked`."""
    groups: dict[tuple, list] = {}
    for item in compressed:
        groups.setdefault(layer_kinds(item[2]), []).append(item)
    for group in groups.values():
        for start in range(0, len(group), rows):
            yield group[start:start + rows]


def variant_prefill(fields: dict) -> tuple[str, tuple[int, ...], int | None]:
    """(scorer, repeat prompt, reconstruction chunk) of a variant as its config resolves them (a policy's own scorer when none is named)."""
    return prefill_of(EntropyKVConfig(**fields))


def compressed_variants(full, variants: dict, budgets: list[float], prefill: tuple):
    """(name, budget, compressed copy of `full`, its report) for every variant scored by `prefill` and budget."""
    for name, fields in variants.items():
        if variant_prefill(fields) == prefill:
            for budget in budgets:
                yield (name, budget, *compressed_copy(full, EntropyKVConfig(budget=budget, **fields)))


@torch.no_grad()
def run_case(model, tokenizer, case, variants: dict, budgets: list[float], settings: list[str], rows: int = 32,
             greedy_tokens: int = 32) -> tuple[list[dict], list[dict]]:
    """(records, one target per setting: the prompt, what is fed after it and the full cache's answer tokens).
    `rows`: at most this many compressed caches are scored by one batched forward. `greedy_tokens`: a perplexity
    case also scores this many greedy tokens after each compressed cache by ROUGE-L against the full cache's (0:
    not)."""
    records, targets = [], []
    q = case.questions[0]
    split = "select" if case.index % 2 == 0 else "report"
    base = dict(task=case.task, length=case.length, case=case.index, split=split)
    # one prefill per (scorer, repeat prompt, chunk): what the prefill computes depends on nothing else
    prefills = sorted({variant_prefill(v) for v in variants.values()})
    policies = [EntropyKVConfig(**v).policy for v in variants.values()]
    if case.task == "perplexity":  # the continuation's mean NLL after each compressed context
        ids = torch.tensor([q.continuation_ids], device=model.device)
        for i, prefill in enumerate(prefills):
            full, logits = scored_prefill(model, torch.tensor([case.context_ids]), prefill_config(prefill),
                                          policies=policies)
            if i == 0:
                records.append(dict(base, setting="perplexity", method="full", budget=1.0, kept=1.0,
                                    nll=continuation_nll(model, copy.deepcopy(full), ids)))
                targets.append(dict(base, setting="perplexity", prompt_ids=case.context_ids, feed=[],
                                    target=q.continuation_ids, full_correct=True))
            if greedy_tokens:  # this prefill's own full cache: its rows start from the same logits
                reference = tokenizer.decode(continue_greedy(model, copy.deepcopy(full), logits, greedy_tokens).tolist(),
                                             skip_special_tokens=True)
            for group in in_batches(list(compressed_variants(full, variants, budgets, prefill)), rows):
                caches = [cache for _, _, cache, _ in group]
                nlls = continuation_nlls(model, stacked(caches), ids, len(group))
                records += [dict(base, setting="perplexity", method=name, budget=budget, kept=report.kept_fraction,
                                 nll=nll) for (name, budget, _, report), nll in zip(group, nlls)]
                if greedy_tokens:
                    texts = tokenizer.batch_decode(greedy_rows(model, stacked(caches), logits, greedy_tokens).tolist(),
                                                   skip_special_tokens=True)
                    for record, text in zip(records[-len(group):], texts):
                        record["rouge_l"] = rouge_l(text, reference)
        return records, targets
    for setting in settings:
        prompt = case.context_ids + (q.question_ids if setting == "question_aware" else [])
        feed = [] if setting == "question_aware" else q.question_ids
        target = right = None
        for prefill in prefills:
            full, logits = scored_prefill(model, torch.tensor([prompt]), prefill_config(prefill), policies=policies)
            if target is None:  # the full cache's own greedy answer is the target
                working = copy.deepcopy(full)
                if feed:
                    out = model(input_ids=torch.tensor([feed], device=model.device), **with_cache(working), use_cache=True)
                    first = out.logits[0, -1]
                else:
                    first = logits
                generated = continue_greedy(model, working, first, case.max_new_tokens).tolist()
                target, right = answer_target(tokenizer, generated, q.answers)
                records.append(dict(base, setting=setting, method="full", budget=1.0, kept=1.0, correct=right))
                targets.append(dict(base, setting=setting, prompt_ids=prompt, feed=feed, target=target, full_correct=right))
            for group in in_batches(list(compressed_variants(full, variants, budgets, prefill)), rows):
                matches = forced_matches(model, [cache for _, _, cache, _ in group], logits, feed, target)
                records += [dict(base, setting=setting, method=name, budget=budget, kept=report.kept_fraction,
                                 correct=ok) for (name, budget, _, report), ok in zip(group, matches)]
    return records, targets


FULL_CACHES = ("full", "kvpress full")  # each library's own full-cache rows, the references


def nll_deltas(rows: list[dict]) -> dict[str, dict[float, list[float]]]:
    """method -> budget -> each context's NLL minus its own library's full cache's on the same case ('full' for
    ours, 'kvpress full' for kvpress's), from perplexity records."""
    full = {(r["method"], r["task"], r["length"], r["case"]): r["nll"] for r in rows
            if r["method"] in FULL_CACHES}
    out: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        if r["method"] in FULL_CACHES:
            continue
        key = ("kvpress full" if r["method"].startswith("kvpress ") else "full", r["task"], r["length"], r["case"])
        if key in full:
            out.setdefault(r["method"], {}).setdefault(r["budget"], []).append(r["nll"] - full[key])
    return out


def accuracies(rows: list[dict]) -> dict[str, dict[float, tuple[int, int, float]]]:
    """method -> budget -> (questions answered right, questions, mean kept byte fraction) of answer records."""
    out: dict[str, dict[float, list]] = {}
    for r in rows:
        cell = out.setdefault(r["method"], {}).setdefault(r["budget"], [0, 0, 0.0])
        cell[0] += bool(r["correct"])
        cell[1] += 1
        cell[2] += r["kept"]
    return {m: {b: (right, n, kept / n) for b, (right, n, kept) in cells.items()} for m, cells in out.items()}


def budget_table(title: str, methods: list[str], budgets: list[float], cell) -> list[str]:
    """A markdown table: one row per method, one column per budget, `cell(method, budget)` in each (none without
    budgets: a split the run did not reach)."""
    if not budgets:
        return []
    return [f"\n### {title}\n", "| method | " + " | ".join(f"{b:g} kept" for b in budgets) + " |",
            "|---" * (len(budgets) + 1) + "|", *(f"| {m} | " + " | ".join(cell(m, b) for b in budgets) + " |"
                                                 for m in methods)]


def nll_table(records: list[dict], split: str) -> list[str]:
    """Mean ΔNLL (nats per token) of each method and budget against its own library's full cache on the same
    case ('full' for ours, 'kvpress full' for kvpress's), and the ROUGE-L of our compressed caches' greedy
    continuations against the full cache's."""
    rows = [r for r in records if r["setting"] == "perplexity" and r["split"] == split]
    if not rows:
        return []
    deltas = nll_deltas(rows)
    methods = sorted(deltas)
    budgets = sorted({b for by_budget in deltas.values() for b in by_budget}, reverse=True)

    def delta(m: str, b: float) -> str:
        got = deltas[m].get(b, [])
        return f"{sum(got) / len(got):.4f} n={len(got)}" if got else ""

    def rouge(m: str, b: float) -> str:
        got = [r["rouge_l"] for r in rows if r["method"] == m and r["budget"] == b and "rouge_l" in r]
        return f"{100 * sum(got) / len(got):.1f} n={len(got)}" if got else ""

    lines = budget_table(f"perplexity, {split} split (mean ΔNLL vs the same library's full cache, nats/token; "
                         "n contexts)", methods, budgets, delta)
    with_rouge = [m for m in methods if any("rouge_l" in r for r in rows if r["method"] == m)]
    if with_rouge:
        lines += budget_table(f"continuation, {split} split (mean ROUGE-L % of the greedy continuation vs the full "
                              "cache's; n contexts)", with_rouge, budgets, rouge)
    return lines


def tables(records: list[dict], split: str) -> list[str]:
    lines = nll_table(records, split)
    records = [r for r in records if r["setting"] != "perplexity"]
    for setting in sorted({r["setting"] for r in records}):
        rows = [r for r in records if r["setting"] == setting and r["split"] == split]
        methods = ["full"] + sorted({r["method"] for r in rows} - {"full"})
        whole = {m for m in methods if all(r["budget"] == 1.0 for r in rows if r["method"] == m)}  # full caches
        budgets = sorted({r["budget"] for r in rows if r["method"] not in whole}, reverse=True)

        cells = accuracies(rows)

        def accuracy(m: str, b: float, cells: dict = cells, whole: set[str] = whole) -> str:
            right, n, kept = cells.get(m, {}).get(1.0 if m in whole else b, (0, 0, 0.0))
            lo, hi = wilson(right, n)
            return f"{100 * right / max(n, 1):.1f} [{100 * lo:.0f}, {100 * hi:.0f}] n={n} ({100 * kept:.1f}% bytes)"

        lines += budget_table(f"{setting}, {split} split (accuracy %, Wilson 95% interval, n questions)", methods,
                              budgets, accuracy)
    return lines


def length_tables(records: list[dict], split: str | None) -> list[str]:
    """Accuracy % of each method at each prompt length, budgets left to right (a collapse at one length is hidden
    in the pooled tables); split None: both splits together (twice the questions per cell)."""
    lines = []
    records = [r for r in records if r["setting"] != "perplexity" and split in (None, r["split"])]
    split = f"{split} split" if split else "both splits"
    lengths = sorted({r["length"] for r in records})
    for setting in sorted({r["setting"] for r in records}):
        rows = [r for r in records if r["setting"] == setting]
        budgets = sorted({r["budget"] for r in rows if r["budget"] < 1.0}, reverse=True)
        kept = " / ".join(f"{b:g}" for b in budgets)
        lines += [f"\n### {setting} by prompt length, {split} (accuracy % at {kept} kept; n questions)\n",
                  "| method | " + " | ".join(f"{n} tokens" for n in lengths) + " |", "|---" * (len(lengths) + 1) + "|"]
        for m in ["full"] + sorted({r["method"] for r in rows} - {"full"}):
            whole = all(r["budget"] == 1.0 for r in rows if r["method"] == m)  # a full cache: one value
            cells = []
            for n in lengths:
                by_budget = [[r["correct"] for r in rows if r["method"] == m and r["length"] == n and r["budget"] == b]
                             for b in ([1.0] if whole else budgets)]
                n_asked = max(map(len, by_budget))
                cells.append(" / ".join(f"{100 * sum(got) / len(got):.0f}" if got else "–" for got in by_budget) +
                             f" n={n_asked}" if n_asked else "–")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


def write(records: list[dict], meta: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps({**meta, "records": records}))
    lines = [f"# Policy sweep: {meta['model']}, teacher-forced greedy answer match; perplexity as ΔNLL\n",
             *(f"- {k}: {v}" for k, v in meta["environment"].items()),
             (f"- cases: {meta['cases_done']} of {meta['cases_total']} (tasks {meta['tasks']}, lengths "
              f"{meta['lengths']}), {meta['seconds']:.0f} s"), *([f"- merged from the shards {', '.join(meta['shards'])}"] if "shards" in meta else []),
             *([f"- kvpress (its own environment, same targets; `kvpress ...` rows): {meta['kvpress']}"]
               if "kvpress" in meta else []),
             "\nByte fractions are measured from the compressed tensors (`report.kept_fraction`)."]
    for split in ("report", "select"):
        lines += tables(records, split)
    lines += length_tables(records, "report") + length_tables(records, None)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def plot(records: list[dict], path: Path, split: str = "report") -> None:
    """`path` (PNG): on `split`, accuracy % against the kept fraction for each answer setting, with Wilson 95%
    intervals and the full cache as a dashed line, and the mean ΔNLL of perplexity contexts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in records if r["split"] == split]
    settings = sorted({r["setting"] for r in rows} - {"perplexity"})
    deltas = nll_deltas([r for r in rows if r["setting"] == "perplexity"])
    panels = len(settings) + bool(deltas)
    if not panels:
        return
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.5), squeeze=False)
    palette = (plt.cm.tab10.colors + plt.cm.Dark2.colors) * 3
    colors = dict(zip(sorted({r["method"] for r in rows} - set(FULL_CACHES)), palette))
    for ax, setting in zip(axes[0], settings):
        cells = accuracies([r for r in rows if r["setting"] == setting])
        for m, by_budget in sorted(cells.items()):
            points = sorted((b, *c) for b, c in by_budget.items())
            if m in FULL_CACHES:  # one value each
                right, n, _ = by_budget[1.0]
                ax.axhline(100 * right / n, color="black" if m == "full" else "grey", ls="--", lw=1,
                           label=f"{m} cache (n={n})")
                continue
            xs = [b for b, *_ in points]
            ys = [100 * right / n for _, right, n, _ in points]
            bounds = [wilson(right, n) for _, right, n, _ in points]
            err = [[y - 100 * lo for y, (lo, _) in zip(ys, bounds)], [100 * hi - y for y, (_, hi) in zip(ys, bounds)]]
            ax.errorbar(xs, ys, yerr=err, fmt="-o", ms=4, capsize=3, color=colors[m], label=m)
        n_max = max(n for by_budget in cells.values() for _, n, _ in by_budget.values())
        ax.set(xscale="log", xlabel="kept fraction", ylabel="accuracy %", ylim=(-2, 102),
               title=f"{setting}, {split} split (up to {n_max} questions a point)")
    if deltas:
        ax = axes[0][-1]
        for m, by_budget in sorted(deltas.items()):
            points = sorted((b, sum(d) / len(d)) for b, d in by_budget.items())
            ax.plot(*zip(*points), "-o", ms=4, color=colors[m], label=m)
        n_max = max(len(d) for by_budget in deltas.values() for d in by_budget.values())
        ax.set(xscale="log", xlabel="kept fraction", ylabel="mean ΔNLL (nats/token)",
               title=f"perplexity, {split} split ({n_max} contexts)")
    budgets = sorted({r["budget"] for r in rows if r["budget"] < 1.0})
    for ax in axes[0]:
        ax.set_xticks(budgets, [f"{b:g}" for b in budgets])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: list[Path], stem: Path) -> int:
    """Tabulate the records of several shards' JSONs (same model, variants and budgets) as one sweep, with those of
    kvpress runs on their targets (`kvpress_runner.py --forced`)."""
    loaded = [(p, json.loads(p.read_text())) for p in paths]
    runs = [r for _, r in loaded if "kvpress_environment" not in r]
    peers = [r for _, r in loaded if "kvpress_environment" in r]
    if not runs:
        raise SystemExit("--merge needs at least one policy_sweep.py JSON (kvpress runs only add to one)")
    meta = {k: v for k, v in runs[0].items() if k != "records"}
    meta.update(cases_done=sum(r["cases_done"] for r in runs), cases_total=sum(r["cases_total"] for r in runs),
                seconds=max(r["seconds"] for r in runs), shards=[str(p.name) for p, _ in loaded])
    if peers:
        right = sum(r["full_correct"] for r in peers)  # the questions whose target is our full cache's answer
        meta["kvpress"] = dict(peers[0]["kvpress_environment"], entries_done=sum(r["cases_done"] for r in peers),
                               seconds=max(r["seconds"] for r in peers),
                               full_cache_reproduces_target=sum(r["full_cache_reproduces_target"] * r["full_correct"]
                                                                for r in peers) / max(right, 1))
    stem.parent.mkdir(parents=True, exist_ok=True)
    records = [rec for _, r in loaded for rec in r["records"]]
    write(records, meta, stem)
    plot(records, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", nargs="+", default=["single_needle", "multi_key_last", "perplexity"],
                        choices=["single_needle", "multi_key", "multi_key_last", "perplexity"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8000],
                        help="prompt lengths in tokens (SmolLM2 was trained to 8192)")
    parser.add_argument("--cases", type=int, default=20, help="cases per task and length (half select, half report)")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25, 0.1])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--settings", nargs="+", default=["question_aware", "query_agnostic"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--seed", type=int, default=1, help="case seed (the quality benchmark's default is 0)")
    parser.add_argument("--time-limit", type=float, default=540, help="seconds; stop starting new cases after it")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--shard", default="0/1", help="K/N: run cases K, K+N, K+2N, ... (0 <= K < N)")
    parser.add_argument("--merge", nargs="+", type=Path, help="sweep JSONs to tabulate together instead of running "
                        "(and kvpress_runner.py --forced outputs)")
    parser.add_argument("--batch-rows", type=int, default=32,
                        help="compressed caches scored by one batched forward (fewer: less memory)")
    parser.add_argument("--continuation-tokens", type=int, default=32,
                        help="perplexity cases: greedy tokens scored by ROUGE-L against the full cache's (0: none)")
    parser.add_argument("--save-targets", action="store_true",
                        help="also write each question's prompt, fed ids and target to <stem>.targets.jsonl, the "
                        "input of kvpress_runner.py --forced")
    args = parser.parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out) / f"sweep_{args.tag}")
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        parser.error(f"--shard {args.shard}: expected K/N with 0 <= K < N")
    if args.batch_rows < 1:
        parser.error(f"--batch-rows {args.batch_rows}: expected a positive count")
    if args.continuation_tokens < 0:
        parser.error(f"--continuation-tokens {args.continuation_tokens}: expected a count >= 0")
    start = time.perf_counter()
    model, tokenizer = load_default_model(dtype=DTYPES[args.dtype], device=args.device)
    # Interleaved, so that a cut-short run still covers every cell; each case is built when its turn comes (its
    # seed is its own), since building all of them up front took each process about a minute.
    keys = sorted((i, task, length) for task in args.tasks for length in args.lengths for i in range(args.cases))
    keys = keys[shard::shards]
    variants = {name: {k: repeat_prompt_ids(tokenizer, v) if k == "repeat_prompt" else v
                       for k, v in VARIANTS[name].items()} for name in args.variants}
    meta = dict(environment=environment(args.device), model="SmolLM2-135M-Instruct", dtype=args.dtype,
                tasks=args.tasks, lengths=args.lengths, budgets=args.budgets, variants=variants, seed=args.seed,
                cases_total=len(keys))
    stem = Path(args.out) / (f"sweep_{args.tag}" if shards == 1 else f"sweep_{args.tag}_{shard}")
    stem.parent.mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    targets_path = stem.with_suffix(".targets.jsonl")
    if args.save_targets:
        targets_path.write_text("")
    for i, (index, task, length) in enumerate(keys):
        if time.perf_counter() - start > args.time_limit:
            print(f"time limit: stopping after {i} cases", file=sys.stderr)
            break
        case = make_case(tokenizer, task, length, index, args.seed)
        got, targets = run_case(model, tokenizer, case, variants, args.budgets, args.settings, args.batch_rows,
                                args.continuation_tokens)
        records += got
        if args.save_targets:
            with targets_path.open("a") as f:
                f.writelines(json.dumps(t) + "\n" for t in targets)
        write(records, dict(meta, cases_done=i + 1, seconds=time.perf_counter() - start), stem)
        print(f"case {i + 1}/{len(keys)} {time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    plot(records, stem.with_suffix(".png"))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
