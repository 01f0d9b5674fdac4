"""optimize() on tiny random-weight models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, DEVICE, random_prompt, tiny_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

import entropykv_fx
from entropykv_fx import EntropyKVCache, UnsupportedModelError, compat

pytestmark = [pytest.mark.filterwarnings("ignore:entropykv. budget"),
              pytest.mark.compat]  # in the compatibility suite (scripts/test_transformers.sh)


def greedy(model, ids, n=12, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("full", [dict(budget=1.0), dict(policy="full")])
def test_full_budget_reproduces_unmodified_tokens(arch, full):
    ids = random_prompt(80)
    expected = greedy(tiny_model(arch), ids, n=16)
    model = entropykv_fx.optimize(tiny_model(arch), window=8, **full)
    assert torch.equal(greedy(model, ids, n=16), expected)
    rep = entropykv_fx.report(model)
    assert rep.bytes_after == rep.bytes_before


@pytest.mark.parametrize("arch", sorted(set(ARCHS) - {"mistral"}))  # window layers: test_sliding_window.py
def test_compressed_cache_holds_only_kept_bytes(arch):
    model = entropykv_fx.optimize(tiny_model(arch), policy="uniform", budget=0.5, window=8, sink_tokens=2)
    ids = random_prompt(64)
    with torch.no_grad():
        out = model(ids, use_cache=True)
    cache = out.past_key_values
    assert isinstance(cache, EntropyKVCache)
    rep = entropykv_fx.report(model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_key_value_heads * head_dim * 4  # k + v, fp32
    lengths = cache.physical_lengths()
    assert lengths == [lr.slots_after for lr in rep.layers] == [lr.budget for lr in rep.layers]
    assert sum(lengths) == 3 * 32  # the requested mean budget, layers x 0.5 x 64
    assert cache.nbytes == rep.bytes_after == sum(lengths) * per_token
    assert rep.bytes_before == 3 * 64 * per_token
    assert cache.get_seq_length() == 64  # logical length, not any layer's physical length
    for layer in cache.layers:
        pos = layer.positions[0]
        assert torch.all(pos[1:] > pos[:-1]), "kept tokens stay in temporal order"
        assert set(range(2)) <= set(pos.tolist()) and set(range(56, 64)) <= set(pos.tolist()), "sinks + window kept"


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_positions_continue_after_compression_without_position_ids(arch):
    """A manual decode loop that never passes position_ids matches one that passes the logical positions."""
    model = entropykv_fx.optimize(tiny_model(arch), budget=0.25, window=8)
    ids = random_prompt(96)
    logits = {}
    for explicit in (False, True):
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, token, steps = compat.cache_of(out), out.logits[:, -1:].argmax(-1), []
            for i in range(6):
                kw = {"position_ids": torch.tensor([[96 + i]], device=DEVICE)} if explicit else {}
                out = model(token, **compat.with_cache(cache), use_cache=True, **kw)
                steps.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
        assert cache.next_positions.tolist() == [102]
        logits[explicit] = torch.stack(steps)
    torch.testing.assert_close(logits[False], logits[True], rtol=0, atol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_left_padded_batch_matches_single_sequences(arch):
    lengths = [40, 27, 33]
    prompts = [random_prompt(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    plain = tiny_model(arch)
    expected = [greedy(plain, p[None], n=10)[0] for p in prompts]
    model = entropykv_fx.optimize(tiny_model(arch), budget=1.0, window=8)
    got = greedy(model, ids, n=10, attention_mask=mask)
    for row, exp in zip(got, expected):
        assert torch.equal(row, exp)


def test_pads_are_never_kept_when_the_budget_allows():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=20, window=8, sink_tokens=2)
    ids = random_prompt(50, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0  # row 1 has 35 real tokens
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
    for layer in out.past_key_values.layers:
        assert (layer.positions >= 0).all(), "a pad slot was kept although each row has more real tokens than the budget"
        assert layer.positions[1].max().item() == 34 and layer.positions[0].max().item() == 49


def test_right_padding_is_refused():
    model = entropykv_fx.optimize(tiny_model("llama"))
    ids = random_prompt(10, batch=2)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="right padding"):
        model(ids, attention_mask=mask)


def test_sampling_and_second_generate_start_clean():
    model = entropykv_fx.optimize(tiny_model("qwen2"), budget=0.5, window=8)
    ids = random_prompt(60)
    first = greedy(model, ids)
    assert torch.equal(greedy(model, ids), first), "a second generate() must not see the first one's cache"
    torch.manual_seed(3)
    sampled = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20)[:, 60:]
    torch.manual_seed(3)
    again = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20)[:, 60:]
    assert sampled.shape == (1, 12) and torch.equal(sampled, again)
    assert entropykv_fx.report(model).prompt_tokens == 60


def test_integer_budget_and_short_prompt():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=24, window=8, sink_tokens=4)
    with torch.no_grad():
        model(random_prompt(100), use_cache=True)
    assert sum(lr.slots_after for lr in entropykv_fx.report(model).layers) == 3 * 24
    entropykv_fx.optimize(model, budget=0.25)
    with pytest.warns(UserWarning, match="below the 12 always-kept"), torch.no_grad():
        model(random_prompt(30), use_cache=True)  # 25% of 30 < sinks + window: keeps 12 per layer
    assert [lr.slots_after for lr in entropykv_fx.report(model).layers] == [12, 12, 12]
    with torch.no_grad():
        model(random_prompt(1), use_cache=True)  # a one-token prompt keeps its token
    assert [lr.slots_after for lr in entropykv_fx.report(model).layers] == [1, 1, 1]


def test_reoptimize_changes_only_the_config():
    model = entropykv_fx.optimize(tiny_model("llama"), budget=0.5, window=8)
    assert entropykv_fx.optimize(model, budget=0.25) is model
    with torch.no_grad():
        model(random_prompt(64), use_cache=True)
    assert sum(lr.slots_after for lr in entropykv_fx.report(model).layers) == 3 * 16


def test_foreign_cache_with_tokens_is_refused():
    model = entropykv_fx.optimize(tiny_model("llama"))
    plain = tiny_model("llama")
    with torch.no_grad():
        cache = compat.cache_of(plain(random_prompt(5), use_cache=True,
                                      **compat.with_cache(DynamicCache(config=plain.config))))
        with pytest.raises(ValueError, match="EntropyKVCache"):
            model(random_prompt(1), **compat.with_cache(cache), use_cache=True)


def test_unsupported_model_lists_supported():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        entropykv_fx.optimize(gpt2)


def test_report_before_prefill_and_on_plain_model():
    with pytest.raises(ValueError, match="not prepared"):
        entropykv_fx.report(tiny_model("llama"))
    with pytest.raises(ValueError, match="no prefill"):
        entropykv_fx.report(entropykv_fx.optimize(tiny_model("llama")))


def test_bad_overrides_are_reported():
    with pytest.raises(entropykv_fx.ConfigError, match="budget"):
        entropykv_fx.optimize(tiny_model("llama"), budget=1.5)
    with pytest.raises(entropykv_fx.ConfigError, match="unknown EntropyKVConfig field"):
        entropykv_fx.optimize(tiny_model("llama"), budgett=0.5)


def test_streaming_keeps_sinks_and_the_most_recent_tokens():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="streaming", budget=20, window=8, sink_tokens=4)
    with torch.no_grad():
        out = model(random_prompt(60), use_cache=True)
    expected = list(range(4)) + list(range(44, 60))
    assert all(layer.positions[0].tolist() == expected for layer in out.past_key_values.layers)
    assert [r.budget for r in entropykv_fx.report(model).layers] == [20, 20, 20]


@pytest.mark.parametrize("policy", ["pyramidkv", "streaming", "uniform", "entropy"])
def test_every_evicting_policy_generates_within_its_bytes(policy):
    model = entropykv_fx.optimize(tiny_model("qwen3"), policy=policy, budget=0.25, window=8)
    ids = random_prompt(128)
    out = greedy(model, ids, n=6)
    rep = entropykv_fx.report(model)
    assert out.shape == (1, 6)
    assert rep.bytes_after == pytest.approx(0.25 * rep.bytes_before, rel=0.01)
