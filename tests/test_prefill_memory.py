"""Prefill peak memory: a layer whose budget needs no other layer's statistics is compressed as soon as its attention
has run, so the prefill never holds every layer's full cache at once (`compress.budgets_before_scores`); one whose
budget waits for every layer's statistics but has a bound known as each layer runs (a ceiling, or a cache-wide top-k's
running bar) is trimmed to it (`compress.trim_before_budgets`).

The peak is measured, not inferred: each prefill runs in a process of its own, with glibc serving every block over
64 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so the resident set follows the live tensors, and its high-water mark
(VmHWM, restarted just before the prefill through /proc/self/clear_refs) is the prefill's peak. Linux only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from tiny_models import left_padded, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import EntropyKVConfig
from entropykv_fx.bench.fanout import compressed_copy, scored_prefill
from entropykv_fx.errors import BudgetFloorWarning

LAYERS, KV_HEADS, HEAD_DIM, TOKENS = 8, 4, 64, 4096
FULL_CACHE_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * TOKENS * 4  # float32 keys + values of every layer

PEAK_SCRIPT = f"""
import re, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
import entropykv_fx
config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers={LAYERS},
                     num_attention_heads={KV_HEADS}, num_key_value_heads={KV_HEADS}, head_dim={HEAD_DIM},
                     max_position_embeddings=3 * {TOKENS}, pad_token_id=0)
torch.manual_seed(0)
model = entropykv_fx.optimize(LlamaForCausalLM(config).eval(), policy=sys.argv[1], scorer=sys.argv[2], budget=0.1)
with torch.no_grad():
    for n in (256, 384):  # graphs compile (dynamic after the second length) on prompts far shorter than the measured one
        model(torch.randint(1, 97, (1, n)), use_cache=True, logits_to_keep=1)
    ids = torch.randint(1, 97, (1, {TOKENS}))
    status = lambda field: int(re.search(field + r":\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
    open("/proc/self/clear_refs", "w").write("5")  # the peak resident set (VmHWM) restarts from here
    start = status("VmRSS")
    out = model(ids, use_cache=True, logits_to_keep=1)
print(status("VmHWM") - start, out.past_key_values.nbytes)
"""


def prefill_peak(policy: str, scorer: str) -> tuple[int, int]:
    """(bytes above the resident set before a {TOKENS}-token prefill at its peak, bytes the cache keeps after it)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2", ENTROPYKV_TEST_DEVICE="cpu")
    done = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, policy, scorer], capture_output=True, text=True, env=env,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    peak, kept = (int(x) for x in done.stdout.split()[-2:])
    return peak, kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc's malloc settings")
@pytest.mark.parametrize("scorer", ["window", "reconstruct"])
def test_layers_with_budgets_or_bounds_known_during_the_prefill_never_hold_the_whole_full_cache(scorer):
    # snapkv: per-head budgets from every layer's statistics, no layer's share bounded before the end: held to the end
    late, late_kept = prefill_peak("snapkv", scorer)
    early, early_kept = prefill_peak("uniform", scorer)  # budget from the prompt length: compressed layer by layer
    trimmed, trimmed_kept = prefill_peak("entropy", scorer)  # at most 4 x 10% per layer during the prefill
    assert early_kept == late_kept == trimmed_kept < FULL_CACHE_BYTES / 5  # each keeps 10% in all
    # the late prefill holds all 8 full layers at its end; the early one at most one full layer beside the kept ones,
    # the trimmed one 40% of each layer
    assert late - early > FULL_CACHE_BYTES / 2, (early, late, FULL_CACHE_BYTES)
    assert late - trimmed > FULL_CACHE_BYTES * 0.35, (trimmed, late, FULL_CACHE_BYTES)
    if scorer == "reconstruct":  # a cache-wide top-k drops what can no longer be among the cache's best entries
        for policy, saved in (("cache_topk", 0.25), ("cache_topk_layer", 0.4)):  # measured: 0.41 and 0.62
            peak, kept = prefill_peak(policy, scorer)
            assert kept == late_kept and late - peak > FULL_CACHE_BYTES * saved, (policy, peak, late, FULL_CACHE_BYTES)


def configs(tmp_path) -> list[EntropyKVConfig]:
    """Every kind of budget known before the prefill's statistics (the length-only policies, calibrated fractions)
    and of budget ceiling (entropy's clamp), with each kind of ranking (pooled window scores, keys, reconstruction)."""
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"layer_fractions": [0.5, 0.2, 0.3]}))
    return [EntropyKVConfig(policy="uniform", budget=0.3), EntropyKVConfig(policy="pyramidkv", budget=0.3),
            EntropyKVConfig(policy="streaming", budget=0.3), EntropyKVConfig(policy="uniform", scorer="reconstruct"),
            EntropyKVConfig(policy="uniform", budget_source="calibrated", calibration_file=str(path)),
            EntropyKVConfig(policy="entropy", budget=0.1), EntropyKVConfig(policy="entropy_focus", budget=0.15),
            EntropyKVConfig(policy="entropy", budget=0.1, scorer="key_norm"),
            EntropyKVConfig(policy="entropy", budget=0.1, scorer="reconstruct")]


def test_compressing_during_the_prefill_keeps_what_compressing_after_it_keeps(tmp_path):
    """The in-prefill path (optimize) against the after-prefill one (compressed_copy of an uncompressed prefill):
    the same slots, payloads and report."""
    model = tiny_model("llama")
    ids = random_prompt(400)
    for config in configs(tmp_path):
        full, _ = scored_prefill(model, ids, config)
        expected, expected_report = compressed_copy(full, config)
        entropykv_fx.optimize(model, config)
        with torch.no_grad():
            cache = model(ids, use_cache=True).past_key_values
        report = entropykv_fx.report(model)
        assert report == expected_report, config
        assert report.kept_fraction < 0.6 and report.bytes_before == full.nbytes
        for got, want in zip(cache.layers, expected.layers):
            assert torch.equal(got.positions, want.positions)
            assert torch.equal(got.keys, want.keys) and torch.equal(got.values, want.values)
            assert got.stats is None


def test_each_row_of_a_batch_compressed_during_the_prefill_keeps_what_it_keeps_alone(tmp_path):
    model = tiny_model("llama")
    prompts = [random_prompt(n, seed=n)[0] for n in (200, 150, 240)]
    ids, mask = left_padded(prompts)
    for config in configs(tmp_path):
        entropykv_fx.optimize(model, config)
        with torch.no_grad():
            batch = model(ids, attention_mask=mask, use_cache=True).past_key_values
            report = entropykv_fx.report(model)
            for b, prompt in enumerate(prompts):
                alone = model(prompt[None], use_cache=True).past_key_values
                for got, want in zip(report.rows[b].layers, entropykv_fx.report(model).layers):  # entropy: float sums
                    assert got.entropy == pytest.approx(want.entropy, rel=1e-4, nan_ok=True)
                    assert dataclasses.replace(got, entropy=0.0) == dataclasses.replace(want, entropy=0.0), (config, b)
                for got, want in zip(batch.layers, alone.layers):
                    row = got.row(b)
                    assert torch.equal(row.positions, want.positions)
                    torch.testing.assert_close(row.keys, want.keys)  # a batched matmul's rounding, not other slots
                    torch.testing.assert_close(row.values, want.values)


def test_a_prefill_with_gradients_on_leaves_no_autograd_graph_in_the_cache(tmp_path):
    """Selection is a decision, not part of any gradient: whether a layer is compressed during the prefill or after
    it, its kept keys and values carry no autograd history (which would keep every layer's activations alive)."""
    model = tiny_model("llama")
    for config in configs(tmp_path):
        entropykv_fx.optimize(model, config)
        cache = model(random_prompt(400), use_cache=True).past_key_values  # gradients on: no torch.no_grad()
        assert entropykv_fx.report(model).kept_fraction < 0.6
        assert not any(t.requires_grad for layer in cache.layers for t in (layer.keys, layer.values)), config


def test_a_budget_floor_is_reported_once_per_prefill(tmp_path):
    path = tmp_path / "small.json"
    path.write_text(json.dumps({"layer_fractions": [0.05, 0.05, 0.05]}))
    model = tiny_model("llama")
    for config in (EntropyKVConfig(policy="uniform", budget=0.05), EntropyKVConfig(policy="entropy", budget=0.05),
                   EntropyKVConfig(policy="uniform", budget_source="calibrated", calibration_file=str(path))):
        entropykv_fx.optimize(model, config)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model(random_prompt(200), use_cache=True)
        assert sum(issubclass(w.category, BudgetFloorWarning) for w in caught) == 1, (config, caught)


def layer_tensors(layer) -> list[torch.Tensor]:
    """Every tensor a compressed layer holds: dense (positions, keys, values) or each KV head's of a head-wise one."""
    parts = layer.heads if hasattr(layer, "heads") else [layer]
    return [t for part in parts for t in (part.positions, part.keys, part.values)]


@pytest.mark.parametrize("policy, budget, head_share", [("cache_topk", 0.1, 0.0), ("cache_topk", 0.3, 0.0),
                                                        ("cache_topk_layer", 0.1, 0.0), ("cache_topk", 0.1, 1.0),
                                                        ("cache_topk", 0.3, 0.5)])
def test_a_cache_wide_top_k_drops_during_the_prefill_only_what_it_would_never_keep(policy, budget, head_share,
                                                                                  monkeypatch):
    """KVzip's allocation (reconstruction scores, one top-k over the whole cache): each layer is trimmed as soon as
    it has run to the tokens that can still be among the cache's best entries (`compress.CacheTopKBound`), and the
    cache then keeps exactly the slots, payloads and report that compressing an untrimmed prefill keeps. With a
    `head_share` too: a token the bar drops is below every head's kept tokens by their own and shared scores."""
    from entropykv_fx import hf
    from entropykv_fx.compress import trim_layer_now

    trimmed = []

    def trim(layer, most, config):
        trimmed.append(before := trim_layer_now(layer, most, config))
        return before

    monkeypatch.setattr(hf, "trim_layer_now", trim)
    model = tiny_model("llama")
    ids = random_prompt(400)
    config = EntropyKVConfig(policy=policy, scorer="reconstruct", budget=budget, head_share=head_share)
    full, _ = scored_prefill(model, ids, config)
    expected, expected_report = compressed_copy(full, config)
    entropykv_fx.optimize(model, config)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    held = [before for before in trimmed if before is not None]
    assert len(trimmed) == 3 and held, trimmed  # every layer offered, at least one trimmed
    assert entropykv_fx.report(model) == expected_report
    for got, want in zip(cache.layers, expected.layers):
        assert all(torch.equal(a, b) for a, b in zip(layer_tensors(got), layer_tensors(want), strict=True))
