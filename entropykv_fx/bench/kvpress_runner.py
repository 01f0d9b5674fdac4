"""NVIDIA kvpress on the quality benchmark's cases. Runs as a script inside the kvpress venv (benchmarks/kvpress_env.sh).

    /tmp/kvpress-venv/bin/python entropykv_fx/bench/kvpress_runner.py --cases cases_cpu.json \
        --model-dir ~/.cache/entropykv_fx/SmolLM2-135M-Instruct --out kvpress_cpu.json
    /tmp/kvpress-venv/bin/python entropykv_fx/bench/kvpress_runner.py --forced sweep_T.targets.jsonl \
        --model-dir ... --out kvpress_T.json      # policy_sweep.py's teacher-forced answer match, same targets

It imports nothing from entropykv_fx (kvpress 0.5.5 needs transformers < 5.3, entropykv_fx >= 5.17): it reads the
token ids that `bench quality` (or `policy_sweep.py --save-targets`) wrote and writes raw generated token ids and
NLLs, which `bench quality` scores, or teacher-forced answer matches, which `policy_sweep.py --merge` tabulates.

One prefill serves every press and budget. kvpress compresses a layer's cache in a forward hook that runs after
that layer's attention, so later layers and the logits never see the compression; each press's own
`forward_hook` is therefore called here on a private copy of each layer's full cache. `--check-fanout` verifies
on a short prompt that this gives exactly the caches of the documented `with press(model): model(...)` path.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from kvpress import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    KVzipPress,
    PyramidKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.utils import logging as hf_logging

# kvpress's compression_ratio is the fraction of the cache REMOVED: kept 0.25 <-> compression_ratio 0.75.
# These compress in a forward hook after each layer's attention, so one shared prefill serves them all (fan-out).
HOOK_PRESSES = {
    "snapkv": lambda ratio: SnapKVPress(compression_ratio=ratio),
    "pyramidkv": lambda ratio: PyramidKVPress(compression_ratio=ratio),
    "streamingllm": lambda ratio: StreamingLLMPress(compression_ratio=ratio),
    "adakv_snapkv": lambda ratio: AdaKVPress(SnapKVPress(compression_ratio=ratio)),
    "expected_attention": lambda ratio: ExpectedAttentionPress(compression_ratio=ratio),
    "knorm": lambda ratio: KnormPress(compression_ratio=ratio),
    "tova": lambda ratio: TOVAPress(compression_ratio=ratio),
}
# KVzip scores by reconstructing the context in forwards of its own after the prefill (arXiv 2505.23416), with
# its cache-wide top-k (layerwise=False, kvpress's default) applied as masks: it runs its own `with press(model)`.
OWN_PREFILL_PRESSES = {"kvzip": lambda ratio: KVzipPress(compression_ratio=ratio)}
PRESSES = {**HOOK_PRESSES, **OWN_PREFILL_PRESSES}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Compressed:
    """One press's cache after the shared prefill, with AdaKV's per-layer masked key indices."""

    def __init__(self) -> None:
        self.cache = DynamicCache()
        self.masks: dict[int, tuple | None] = {}

    def kept_fraction(self, n_tokens: int) -> float:
        slots = sum(layer.keys.shape[1] * layer.keys.shape[2] for layer in self.cache.layers)
        masked = sum(len(m[0]) for m in self.masks.values() if m is not None)
        total = sum(layer.keys.shape[1] for layer in self.cache.layers) * n_tokens
        return (slots - masked) / total


def attention_modules(model):
    return [layer.self_attn for layer in model.model.layers]


@torch.no_grad()
def fanout_prefill(model, input_ids: torch.Tensor, presses: dict) -> tuple[dict[str, Compressed], torch.Tensor]:
    """(compressed cache per press name, logits of the last position) from one uncompressed prefill."""
    results = {name: Compressed() for name in presses}
    for press in presses.values():
        press.post_init_from_model(model)
    for module in attention_modules(model):
        module.rotary_emb = model.model.rotary_emb  # some presses read it there; `press(model)` sets it the same way

    def compress_copies(module, args, kwargs, output):
        full = kwargs["past_key_values"].layers[module.layer_idx]
        for name, press in presses.items():
            own = results[name]
            own.cache.update(full.keys, full.values, module.layer_idx)  # a private copy of this layer, uncompressed
            press.forward_hook(module, args, {**kwargs, "past_key_values": own.cache}, output)
            own.masks[module.layer_idx] = getattr(module, "masked_key_indices", None)
            module.masked_key_indices = None
        return output

    hooks = [m.register_forward_hook(compress_copies, with_kwargs=True) for m in attention_modules(model)]
    try:
        out = model(input_ids=input_ids, past_key_values=DynamicCache(), logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return results, out.logits[0, -1]


@torch.no_grad()
def own_prefill(model, input_ids: torch.Tensor, press) -> Compressed:
    """The cache (and masks) of `with press(model): model(input_ids)`, for presses that cannot share a prefill."""
    own = Compressed()
    with press(model):
        model(input_ids=input_ids, past_key_values=own.cache, logits_to_keep=1)
    own.masks = {m.layer_idx: getattr(m, "masked_key_indices", None) for m in attention_modules(model)}
    use_masks(model, None)
    return own


def hook_presses(presses: dict) -> dict:
    """The presses that compress in a forward hook (all but OWN_PREFILL_PRESSES'), which one prefill can serve."""
    return {name: press for name, press in presses.items() if not isinstance(press, KVzipPress)}


def compressed_caches(model, input_ids: torch.Tensor, presses: dict) -> tuple[dict[str, Compressed], torch.Tensor]:
    """(compressed cache per press name, plus the uncompressed one as '_full'; logits of the last position)."""
    hooked = hook_presses(presses)
    results, logits = fanout_prefill(model, input_ids, {"_full": _NoPress(), **hooked})
    for name, press in presses.items():
        if name not in hooked:
            results[name] = own_prefill(model, input_ids, press)
    return results, logits


def use_masks(model, compressed: Compressed | None) -> None:
    """Install (or clear) AdaKV's masked key indices, which kvpress's attention patch reads while decoding."""
    for module in attention_modules(model):
        module.masked_key_indices = compressed.masks.get(module.layer_idx) if compressed else None


@torch.no_grad()
def forward_at(model, cache, ids: list[int], start: int):
    """Logits [len(ids), vocab] of `ids` fed after `cache` at logical positions start.. (the cache may physically
    hold fewer slots).

    When layers hold different numbers of tokens (PyramidKV), transformers 5.2 sizes a multi-token forward's causal
    mask by layer 0, which fails on the others; one token at a time needs no mask, so the ids go in one by one.
    """
    device = model.device
    if len({layer.keys.shape[-2] for layer in cache.layers}) > 1 and len(ids) > 1:
        return torch.cat([forward_at(model, cache, [token], start + i) for i, token in enumerate(ids)])
    positions = torch.arange(start, start + len(ids), device=device)[None]
    return model(input_ids=torch.tensor([ids], device=device), past_key_values=cache, position_ids=positions).logits[0]


def greedy(model, cache, logits: torch.Tensor, position: int, max_new_tokens: int, stops: set[int]) -> list[int]:
    tokens = []
    for step in range(max_new_tokens):
        token = int(logits.argmax())
        tokens.append(token)
        if token in stops or step == max_new_tokens - 1:
            return tokens
        logits = forward_at(model, cache, [token], position + step)[-1]
    return tokens


def run_case(model, case: dict, settings: list[str], presses: dict, stop_token_ids: dict) -> list[dict]:
    records = []
    stops = set(stop_token_ids["line" if case["one_line"] else "eos"])
    base = {"library": "kvpress", "task": case["task"], "length": case["length"], "case": case["index"]}
    context = case["context_ids"]

    def record(name, setting, qi, kept, **result):
        method, budget = name.split("@") if name != "none" else ("none", "1.0")
        records.append({**base, "method": method, "budget": float(budget), "setting": setting, "question": qi,
                        "kept_fraction": kept, **result})

    def variants(results):  # the uncompressed reference ('none') and every press
        return [("none", results.pop("_full"), None)] + [(name, c, c) for name, c in results.items()]

    if "question_aware" in settings and case["task"] != "perplexity":
        for qi, q in enumerate(case["questions"]):
            prompt = context + q["question_ids"]
            results, logits = compressed_caches(model, torch.tensor([prompt], device=model.device), presses)
            for name, own, masked in variants(results):
                use_masks(model, masked)
                kept = masked.kept_fraction(len(prompt)) if masked else 1.0  # before decoding appends to the cache
                tokens = greedy(model, own.cache, logits, len(prompt), case["max_new_tokens"], stops)
                record(name, "question_aware", qi, kept, tokens=tokens)
    if "query_agnostic" in settings:
        results, _ = compressed_caches(model, torch.tensor([context], device=model.device), presses)
        for name, own, masked in variants(results):
            use_masks(model, masked)
            kept = masked.kept_fraction(len(context)) if masked else 1.0
            for qi, q in enumerate(case["questions"]):
                cache = copy.deepcopy(own.cache)
                if case["task"] == "perplexity":
                    ids = q["continuation_ids"]
                    logits = forward_at(model, cache, ids, len(context))
                    nll = float(F.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:], device=logits.device)))
                    record(name, "query_agnostic", qi, kept, nll=nll)
                else:
                    logits = forward_at(model, cache, q["question_ids"], len(context))[-1]
                    tokens = greedy(model, cache, logits, len(context) + len(q["question_ids"]),
                                    case["max_new_tokens"], stops)
                    record(name, "query_agnostic", qi, kept, tokens=tokens)
    use_masks(model, None)
    return records


def forced_entry(model, entry: dict, presses: dict) -> tuple[list[dict], bool]:
    """Teacher-forced answer match of every press on one `policy_sweep.py --save-targets` entry.

    (records, whether kvpress's own full cache reproduces the target): a press scores 1 when, fed the target after
    the prompt (and `feed`, the question, in the query-agnostic setting), its argmax at every position is the
    target's next token, i.e. greedy decoding would give the full cache's answer (the expected answer's tokens
    where entropykv_fx's full cache answered wrong, `full_correct` false). A "perplexity" entry's target is a
    text continuation: each press records its mean NLL (nats per token, the first token excluded) instead.
    """
    prompt, feed, target = entry["prompt_ids"], entry["feed"], entry["target"]
    results, logits = compressed_caches(model, torch.tensor([prompt], device=model.device), presses)
    base = {k: entry[k] for k in ("task", "length", "case", "split", "setting")}
    records, full_match = [], False
    for name, own in [("none", results.pop("_full"))] + list(results.items()):
        use_masks(model, None if name == "none" else own)
        kept = 1.0 if name == "none" else own.kept_fraction(len(prompt))
        method, budget = ("kvpress full", 1.0) if name == "none" else (f"kvpress {name.split('@')[0]}",
                                                                       float(name.split("@")[1]))
        if entry["setting"] == "perplexity":  # the target is a text continuation: its mean NLL, as policy_sweep
            continuation = forward_at(model, own.cache, target, len(prompt))
            nll = float(F.cross_entropy(continuation[:-1].float(), torch.tensor(target[1:], device=model.device)))
            records.append({**base, "method": method, "budget": budget, "kept": kept, "nll": nll})
            continue
        ids = feed + target[:-1]
        predicted = [] if feed else [int(logits.argmax())]
        if ids:
            predicted += forward_at(model, own.cache, ids, len(prompt))[len(feed) - 1 if feed else 0:].argmax(-1).tolist()
        correct = predicted[:len(target)] == target
        if name == "none":  # kvpress's own full cache, scored like ours (the tables' `kvpress full` row)
            full_match = correct
        records.append({**base, "method": method, "budget": budget, "kept": kept, "correct": correct})
    use_masks(model, None)
    return records, full_match


def run_forced(model, paths: list[str], presses: dict, shard: tuple[int, int], out: str, meta: dict,
               time_limit: float) -> None:
    """Every entry of the targets files (every N-th from the K-th), re-writing `out` after each one; no entry is
    started after `time_limit` seconds."""
    entries = [json.loads(line) for path in paths for line in Path(path).read_text().splitlines() if line.strip()]
    entries = entries[shard[0]::shard[1]]
    start, records, matches = time.perf_counter(), [], []
    for i, entry in enumerate(entries):
        if time.perf_counter() - start > time_limit:
            print(f"kvpress forced: time limit, stopping after {i} entries", flush=True)
            break
        got, full_match = forced_entry(model, entry, presses)
        records += got
        if entry["full_correct"] and entry["setting"] != "perplexity":  # the target is our full cache's answer:
            # does kvpress's give it too?
            matches.append(full_match)
        Path(out).write_text(json.dumps({
            **meta, "cases_done": i + 1, "cases_total": len(entries), "seconds": time.perf_counter() - start,
            "full_cache_reproduces_target": sum(matches) / max(len(matches), 1), "full_correct": len(matches),
            "records": records}))
        print(f"kvpress forced: {i + 1}/{len(entries)} {time.perf_counter() - start:.0f}s", flush=True)


class _NoPress:
    """Stands in for a press in the fan-out and keeps the layer whole: the full-cache reference."""

    def post_init_from_model(self, model) -> None:
        pass

    def forward_hook(self, module, args, kwargs, output):
        return output


@torch.no_grad()
def check_fanout(model, input_ids: torch.Tensor, presses: dict) -> dict[str, bool]:
    """For each hook press: does the fan-out give exactly the cache (and AdaKV masks) of `with press(model)`?"""
    presses = hook_presses(presses)
    results, _ = fanout_prefill(model, input_ids, presses)
    same = {}
    for name, press in presses.items():
        cache = DynamicCache()
        with press(model):
            model(input_ids=input_ids, past_key_values=cache, logits_to_keep=1)
        masks = {m.layer_idx: getattr(m, "masked_key_indices", None) for m in attention_modules(model)}
        mine = results[name]
        same[name] = all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
                         for a, b in zip(cache.layers, mine.cache.layers)) and all(
            (masks[i] is None) == (mine.masks[i] is None) and
            (masks[i] is None or all(torch.equal(x, y) for x, y in zip(masks[i], mine.masks[i]))) for i in masks)
        use_masks(model, None)
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--cases", help="cases JSON written by `entropykv-fx bench quality`")
    source.add_argument("--forced", nargs="+", metavar="TARGETS_JSONL",
                        help="targets written by `policy_sweep.py --save-targets`: teacher-forced answer match")
    parser.add_argument("--shard", default="0/1", help="with --forced, K/N: every N-th entry from the K-th")
    parser.add_argument("--time-limit", type=float, default=math.inf,
                        help="with --forced, seconds: start no entry after it")
    parser.add_argument("--model-dir", required=True, help="the model as safetensors (entropykv_fx's cache copy)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1], help="kept fractions")
    parser.add_argument("--presses", nargs="+", default=list(PRESSES), choices=PRESSES)
    parser.add_argument("--settings", nargs="+", default=["question_aware", "query_agnostic"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=DTYPES)
    parser.add_argument("--check-fanout", type=int, default=256, metavar="TOKENS",
                        help="prompt length of the fan-out self-check (0: skip)")
    args = parser.parse_args()
    if any(not 0 < b < 1 for b in args.budgets):
        parser.error(f"budgets are kept fractions in (0, 1), got {args.budgets}")
    shard, shards = (int(x) for x in args.shard.split("/"))
    if not 0 <= shard < shards:
        parser.error(f"--shard {args.shard}: expected K/N with 0 <= K < N")

    hf_logging.disable_progress_bar()  # one weight-loading bar per tensor would drown the progress lines
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=DTYPES[args.dtype], attn_implementation="sdpa")
    model = model.to(args.device).eval()
    presses = {f"{name}@{budget}": PRESSES[name](round(1.0 - budget, 6)) for name in args.presses for budget in args.budgets}
    meta = {"kvpress": version("kvpress"), "torch": torch.__version__, "transformers": version("transformers"),
            "python": platform.python_version(), "device": args.device, "dtype": args.dtype,
            "command": " ".join(sys.argv)}
    if args.forced:
        run_forced(model, args.forced, presses, (shard, shards), args.out, {"kvpress_environment": meta},
                   args.time_limit)
        return
    data = json.loads(Path(args.cases).read_text())
    if args.check_fanout:
        ids = torch.tensor([data["cases"][0]["context_ids"][:args.check_fanout]], device=model.device)
        meta["fanout_check"] = check_fanout(model, ids, presses)
        print("fan-out self-check (identical to `with press(model)`):", meta["fanout_check"], flush=True)
    start = time.perf_counter()
    records = []
    for i, case in enumerate(data["cases"]):
        records += run_case(model, case, args.settings, presses, data["stop_token_ids"])
        print(f"kvpress: case {i + 1}/{len(data['cases'])} done, {time.perf_counter() - start:.0f}s", flush=True)
    meta["kvpress_seconds"] = round(time.perf_counter() - start, 1)
    Path(args.out).write_text(json.dumps({**meta, "records": records}))


if __name__ == "__main__":
    main()
