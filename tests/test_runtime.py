"""The runtime (issue 16): rows never depend on their batch, every call works or is refused up front, a long-lived
model keeps working on a bounded set of graphs, optimize() is reversible."""

from __future__ import annotations

import gc
import re
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import ARCHS, DEVICE, left_padded, random_prompt, tiny_model
from transformers import DynamicCache

import entropykv_fx
from entropykv_fx import compat
from entropykv_fx.hf import UnsupportedCallError

pytestmark = pytest.mark.filterwarnings("ignore:entropykv. budget")
ROOT = Path(__file__).resolve().parents[1]


def greedy(model, ids, n=10, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


def kept_positions(report_or_cache) -> list[list[int]]:
    return [sorted(p for p in layer.positions[0].tolist() if p >= 0) for layer in report_or_cache.layers]


# ----------------------------------------------------------------------------------- 1. rows vs their batch
@pytest.mark.compat
def test_issue_instance_a_padded_row_keeps_and_generates_what_it_does_alone():
    """The reported case: pyramidkv, budget 20 tokens, prompts of 40 and 27 tokens in one left-padded batch."""
    model = entropykv_fx.optimize(tiny_model("llama"), policy="pyramidkv", budget=20, window=8, sink_tokens=2)
    short = torch.randint(1, 97, (27,), generator=torch.Generator().manual_seed(11)).to(DEVICE)
    ids, mask = left_padded([random_prompt(40, seed=3)[0], short])
    batched = greedy(model, ids, attention_mask=mask)
    row = entropykv_fx.report(model).rows[1]
    assert [r.slots_after for r in row.layers] == [27, 23, 10]
    alone = greedy(model, short[None])
    assert alone[0].tolist() == [5, 89, 28, 81, 65, 55, 83, 52, 41, 28]
    assert torch.equal(batched[1], alone[0])


EVICTING = ["entropy", "pyramidkv", "uniform", "streaming", "snapkv", "adakv", "entropy_head", "matrix_entropy"]
# Every policy on one architecture; tokens-per-layer budgets for a layer-wise and a head-wise policy; on the others
# one policy each, and both kinds on mistral's sliding-window layers. (Each case compiles four graphs: a full cross
# product would cost CI minutes for no kind of fault this one misses.)
ROW_CASES = [("qwen3", policy, 0.3) for policy in EVICTING] + [("qwen3", policy, 24) for policy in ("uniform", "adakv")] \
    + [("llama", "entropy", 0.3), ("qwen2", "adakv", 0.3), ("mistral", "entropy", 0.3), ("mistral", "adakv", 0.3)]


@pytest.mark.parametrize("arch, policy, budget", ROW_CASES)
def test_every_row_equals_its_single_run(arch, policy, budget):
    """Kept positions, budgets and greedy tokens of each row of a left-padded batch equal that prompt's own run,
    for every evicting policy and both budget kinds (fraction of the row's own length, tokens per layer)."""
    model = entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=budget, window=6, sink_tokens=2)
    prompts = [random_prompt(n, seed=n)[0] for n in (70, 41, 56)]
    ids, mask = left_padded(prompts)
    with torch.no_grad():
        cache = compat.cache_of(model(ids, attention_mask=mask, use_cache=True))
    rows = entropykv_fx.report(model).rows
    batched = greedy(model, ids, attention_mask=mask, n=6)
    for b, prompt in enumerate(prompts):
        with torch.no_grad():
            alone = compat.cache_of(model(prompt[None], use_cache=True))
        single = entropykv_fx.report(model)
        assert [(r.budget, r.slots_after, r.bytes_after) for r in rows[b].layers] == \
               [(r.budget, r.slots_after, r.bytes_after) for r in single.layers]
        for layer, own in zip(cache.layers, alone.layers):
            if hasattr(own, "heads"):
                for head, own_head in zip(layer.heads, own.heads):
                    assert sorted(p for p in head.positions[b].tolist() if p >= 0) == own_head.positions[0].tolist()
            else:
                assert sorted(p for p in layer.positions[b].tolist() if p >= 0) == own.positions[0].tolist()
        assert torch.equal(batched[b], greedy(model, prompt[None], n=6)[0]), f"row {b}"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(12, 60), min_size=1, max_size=4),
       policy=st.sampled_from(["full", "entropy", "uniform", "pyramidkv", "streaming", "snapkv", "adakv"]),
       budget=st.one_of(st.floats(0.15, 1.0), st.integers(10, 40)), seed=st.integers(0, 10_000))
def test_property_rows_of_random_batches_equal_their_single_runs(lengths, policy, budget, seed):
    model = _property_model()
    entropykv_fx.optimize(model, policy=policy, budget=budget, window=4, sink_tokens=2)
    prompts = [random_prompt(n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    ids, mask = left_padded(prompts)
    batched = greedy(model, ids, attention_mask=mask, n=4)
    rows = entropykv_fx.report(model).rows or (entropykv_fx.report(model),)
    for b, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], n=4)
        assert torch.equal(batched[b], alone[0])
        if policy != "full":
            single = entropykv_fx.report(model)
            assert [r.slots_after for r in rows[b].layers] == [r.slots_after for r in single.layers]
    if policy == "full":
        assert torch.equal(batched, greedy(_unmodified(), ids, attention_mask=mask, n=4))


_MODELS: dict[str, torch.nn.Module] = {}


def _property_model():
    if "opt" not in _MODELS:
        _MODELS["opt"] = entropykv_fx.optimize(tiny_model("qwen2"))
    return _MODELS["opt"]


def _unmodified():
    if "plain" not in _MODELS:
        _MODELS["plain"] = tiny_model("qwen2")
    return _MODELS["plain"]


# ----------------------------------------------------------------------------------- 2. a long-lived model
def _call_patterns(model, plain):
    """Distinct ways of calling a causal LM (name -> call), each returning something comparable."""
    ids, ids2 = random_prompt(30, seed=5), random_prompt(22, seed=6)
    batch, mask = left_padded([ids[0], ids2[0]])
    embeds = model.get_input_embeddings()(ids)

    def manual_loop(name):
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache = compat.cache_of(out)
            token = out.logits[:, -1:].argmax(-1)
            step = model(token, **{name: cache}, use_cache=True)
        return step.logits[:, -1]

    def ask():
        cache = entropykv_fx.reuse.compress_context(model, ids)
        return entropykv_fx.reuse.ask(model, cache, ids2[:, :5], max_new_tokens=3)

    gen = dict(max_new_tokens=3, do_sample=False)
    patterns = {
        "generate": lambda: model.generate(ids, **gen),
        "generate batch 2 + mask": lambda: model.generate(batch, attention_mask=mask, **gen),
        "generate batch 3": lambda: model.generate(random_prompt(16, batch=3, seed=7), **gen),
        "generate inputs_embeds": lambda: model.generate(inputs_embeds=embeds, **gen),
        "generate one-token prompt": lambda: model.generate(ids[:, :1], **gen),
        "generate max_new_tokens=1": lambda: model.generate(ids, max_new_tokens=1, do_sample=False),
        "generate beams": lambda: model.generate(ids, num_beams=2, **gen),
        "generate beams x2 returned": lambda: model.generate(ids, num_beams=2, num_return_sequences=2, **gen),
        "generate sampling": lambda: (torch.manual_seed(0), model.generate(ids, max_new_tokens=3, do_sample=True))[1],
        "generate top_k": lambda: (torch.manual_seed(1), model.generate(ids, max_new_tokens=3, do_sample=True,
                                                                         top_k=5))[1],
        "generate 2 samples": lambda: (torch.manual_seed(2), model.generate(ids, max_new_tokens=3, do_sample=True,
                                                                             num_return_sequences=2))[1],
        "generate repetition_penalty": lambda: model.generate(ids, repetition_penalty=1.3, **gen),
        "generate no_repeat_ngram": lambda: model.generate(ids, no_repeat_ngram_size=2, **gen),
        "generate min_new_tokens": lambda: model.generate(ids, min_new_tokens=2, eos_token_id=3, **gen),
        "generate bad_words": lambda: model.generate(ids, bad_words_ids=[[7]], **gen),
        "generate scores": lambda: model.generate(ids, return_dict_in_generate=True, output_scores=True,
                                                  **gen).scores[-1],
        "generate use_cache=False": lambda: model.generate(ids, use_cache=False, **gen),
        "generate mask of ones": lambda: model.generate(ids, attention_mask=torch.ones_like(ids), **gen),
        "forward": lambda: model(ids).logits,
        "forward logits_to_keep": lambda: model(ids, logits_to_keep=1).logits,
        "forward labels": lambda: model(ids, labels=ids).loss,
        "forward hidden states": lambda: model(ids, output_hidden_states=True).hidden_states[1],
        "forward use_cache=False": lambda: model(ids, use_cache=False).logits,
        "forward return_dict=False": lambda: model(ids, return_dict=False)[0],
        "forward batch + mask": lambda: model(batch, attention_mask=mask).logits[mask.bool()],
        "forward position_ids": lambda: model(ids, position_ids=torch.arange(30, device=DEVICE)[None]).logits,
        "forward embeds": lambda: model(inputs_embeds=embeds).logits,
        "manual loop, cache=": lambda: manual_loop(compat.CACHE_ARG),
        "manual loop, past_key_values=": lambda: manual_loop("past_key_values"),
        "reuse.ask": ask,
        "generate long prompt": lambda: model.generate(random_prompt(90, seed=8), **gen),
    }
    return patterns


@pytest.mark.compat
def test_a_long_lived_model_serves_every_call_pattern_on_a_bounded_set_of_graphs():
    """31 distinct call patterns, 217 calls on one model: every result equals the unmodified model's (policy
    'full'), the compiled graph kinds stop growing after the first round."""
    model = entropykv_fx.optimize(tiny_model("llama"), policy="full")
    plain = tiny_model("llama")
    patterns = _call_patterns(model, plain)
    reference = _call_patterns(plain, plain)
    assert len(patterns) >= 30
    with torch.no_grad():
        for name, call in patterns.items():
            torch.testing.assert_close(call(), reference[name](), msg=name)
        kinds = len(model.entropykv._compiled)
        calls = len(patterns)
        for _ in range(6):
            for name, call in patterns.items():
                call()
                calls += 1
    assert calls >= 200
    assert len(model.entropykv._compiled) == kinds <= 24


def test_memory_stays_flat_over_1000_calls():
    model = entropykv_fx.optimize(tiny_model("llama"), budget=0.5, window=8)
    ids = random_prompt(200)
    process = psutil.Process()
    with torch.no_grad():
        for _ in range(100):
            model(ids)
        gc.collect()
        start = process.memory_info().rss
        for _ in range(900):
            model(ids)
        gc.collect()
    grown = process.memory_info().rss - start
    # one leaked cache per call would be 900 x 3 layers x 200 tokens x K+V x 2 heads x 32 x 4 B = 276 MB
    assert grown < 40 * 2**20, f"RSS grew by {grown / 2**20:.1f} MiB over 900 calls"


# ----------------------------------------------------------------------------------- 3. use_cache=False
@pytest.mark.compat
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_use_cache_false_gives_the_unmodified_models_logits_and_tokens(arch):
    model, plain = entropykv_fx.optimize(tiny_model(arch), budget=0.25, window=4), tiny_model(arch)
    ids, mask = left_padded([random_prompt(40)[0], random_prompt(25, seed=2)[0]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask, use_cache=False).logits,
                                   plain(ids, attention_mask=mask, use_cache=False).logits)
    assert torch.equal(greedy(model, ids, attention_mask=mask, use_cache=False, n=5),
                       greedy(plain, ids, attention_mask=mask, use_cache=False, n=5))


# ----------------------------------------------------------------------------------- 4. StaticDecoder + DynamicCache
@pytest.mark.compat
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_static_decoder_over_a_left_padded_dynamic_cache_matches_hf_generate(arch):
    model = tiny_model(arch)
    ids, mask = left_padded([random_prompt(n, seed=n)[0] for n in (40, 27, 33)])
    expected = greedy(model, ids, attention_mask=mask, n=8)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    first = out.logits[:, -1].argmax(-1, keepdim=True)
    cache = compat.cache_of(out)
    assert isinstance(cache, DynamicCache)
    with pytest.raises(ValueError, match="attention_mask"):
        entropykv_fx.StaticDecoder(model, cache, max_new_tokens=8)
    decoder = entropykv_fx.StaticDecoder(model, cache, max_new_tokens=8, attention_mask=mask)
    tokens = decoder.generate(first, steps=7)
    assert torch.equal(torch.cat([first, tokens], 1), expected)


# ----------------------------------------------------------------------------------- 5. StaticCacheModel sequences
def test_static_cache_model_positions_restarting_at_zero_start_a_new_sequence():
    from static_models import TinyGPT

    torch.manual_seed(0)
    gpt = TinyGPT().eval()
    a, b = random_prompt(60, seed=1).cpu(), random_prompt(40, seed=2).cpu()
    fresh = entropykv_fx.StaticCacheModel(TinyGPT().eval(), policy="full")
    fresh.model.load_state_dict(gpt.state_dict())
    want = fresh(b, torch.arange(40))
    model = entropykv_fx.StaticCacheModel(gpt, policy="full")
    model(a, torch.arange(60))
    got = model(b, torch.arange(40))
    torch.testing.assert_close(got, want)
    assert model.kept_slots() == [40, 40, 40]


# ----------------------------------------------------------------------------------- 7. dropout
def test_attention_dropout_in_training_mode_is_refused_before_any_work():
    model = tiny_model("llama")
    model.config.attention_dropout = 0.1
    entropykv_fx.optimize(model)
    model.train()
    with pytest.raises(UnsupportedCallError, match=r"attention dropout \(0.1\).*model.eval\(\)"):
        model(random_prompt(20), use_cache=True)
    model.eval()
    assert model(random_prompt(20), use_cache=True).logits.shape == (1, 20, 97)


# ----------------------------------------------------------------------------------- 8. no recompile per optimize()
def test_new_budget_policy_or_prompt_length_needs_no_new_graph():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="entropy", budget=0.5, window=8)
    greedy(model, random_prompt(50), n=3)
    graphs = len(model.entropykv.graphs)
    for settings_ in (dict(budget=0.25), dict(policy="uniform"), dict(policy="pyramidkv", budget=20),
                      dict(policy="full"), dict(policy="streaming"), dict(policy="snapkv")):
        entropykv_fx.optimize(model, **settings_)
        greedy(model, random_prompt(50), n=3)
        greedy(model, random_prompt(77, seed=4), n=3)
    # snapkv's head-wise layout is a new decode graph: the only one
    assert len(model.entropykv.graphs) <= graphs + 2


# ----------------------------------------------------------------------------------- 9. public API
def test_reuse_is_reachable_from_the_package():
    out = subprocess.run([sys.executable, "-c", "import entropykv_fx; print(entropykv_fx.reuse.compress_context)"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "compress_context" in out.stdout


def test_restore_gives_back_the_unmodified_model():
    plain = tiny_model("mistral")
    ids = random_prompt(50)
    expected = greedy(plain, ids)
    model = entropykv_fx.optimize(tiny_model("mistral"), budget=0.25, window=4)
    attn = model.config._attn_implementation
    assert not torch.equal(greedy(model, ids), expected)
    assert entropykv_fx.restore(model) is model
    assert "entropykv" not in model.__dict__ and "forward" not in model.model.__dict__
    assert model.config._attn_implementation != attn
    assert torch.equal(greedy(model, ids), expected)
    with pytest.raises(entropykv_fx.NotOptimizedError, match="not prepared by entropykv_fx.optimize"):
        entropykv_fx.report(model)


def test_compressing_is_scoped():
    model = tiny_model("qwen3")
    ids = random_prompt(60)
    expected = greedy(model, ids)
    with entropykv_fx.compressing(model, policy="uniform", budget=0.25, window=4) as m:
        greedy(m, ids)
        assert entropykv_fx.report(m).kept_fraction < 0.3
    assert "entropykv" not in model.__dict__
    assert torch.equal(greedy(model, ids), expected)
    entropykv_fx.optimize(model, policy="entropy", budget=0.5)
    with entropykv_fx.compressing(model, policy="streaming", budget=0.1):
        pass
    assert model.entropykv.config.policy == "entropy" and model.entropykv.config.budget == 0.5


def test_errors_share_one_base_class_and_keep_their_types():
    from entropykv_fx import (
        ConfigError,
        EntropyKVError,
        ExportError,
        UnsupportedModelError,
    )

    assert issubclass(ConfigError, ValueError) and issubclass(UnsupportedModelError, TypeError)
    for error in (ConfigError, ExportError, UnsupportedModelError, UnsupportedCallError,
                  entropykv_fx.TransformersVersionError):
        assert issubclass(error, EntropyKVError)
    with pytest.raises(TypeError, match="config must be an EntropyKVConfig"):
        entropykv_fx.optimize(tiny_model("llama"), config="entropy")


@pytest.mark.parametrize("call, match", [
    (lambda m: m(torch.zeros(1, 0, dtype=torch.long, device=DEVICE)), "non-empty"),
    (lambda m: m(torch.ones(5, dtype=torch.long, device=DEVICE)), r"\[batch, length\]"),
    (lambda m: m(random_prompt(10), attention_mask=torch.ones(1, 4, device=DEVICE)), "attention_mask must be"),
    (lambda m: m(random_prompt(10), position_ids=torch.arange(3, device=DEVICE)[None]), "position_ids must be"),
    (lambda m: m(random_prompt(10), output_attentions=True), "output_attentions"),
])
def test_bad_calls_get_a_clear_error_before_any_work(call, match):
    model = entropykv_fx.optimize(tiny_model("llama"))
    with pytest.raises(UnsupportedCallError, match=match):
        call(model)
    assert not model.entropykv._compiled, "refused before compiling anything"


def test_a_tensor_parallel_model_is_refused_before_any_change(monkeypatch):
    """Each rank would see only its heads' statistics and keep other tokens than its peers: refused (issue 20)."""
    model = tiny_model("llama")
    monkeypatch.setattr(type(model), "tp_size", property(lambda self: 2))
    with pytest.raises(entropykv_fx.UnsupportedModelError, match=r"tensor parallelism \(2 ranks\)"):
        entropykv_fx.optimize(model)
    assert "entropykv" not in model.__dict__ and "forward" not in model.model.__dict__


def test_a_cache_of_another_batch_size_is_refused():
    model = entropykv_fx.optimize(tiny_model("llama"))
    with torch.no_grad():
        cache = compat.cache_of(model(random_prompt(20, batch=2), use_cache=True))
        with pytest.raises(UnsupportedCallError, match="batch size changed from 2 to 1"):
            model(random_prompt(1), **compat.with_cache(cache), use_cache=True)


def test_no_module_outside_the_runtime_reads_its_private_state():
    hits = subprocess.run(["grep", "-rln", "_entropykv", "entropykv_fx", "benchmarks"], capture_output=True,
                          text=True, cwd=ROOT).stdout.split()
    assert hits == [] or hits == ["entropykv_fx/hf.py"], hits
    private = re.compile(r"\.entropykv\._\w+")
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "entropykv_fx").rglob("*.py")
                 if p.name != "hf.py" and private.search(p.read_text())]
    assert offenders == []
