"""Planted-fact retrieval of every policy on SmolLM2-135M-Instruct at 50%, 25% and 10% budgets.

    python3 benchmarks/retrieval.py [--lengths 2000 4000] [--depths 0.2 0.4 0.6 0.8] [--out benchmarks/results]

Fixed cases: for each prompt length and depth, a passage of the committed *Emma* text starting at a seeded offset,
with the demo's fact planted at that depth (`demo.needle_prompt`), then the question. The answer is checked with
the model's own answer sentence forced up to the passphrase: after `The secret passphrase for the vault is "` (what
SmolLM2 answers with the full cache), a case counts as retrieved when the greedy choice at every passphrase token is
the passphrase token ('silver heron'). That is one forward over the compressed cache per case instead of a decode
loop, which keeps 150 cases within ~20 minutes on 2 CPU cores. Each prompt is prefilled once, with every statistic
any policy needs and nothing evicted; each (policy, budget) then compresses its own copy of that cache.
Writes retrieval_cpu.json and .md (device and versions included).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import time
from pathlib import Path
from unittest import mock

import torch
import transformers

import entropykv_fx
from entropykv_fx import hf
from entropykv_fx.compat import with_cache
from entropykv_fx.compress import compress_cache, uncompressed_report
from entropykv_fx.demo import ANSWER_KEY, needle_prompt
from entropykv_fx.models import DEFAULT_MODEL, load_default_model, text
from entropykv_fx.policies import POLICIES

BUDGETS = (0.5, 0.25, 0.1)
ANSWER_PREFIX = 'The secret passphrase for the vault is "'
SEED = 0


def scored_prefill(model, inputs: dict) -> tuple[entropykv_fx.EntropyKVCache, torch.Tensor]:
    """(uncompressed cache with every layer's statistics, first answer token): one prefill for all cases.

    matrix_entropy's prefill computes everything the policies read (window scores, entropies, matrix entropy);
    its compression step is replaced by one that keeps the cache whole.
    """
    captured = {}

    def keep_whole(cache, config):
        captured["cache"] = cache
        return uncompressed_report(cache, config)

    entropykv_fx.optimize(model, policy="matrix_entropy")
    with mock.patch.object(hf, "compress_cache", keep_whole), torch.no_grad():
        logits = model(**inputs, use_cache=True).logits
    return captured["cache"], logits[:, -1:].argmax(-1)


def answer_tokens(tokenizer) -> tuple[torch.Tensor, int]:
    """(answer sentence ids [1, n], index of its first passphrase token)."""
    prefix = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    full = tokenizer(ANSWER_PREFIX + ANSWER_KEY, add_special_tokens=False)["input_ids"]
    if full[:len(prefix)] != prefix:
        raise ValueError(f"the tokenizer merges {ANSWER_PREFIX!r} with the passphrase; cannot split the answer")
    return torch.tensor([full]), len(prefix)


def retrieved(model, cache, first: torch.Tensor, answer: torch.Tensor, key_start: int) -> bool:
    """Greedy check of the passphrase tokens with the answer sentence forced (one forward over the cache)."""
    if first.item() != answer[0, 0].item():  # the model would not even start its usual answer
        return False
    with torch.no_grad():
        logits = model(answer, **with_cache(cache), use_cache=True).logits
    predicted = logits[0, key_start - 1:-1].argmax(-1)  # logits at token j-1 choose token j
    return torch.equal(predicted, answer[0, key_start:])


def cases(tokenizer, lengths: list[int], depths: list[float]) -> list[dict]:
    rng = random.Random(SEED)
    n_text = len(tokenizer(text("emma"))["input_ids"])
    out = []
    for n in lengths:
        for depth in depths:
            offset = rng.randrange(0, n_text - n)
            out.append(dict(length=n, depth=depth, offset=offset,
                            inputs=needle_prompt(tokenizer, n, depth, source="emma", offset=offset)))
    return out


def run(lengths: list[int], depths: list[float], out_dir: Path) -> dict:
    model, tokenizer = load_default_model()
    answer, key_start = answer_tokens(tokenizer)
    settings = [("full", 1.0)] + [(p, b) for p in entropykv_fx.policies() if p != "full" for b in BUDGETS]
    rows = []
    start = time.perf_counter()
    for case in cases(tokenizer, lengths, depths):
        t0 = time.perf_counter()
        scored, first = scored_prefill(model, case["inputs"])
        n_prompt = case["inputs"]["input_ids"].shape[1]
        for policy, budget in settings:
            # the shared prefill scored with the window: every policy ranks by it (cache_topk too, not its own scorer)
            cfg = entropykv_fx.EntropyKVConfig(policy=policy, budget=budget, scorer="window")
            entropykv_fx.optimize(model, cfg)
            cache = copy.deepcopy(scored)
            rep = compress_cache(cache, cfg) if POLICIES[policy].evicts else uncompressed_report(cache, cfg)
            rows.append(dict(length=case["length"], prompt_tokens=n_prompt, depth=case["depth"], offset=case["offset"],
                             policy=policy, budget=budget, found=retrieved(model, cache, first, answer, key_start),
                             bytes_full=rep.bytes_before, bytes_kept=rep.bytes_after))
        print(f"{case['length']} tokens depth {case['depth']:.0%}: {len(settings)} settings in "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    result = dict(model=DEFAULT_MODEL, device=f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
                  versions=dict(entropykv_fx=entropykv_fx.__version__, torch=torch.__version__,
                                transformers=transformers.__version__, python=platform.python_version()),
                  budgets=list(BUDGETS), lengths=lengths, depths=depths, seed=SEED, answer_prefix=ANSWER_PREFIX,
                  n_prompts=len(lengths) * len(depths), n_cases=len(rows), seconds=round(time.perf_counter() - start),
                  rows=rows)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "retrieval_cpu.json").write_text(json.dumps(result, indent=1))
    (out_dir / "retrieval_cpu.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    lengths = result["lengths"]
    head = " | ".join(f"{n} found | {n} bytes kept" for n in lengths)
    lines = [f"# Planted-fact retrieval, {result['model']}",
             "",
             f"{result['device']}; entropykv_fx {result['versions']['entropykv_fx']}, torch {result['versions']['torch']}, "
             f"transformers {result['versions']['transformers']}. {result['n_prompts']} prompts "
             f"({len(result['depths'])} depths {result['depths']} x lengths {lengths}, seeded offsets in *Emma*), "
             f"{result['n_cases']} cases, {result['seconds']} s. 'found': passphrase tokens all chosen greedily after the "
             f"forced answer prefix {result['answer_prefix']!r}; "
             "'bytes kept': mean KV bytes after compression / full cache (int8 and scales counted).",
             "",
             f"| policy | budget | {head} |",
             "|---|---|" + "---|---|" * len(lengths)]
    settings = dict.fromkeys((r["policy"], r["budget"]) for r in result["rows"])
    for policy, budget in settings:
        cells = []
        for n in lengths:
            sel = [r for r in result["rows"] if (r["policy"], r["budget"], r["length"]) == (policy, budget, n)]
            found = sum(r["found"] for r in sel)
            kept = sum(r["bytes_kept"] / r["bytes_full"] for r in sel) / max(len(sel), 1)
            cells.append(f"{found}/{len(sel)} | {kept:.1%}")
        lines.append(f"| {policy} | {budget:.0%} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run(args.lengths, args.depths, args.out)


if __name__ == "__main__":
    main()
