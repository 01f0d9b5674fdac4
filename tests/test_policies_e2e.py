"""Every policy end to end: optimize() + prefill + generate() on the tiny configs, with budget and bytes accounting."""

from __future__ import annotations

import pytest
import torch
from test_headwise import held_bytes
from tiny_models import ARCHS, DEVICE, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.headwise import HeadwiseLayer
from entropykv_fx.policies import POLICIES

pytestmark = pytest.mark.filterwarnings("ignore:entropykv. budget")

N, BUDGET, SINKS, WINDOW = 96, 0.25, 2, 8
HEADWISE = sorted(name for name, p in POLICIES.items() if p.headwise)


def greedy(model, ids, n=6, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, **kw)[:, ids.shape[1]:]


def kv_token_bytes(model) -> int:
    """Bytes of one token of one KV head, K + V, in the model's dtype."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return 2 * head_dim * model.dtype.itemsize


def head_positions(layer) -> list[torch.Tensor]:
    """Row 0's kept positions of every KV head of a layer, whatever its layout."""
    if isinstance(layer, HeadwiseLayer):
        return [head.positions[0] for head in layer.heads]
    return [layer.positions[0]] * layer.keys.shape[1]


def test_every_policy_is_listed_with_a_summary():
    listed = entropykv_fx.policies()
    expected = {"entropy", "uniform", "pyramidkv", "streaming", "full", "snapkv", "adakv", "cache_topk",
                "cache_topk_layer", "entropy_head", "matrix_entropy", "entropy_per_head", "pyramidkv_per_head",
                "entropy_focus", "entropy_focus_per_head"}
    assert set(listed) == expected == set(POLICIES) and all(listed.values())
    assert set(HEADWISE) == {"snapkv", "adakv", "cache_topk", "entropy_head", "matrix_entropy", "entropy_per_head",
                             "pyramidkv_per_head", "entropy_focus_per_head"}


# Every policy on llama; on qwen2 (biased projections) and qwen3 (q/k norms, wider heads) a layer-wise and a
# head-wise one each. Mistral's window layers: test_sliding_window.py.
E2E_CASES = [("llama", policy) for policy in sorted(POLICIES)] + [
    ("qwen2", "uniform"), ("qwen2", "adakv"), ("qwen3", "entropy_head"), ("qwen3", "cache_topk")]


@pytest.mark.parametrize("arch, policy", E2E_CASES)
def test_policy_end_to_end_budget_and_bytes(arch, policy):
    model = entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=BUDGET, window=WINDOW, sink_tokens=SINKS)
    ids = random_prompt(N)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    rep = entropykv_fx.report(model)
    hkv, n_layers = model.config.num_key_value_heads, model.config.num_hidden_layers
    per_token = kv_token_bytes(model)
    assert rep.bytes_before == n_layers * hkv * N * per_token
    assert cache.nbytes == rep.bytes_after == sum(r.bytes_after for r in rep.layers)
    kept = 0
    for r, layer in zip(rep.layers, cache.layers):
        positions = head_positions(layer)
        kept += sum(len(p) for p in positions)
        for pos in positions:
            assert (pos >= 0).all() and torch.all(pos[1:] > pos[:-1]), "kept tokens in temporal order, no pads"
            if policy != "full":
                assert set(range(SINKS)) <= set(pos.tolist()), "attention sinks kept"
            assert set(range(N - WINDOW, N)) <= set(pos.tolist()), "the observation window kept"
        if isinstance(layer, HeadwiseLayer):
            assert held_bytes(layer)[0] == r.bytes_after, "the report counts exactly the storage the heads own"
            assert [h.slots for h in r.heads] == layer.head_lengths() == [h.budget for h in r.heads]
    if policy == "full":
        assert kept == n_layers * hkv * N and rep.bytes_after == rep.bytes_before
    elif policy == "entropy_head":  # the budget is a bytes fraction, met within one token per head
        assert rep.bytes_before * BUDGET - n_layers * hkv * per_token < rep.bytes_after <= rep.bytes_before * BUDGET
    else:
        assert kept == n_layers * hkv * round(BUDGET * N), "layers x heads x budget tokens, whatever the split"
        assert rep.bytes_after == kept * per_token
    out = greedy(model, ids)
    assert out.shape == (1, 6) and entropykv_fx.report(model).prompt_tokens == N


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("policy", ["snapkv", "adakv", "matrix_entropy"])
def test_headwise_full_budget_reproduces_unmodified_tokens(arch, policy):
    ids = random_prompt(80)
    expected = greedy(tiny_model(arch), ids, n=12)
    model = entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=1.0, window=WINDOW)
    assert torch.equal(greedy(model, ids, n=12), expected)
    rep = entropykv_fx.report(model)
    held = [min(80, w - 1) if w else 80 for w in model.entropykv.sliding_windows]  # a window layer: what it can see
    assert rep.bytes_after == rep.bytes_before
    assert all(h.slots == n for r, n in zip(rep.layers, held) for h in r.heads)


def test_entropy_head_at_full_rate_keeps_every_token_and_stores_middle_heads_int8():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="entropy_head", budget=1.0, window=WINDOW)
    with torch.no_grad():
        model(random_prompt(60), use_cache=True)
    heads = [h for r in entropykv_fx.report(model).layers for h in r.heads]
    assert all(h.slots == 60 for h in heads)
    assert sorted(h.storage for h in heads) == ["float32"] * 4 + ["int8"] * 2  # the middle third of six heads
    assert entropykv_fx.report(model).kept_fraction < 1.0


def test_decode_appends_to_headwise_caches_at_each_heads_storage_cost():
    model = entropykv_fx.optimize(tiny_model("qwen2"), policy="entropy_head", budget=0.5, window=WINDOW)
    ids = random_prompt(N)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    rep = entropykv_fx.report(model)
    d = model.config.hidden_size // model.config.num_attention_heads
    step_bytes = sum(2 * d * 4 if h.storage == "float32" else 2 * d + 8 for r in rep.layers for h in r.heads)
    assert out.past_key_values.nbytes == rep.bytes_after + 4 * step_bytes  # 4 decode forwards after the prefill
    for layer in out.past_key_values.layers:
        assert all(head.positions[0, -4:].tolist() == [N, N + 1, N + 2, N + 3] for head in layer.heads)


@pytest.mark.parametrize("policy", ["snapkv", "adakv"])
def test_headwise_left_padded_batch_matches_single_sequences(policy):
    lengths = [40, 27, 33]
    prompts = [random_prompt(n, seed=10 + i)[0] for i, n in enumerate(lengths)]
    ids = torch.zeros(3, 40, dtype=torch.long, device=DEVICE)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, 40 - len(p):], mask[i, 40 - len(p):] = p, 1
    plain = tiny_model("llama")
    expected = [greedy(plain, p[None], n=8)[0] for p in prompts]
    model = entropykv_fx.optimize(tiny_model("llama"), policy=policy, budget=1.0, window=WINDOW)
    for row, exp in zip(greedy(model, ids, n=8, attention_mask=mask), expected):
        assert torch.equal(row, exp)


def test_matrix_entropy_on_key_states():
    model = entropykv_fx.optimize(tiny_model("llama"), policy="matrix_entropy", matrix_states="key", budget=0.5,
                                  window=WINDOW)
    assert greedy(model, random_prompt(64)).shape == (1, 6)
    assert sum(h.slots for r in entropykv_fx.report(model).layers for h in r.heads) == 3 * 2 * 32
