"""The `reconstruct` scorer (KVzip-class): its op against a plain reference, and the reconstruction prefill's
contract: callers see a prefill of their prompt (outputs, cache, positions), rows of a batch as alone."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops import ref_probs, ref_score
from test_runtime import greedy, kept_positions
from tiny_models import DEVICE, calibrated, left_padded, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import EntropyKVCache, compat, ops
from entropykv_fx.aot import check_export
from entropykv_fx.bench.fanout import scored_prefill
from entropykv_fx.config import ConfigError, EntropyKVConfig
from entropykv_fx.errors import ExportError
from entropykv_fx.hf import UnsupportedCallError
from entropykv_fx.reconstruct import repeat_context
from entropykv_fx.static import StaticCacheModel


def reconstruction_batch(lengths: list[int], repeat: int, hq: int = 4, hkv: int = 2, d: int = 8,
                         dtype: torch.dtype = torch.float32):
    """Random q, k and the positions of a reconstruction prefill of contexts of `lengths` tokens (each row's pads
    split between its two ends, `entropykv_fx.reconstruct`)."""
    total = 2 * max(lengths) + repeat
    pos = torch.tensor([[-1] * (max(lengths) - n) + list(range(2 * n + repeat)) + [-1] * (max(lengths) - n)
                        for n in lengths], device=DEVICE)
    q = torch.randn(len(lengths), hq, total, d, device=DEVICE).to(dtype)
    k = torch.randn(len(lengths), hkv, total, d, device=DEVICE).to(dtype)
    return q, k, pos


def reference(q, k, pos, scale, sliding_window, window, repeat):
    """(entropy, kv_scores) by loops over float64 probabilities."""
    probs, _ = ref_probs(q, k, pos, pos, scale, sliding_window)  # [B, Hq, L, S]
    b, hq = q.shape[:2]
    hkv, group = k.shape[1], hq // k.shape[1]
    kv = torch.zeros(b, hkv, k.shape[2], dtype=torch.float64)
    entropy = torch.zeros(b, hq, dtype=torch.float64)
    for bi in range(b):
        p = pos[bi].tolist()
        n = (sum(x >= 0 for x in p) - repeat) // 2
        rec = [i for i, x in enumerate(p) if x >= n + repeat]
        for h in range(hkv):
            kv[bi, h] = probs[bi, h * group:(h + 1) * group, rec].amax(dim=(0, 1)) if rec else 0
        win = [i for i, x in enumerate(p) if n - window <= x < n]
        if win:
            entropy[bi] = ref_score(q[bi:bi + 1, :, win], k[bi:bi + 1], pos[bi:bi + 1, win], pos[bi:bi + 1], scale,
                                    sliding_window)[0][0]
    reach = (pos.shape[1] - repeat) // 2  # the prompt's columns, pads included
    kv[..., reach:] = 0  # past every row's context: not scored
    return entropy, kv


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 9), min_size=1, max_size=3), repeat=st.integers(0, 3),
       window=st.integers(1, 5), sliding_window=st.sampled_from([0, 4]), seed=st.integers(0, 2**16))
def test_score_reconstruction_matches_reference(lengths, repeat, window, sliding_window, seed):
    torch.manual_seed(seed)
    q, k, pos = reconstruction_batch(lengths, repeat)
    scale = 1 / math.sqrt(q.shape[-1])
    entropy, kv_scores, layer_scores = ops.score_reconstruction(q, k, pos, pos, scale, sliding_window, window, repeat)
    exp_entropy, exp_kv = reference(q, k, pos, scale, sliding_window, window, repeat)
    torch.testing.assert_close(entropy.cpu().double(), exp_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv_scores.cpu().double(), exp_kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_scores, kv_scores.amax(1))
    assert ((kv_scores >= 0) & (kv_scores <= 1 + 1e-6)).all()
    assert (layer_scores[pos < 0] == 0).all()  # pads are never attended
    lse = ops.attention_lse(q, k, k, pos, pos, scale, sliding_window)[1]  # the prefill attention's normalizers
    reused = ops.score_reconstruction(q, k, pos, pos, scale, sliding_window, window, repeat, lse)
    for a, b in zip(reused, (entropy, kv_scores, layer_scores)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_score_reconstruction_in_low_precision_scores_in_float32():
    torch.manual_seed(3)
    q, k, pos = reconstruction_batch([6, 4], 2, dtype=torch.bfloat16)
    got = ops.score_reconstruction(q, k, pos, pos, 0.3, 0, 3, 2)
    exp_entropy, exp_kv = reference(q, k, pos, 0.3, 0, 3, 2)
    assert all(t.dtype == torch.float32 for t in got)
    torch.testing.assert_close(got[1].cpu().double(), exp_kv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0].cpu().double(), exp_entropy, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths, repeat, sliding_window", [([5, 3], 2, 0), ([7], 0, 3)])
def test_score_reconstruction_opcheck(lengths, repeat, sliding_window):
    torch.manual_seed(4)
    q, k, pos = reconstruction_batch(lengths, repeat)
    torch.library.opcheck(torch.ops.entropykv.score_reconstruction.default,
                          (q, k, pos, pos, 0.25, sliding_window, 2, repeat))
    lse = ops.log_normalizers(q, k, pos, pos, 0.25, sliding_window)
    torch.library.opcheck(torch.ops.entropykv.score_reconstruction.default,
                          (q, k, pos, pos, 0.25, sliding_window, 2, repeat, lse))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), length=st.integers(1, 8), s=st.integers(1, 10), sliding_window=st.sampled_from([0, 3]),
       data=st.data(), seed=st.integers(0, 2**16))
def test_max_attention_matches_reference(b, length, s, sliding_window, data, seed):
    """Arbitrary positions, pads (-1) and empty key slots included, so some queries see nothing (they add nothing)
    and some slots are seen by no query (they score 0)."""
    torch.manual_seed(seed)
    q, k = torch.randn(b, 4, length, 8, device=DEVICE), torch.randn(b, 2, s, 8, device=DEVICE)
    q_pos = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, 12), min_size=length, max_size=length),
                                            min_size=b, max_size=b)), device=DEVICE)
    k_pos = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, 12), min_size=s, max_size=s),
                                            min_size=b, max_size=b)), device=DEVICE)
    slots = data.draw(st.integers(0, s))
    got = ops.max_attention(q, k, q_pos, k_pos, 0.35, sliding_window, slots)
    probs, _ = ref_probs(q, k, q_pos, k_pos, 0.35, sliding_window)  # [B, Hq, L, S], zero where unseen
    want = probs.unflatten(1, (2, 2)).amax(dim=(2, 3))[..., :slots]
    torch.testing.assert_close(got.cpu().double(), want, atol=1e-5, rtol=1e-5)
    lse = ops.log_normalizers(q, k, q_pos, k_pos, 0.35, sliding_window)
    given = ops.max_attention(q, k, q_pos, k_pos, 0.35, sliding_window, slots, lse)
    torch.testing.assert_close(given.cpu().double(), want, atol=1e-5, rtol=1e-5)


def reference_lse(q, k, q_pos, k_pos, scale, sliding_window):
    """float64 log-sum-exp [B, Hq, L] of each query's visible scaled logits, -inf where it sees nothing."""
    seen = ops.visibility(q_pos, k_pos, sliding_window)[:, None]  # [B, 1, L, S]
    keys = k.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    logits = (q.double() @ keys.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    return logits.logsumexp(-1)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 3), length=st.integers(1, 8), s=st.integers(1, 10), sliding_window=st.sampled_from([0, 3]),
       data=st.data(), seed=st.integers(0, 2**16))
def test_attention_lse_matches_reference(b, length, s, sliding_window, data, seed):
    """Arbitrary positions, pads and empty slots: the output is `attention`'s, lse the visible logits'
    log-sum-exp (-inf for a query that sees nothing)."""
    torch.manual_seed(seed)
    q, k, v = torch.randn(b, 4, length, 8), torch.randn(b, 2, s, 8), torch.randn(b, 2, s, 8)
    positions = st.lists(st.lists(st.integers(-1, 12), min_size=length, max_size=length), min_size=b, max_size=b)
    q_pos = torch.tensor(data.draw(positions))
    k_pos = torch.tensor(data.draw(st.lists(st.lists(st.integers(-1, 12), min_size=s, max_size=s), min_size=b,
                                            max_size=b)))
    out, lse = ops.attention_lse(q, k, v, q_pos, k_pos, 0.35, sliding_window)
    assert lse.dtype == torch.float32 and lse.shape == (b, 4, length)
    torch.testing.assert_close(out, ops.attention(q, k, v, q_pos, k_pos, 0.35, sliding_window))
    torch.testing.assert_close(lse.double(), reference_lse(q, k, q_pos, k_pos, 0.35, sliding_window), atol=1e-5,
                               rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_lse_of_an_unpadded_causal_prefill(dtype):
    """The flash kernel's own normalizers (an unpadded causal prefill, GQA): the same as computed from the logits."""
    torch.manual_seed(6)
    q, k, v = torch.randn(1, 6, 40, 16).to(dtype), torch.randn(1, 2, 40, 16).to(dtype), torch.randn(1, 2, 40, 16).to(dtype)
    pos = torch.arange(40)[None]
    out, lse = ops.attention_lse(q, k, v, pos, pos, 0.25, 0)
    assert torch.equal(out, ops.attention(q, k, v, pos, pos, 0.25, 0))
    torch.testing.assert_close(lse.double(), reference_lse(q, k, pos, pos, 0.25, 0), atol=1e-4, rtol=1e-4)


def test_attention_lse_opcheck():
    torch.manual_seed(7)
    q, k, pos = reconstruction_batch([5, 3], 2)
    torch.library.opcheck(torch.ops.entropykv.attention_lse.default, (q, k, k, pos, pos, 0.25, 0))
    plain = torch.arange(q.shape[2])[None].expand(2, -1).contiguous()
    torch.library.opcheck(torch.ops.entropykv.attention_lse.default, (q, k, k, plain, plain, 0.25, 0))


@pytest.mark.parametrize("slots", [0, 6, 13])
def test_max_attention_opcheck(slots):
    torch.manual_seed(5)
    q, k, pos = reconstruction_batch([5, 4], 3)
    torch.library.opcheck(torch.ops.entropykv.max_attention.default, (q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0, slots))
    lse = ops.log_normalizers(q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0)
    torch.library.opcheck(torch.ops.entropykv.max_attention.default,
                          (q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0, slots, lse))


def test_score_reconstruction_rejects_bad_arguments():
    q, k, pos = reconstruction_batch([4], 1)
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.score_reconstruction(q, k, pos, pos, 0.25, 0, 0, 1)
    with pytest.raises(ValueError, match="q_pos must be"):
        ops.score_reconstruction(q, k, pos[:, 1:], pos, 0.25, 0, 2, 1)
    with pytest.raises(ValueError, match="slots must be in 0..9"):
        ops.max_attention(q, k, pos, pos, 0.25, 0, 10)
    with pytest.raises(ValueError, match=r"lse must be float32 \[B, Hq, L\]=\(1, 4, 9\)"):
        ops.score_reconstruction(q, k, pos, pos, 0.25, 0, 2, 1, torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="lse must be float32"):
        ops.max_attention(q, k, pos, pos, 0.25, 0, 9, torch.zeros(1, 4, 9, dtype=torch.float64))


def test_context_queries_hides_the_repetition():
    pos = torch.tensor([[-1, 0, 1, 2, 3, 4, -1], [0, 1, 2, 3, 4, 5, 6]])
    assert ops.context_queries(pos, 1).tolist() == [[-1, 0, 1, -1, -1, -1, -1], [0, 1, 2, -1, -1, -1, -1]]


def test_repeat_context_lays_the_prompt_out_in_the_prefills_own_columns():
    """Row b: its p_b left pads and n_b tokens where the prefill had them, the repeat prompt, the n_b tokens again,
    p_b pads; every column's embedding is the token's at its position."""
    length, hidden = 5, 3
    positions = torch.tensor([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    embeds = torch.arange(2 * length * hidden, dtype=torch.float32).view(2, length, hidden)
    prompt = -torch.arange(2 * hidden, dtype=torch.float32).view(2, hidden) - 1
    got, pos = repeat_context(embeds, positions, prompt)
    assert pos.tolist() == [[-1, -1, 0, 1, 2, 3, 4, 5, 6, 7, -1, -1], list(range(12))]
    for b, pads in enumerate((2, 0)):
        want = torch.cat([embeds[b, pads:], prompt, embeds[b, pads:]])
        assert torch.equal(got[b][pos[b] >= 0], want), f"row {b}"
        assert torch.equal(got[b, pads:length], embeds[b, pads:]), "the prompt stays in the prefill's columns"


# --------------------------------------------------------------------------------------- the runtime
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen3"])
def test_a_reconstruction_prefill_looks_like_a_prefill_of_the_prompt(arch, monkeypatch):
    """Outputs of every column, positions and (at full budget) the cached keys equal a plain prefill's, for a
    left-padded batch; mistral's sliding window (24) is shorter than the prompts. The prefill graph itself already
    left only the prompt's slots in every layer (the repetition's keys and values never outlive their layer)."""
    held_after_forward = []
    end = EntropyKVCache.end_reconstruction

    def recording_end(cache, positions):
        held_after_forward.extend(layer.positions.shape[1] for layer in cache.layers)
        end(cache, positions)

    monkeypatch.setattr(EntropyKVCache, "end_reconstruction", recording_end)
    ids, mask = left_padded([random_prompt(50, seed=5)[0], random_prompt(33, seed=6)[0]])
    plain = entropykv_fx.optimize(tiny_model(arch), policy="uniform", scorer="window", budget=1.0)  # layer-wise caches
    model = entropykv_fx.optimize(tiny_model(arch), policy="uniform", scorer="reconstruct", budget=1.0,
                                  repeat_prompt=(7, 8, 9))
    with torch.no_grad():
        want = plain(ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
        got = model(ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
    valid = mask.bool()
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=1e-5, rtol=1e-5)
    for g, w in zip(got.hidden_states, want.hidden_states):
        torch.testing.assert_close(g[valid], w[valid], atol=1e-5, rtol=1e-5)
    got_cache, want_cache = compat.cache_of(got), compat.cache_of(want)
    assert got_cache.get_seq_length() == want_cache.get_seq_length() == ids.shape[1]
    assert got_cache.next_positions.tolist() == [50, 33]
    assert held_after_forward == [ids.shape[1]] * len(got_cache.layers)
    for g, w in zip(got_cache.layers, want_cache.layers):
        assert torch.equal(g.positions, w.positions), "the plain prefill's layout, left pads included"
        for b in range(2):
            keep_g, keep_w = g.positions[b] >= 0, w.positions[b] >= 0
            assert torch.equal(g.positions[b, keep_g], w.positions[b, keep_w])
            torch.testing.assert_close(g.keys[b, :, keep_g], w.keys[b, :, keep_w], atol=1e-5, rtol=1e-5)


def test_full_budget_generates_the_unmodified_tokens_with_a_repeat_prompt():
    ids = random_prompt(80, seed=2)
    reference = greedy(tiny_model(), ids, n=6)
    model = entropykv_fx.optimize(tiny_model(), scorer="reconstruct", budget=1.0, repeat_prompt=(3, 4))
    assert torch.equal(greedy(model, ids, n=6), reference)


@pytest.mark.parametrize("policy", ["uniform", "pyramidkv", "adakv", "matrix_entropy", "cache_topk",
                                    "cache_topk_layer"])
def test_every_row_of_a_batch_keeps_and_generates_what_it_does_alone(policy):
    model = entropykv_fx.optimize(tiny_model("qwen3"), policy=policy, scorer="reconstruct", budget=0.4, window=6,
                                  sink_tokens=2)
    prompts = [random_prompt(n, seed=n)[0] for n in (64, 37)]
    ids, mask = left_padded(prompts)
    batched = greedy(model, ids, attention_mask=mask, n=5)
    rows = entropykv_fx.report(model).rows
    for b, prompt in enumerate(prompts):
        alone = greedy(model, prompt[None], n=5)
        assert torch.equal(batched[b], alone[0])
        assert [r.slots_after for r in rows[b].layers] == [r.slots_after for r in entropykv_fx.report(model).layers]


def test_scores_differ_from_the_window_scorer_and_entropies_do_not():
    ids = random_prompt(90, seed=7)
    model = tiny_model()
    rec, _ = scored_prefill(model, ids, EntropyKVConfig(scorer="reconstruct"))
    win, _ = scored_prefill(model, ids, EntropyKVConfig(scorer="window"))
    for a, b in zip(rec.layers, win.layers):
        assert a.positions.tolist() == b.positions.tolist() == [list(range(90))]
        torch.testing.assert_close(a.stats.entropy, b.stats.entropy, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(a.stats.kv_scores, b.stats.kv_scores)
        torch.testing.assert_close(a.keys, b.keys, atol=1e-5, rtol=1e-5)


def test_kept_tokens_are_the_reconstruction_top_k():
    ids = random_prompt(100, seed=9)
    cfg = {"policy": "uniform", "scorer": "reconstruct", "budget": 40, "window": 8, "sink_tokens": 2}
    full, _ = scored_prefill(tiny_model(), ids, EntropyKVConfig(**cfg))
    model = entropykv_fx.optimize(tiny_model(), **cfg)
    with torch.no_grad():
        cache = compat.cache_of(model(ids, use_cache=True))
    forced = set(range(2)) | set(range(92, 100))
    for kept, layer in zip(kept_positions(cache), full.layers):
        score = layer.stats.layer_scores[0]
        chosen = sorted(set(range(2, 92)), key=lambda p: (-score[p].item(), p))[:40 - len(forced)]
        assert set(kept) == forced | set(chosen)


def test_bad_uses_are_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="repeat_prompt"):
        EntropyKVConfig(repeat_prompt=(1, -2))
    with pytest.raises(ConfigError, match="repeat_prompt holds token ids \\[500\\]"):
        entropykv_fx.optimize(tiny_model(), scorer="reconstruct", repeat_prompt=(500,))
    model = entropykv_fx.optimize(tiny_model(), scorer="reconstruct", budget=0.5)
    with pytest.raises(UnsupportedCallError, match="default position_ids"):
        model(random_prompt(40), position_ids=torch.arange(5, 45, device=DEVICE)[None], use_cache=True)
    with pytest.raises(ValueError, match="scorer='reconstruct'"):
        StaticCacheModel(tiny_model(), scorer="reconstruct")
    exportable = entropykv_fx.optimize(calibrated(tmp_path, "llama", [0.5, 0.5, 0.5]), scorer="reconstruct")
    with pytest.raises(ExportError, match="scorer='reconstruct'"):
        check_export(exportable, 32, 4, 1)


def test_the_reconstruction_prefill_scores_with_its_attentions_normalizers():
    """The prefill graph's attention keeps the softmax normalizers (`attention_lse`) and `max_attention` receives
    them, so the scorer makes one pass over the keys; a window-scored prefill runs plain `attention`."""
    ids = random_prompt(40, seed=1)

    def op_inputs(scorer: str) -> dict[str, list]:
        model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", scorer=scorer, budget=0.5)
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            model(ids, use_cache=True)
        return {e.name: e.input_shapes for e in prof.events() if e.name.startswith("entropykv::")}

    reconstruct, window = op_inputs("reconstruct"), op_inputs("window")
    assert "entropykv::attention_lse" in reconstruct and "entropykv::attention" not in reconstruct
    q_rec = reconstruct["entropykv::max_attention"][0]
    assert reconstruct["entropykv::max_attention"][-1] == q_rec[:3], "lse [B, Hq, L] of the repeated queries"
    assert "entropykv::attention" in window and "entropykv::attention_lse" not in window


def test_a_reconstruction_past_the_trained_positions_warns_before_the_forward():
    """2 x prompt + repeat prompt positions past max_position_embeddings: a PositionRangeWarning naming the lengths,
    raised before the forward runs; a prompt whose repetition fits runs without it."""
    import warnings

    from entropykv_fx import PositionRangeWarning

    model = tiny_model("llama")
    model.config.max_position_embeddings = 150
    entropykv_fx.optimize(model, policy="cache_topk", scorer="reconstruct", budget=0.5, repeat_prompt=(5, 6, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionRangeWarning)
        greedy(model, random_prompt(71), 2)  # 2 x 71 + 3 = 145 positions
    with pytest.warns(PositionRangeWarning, match=r"80-token prompt .* 163 positions.*max_position_embeddings=150.*up "
                      r"to 73 tokens"):
        model(random_prompt(80), use_cache=True)
    forwards = []
    model.lm_head.register_forward_pre_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionRangeWarning)
        with pytest.raises(PositionRangeWarning):
            model(random_prompt(80), use_cache=True)
    assert forwards == []  # raised as an error, the warning stopped the call before the forward
    model(random_prompt(60), use_cache=True)
    assert forwards == [1]
