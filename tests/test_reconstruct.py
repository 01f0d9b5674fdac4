"""The `reconstruct` scorer (KVzip-class): its op against a plain reference, and the reconstruction prefill's
contract: callers see a prefill of their prompt (outputs, cache, positions), rows of a batch as alone."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ops import ref_probs, ref_score, ref_visible
from test_runtime import greedy, kept_positions
from tiny_models import DEVICE, calibrated, left_padded, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import EntropyKVCache, compat, ops
from entropykv_fx.aot import check_export
from entropykv_fx.bench.fanout import scored_prefill
from entropykv_fx.config import ConfigError, EntropyKVConfig
from entropykv_fx.errors import ExportError
from entropykv_fx.hf import UnsupportedCallError
from entropykv_fx.reconstruct import prompt_columns, repeat_context, segments
from entropykv_fx.static import StaticCacheModel


def reconstruction_batch(lengths: list[int], repeat: int, chunk: int = 4, hq: int = 4, hkv: int = 2, d: int = 8,
                         dtype: torch.dtype = torch.float32):
    """Random q, k, v and the positions of a reconstruction prefill of left-padded prompts of `lengths` tokens
    repeated in chunks of `chunk` (`entropykv_fx.reconstruct`)."""
    length = max(lengths)
    prompt_pos = torch.tensor([[-1] * (length - n) + list(range(n)) for n in lengths], device=DEVICE)
    _, pos = repeat_context(torch.zeros(len(lengths), length, 1, device=DEVICE), prompt_pos,
                            torch.zeros(repeat, 1, device=DEVICE), chunk)
    total = pos.shape[1]
    q = torch.randn(len(lengths), hq, total, d, device=DEVICE).to(dtype)
    k = torch.randn(len(lengths), hkv, total, d, device=DEVICE).to(dtype)
    v = torch.randn(len(lengths), hkv, total, d, device=DEVICE).to(dtype)
    return q, k, v, pos


def layout_visibility(pos: torch.Tensor, repeat: int, chunk: int, sliding_window: int) -> torch.Tensor:
    """[B, T, T] which key column each query column sees, from the layout's definition: prompt queries the prompt;
    a segment's queries the prompt before their row's chunk end and their own segment; always causal by position."""
    length = prompt_columns(pos.shape[1], repeat, chunk)
    region = torch.zeros(pos.shape[1], dtype=torch.long)
    for s, (first, width, _) in enumerate(segments(length, repeat, chunk)):
        region[first:first + width] = s + 1
    seen = ref_visible(pos.cpu(), pos.cpu(), sliding_window).clone()
    for b in range(pos.shape[0]):
        n = int((pos[b, :length] >= 0).sum())
        for i in range(pos.shape[1]):
            s = int(region[i])
            end = (s - 1) * chunk + min(max(n - (s - 1) * chunk, 0), chunk)
            allowed = region == s
            if s:
                allowed |= (region == 0) & (pos[b].cpu() < end)
            seen[b, i] &= allowed
    return seen


def reference(q, k, v, pos, scale, sliding_window, window, repeat, chunk):
    """(entropy, kv_scores, attention output) by loops over float64 probabilities."""
    seen = layout_visibility(pos, repeat, chunk, sliding_window)
    q64, k64 = q.cpu().double(), k.cpu().double()
    b, hq, total, _ = q.shape
    hkv, group = k.shape[1], hq // k.shape[1]
    probs = torch.zeros(b, hq, total, total, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            logits = q64[bi, h] @ k64[bi, h // group].T * scale
            for i in range(total):
                if seen[bi, i].any():
                    probs[bi, h, i, seen[bi, i]] = torch.softmax(logits[i][seen[bi, i]], -1)
    out = probs @ v.cpu().double().repeat_interleave(group, 1)
    length = prompt_columns(total, repeat, chunk)
    kv = torch.zeros(b, hkv, total, dtype=torch.float64)
    entropy = torch.zeros(b, hq, dtype=torch.float64)
    for bi in range(b):
        p = pos[bi].tolist()
        n = sum(x >= 0 for x in p[:length])
        for s, (first, width, start) in enumerate(segments(length, repeat, chunk)):
            end = start + min(max(n - start, 0), chunk)
            scoring = [first + i for i in range(width) if p[first + i] >= end + repeat]
            for h in range(hkv):
                if scoring:
                    got = probs[bi, h * group:(h + 1) * group, scoring, :length].amax(dim=(0, 1))
                    kv[bi, h, :length] = torch.maximum(kv[bi, h, :length], got)
        win = [i for i in range(length) if n - window <= p[i] < n]
        if win:
            entropy[bi] = ref_score(q[bi:bi + 1, :, win], k[bi:bi + 1, :, :length], pos[bi:bi + 1, win],
                                    pos[bi:bi + 1, :length], scale, sliding_window)[0][0]
    return entropy, kv, out


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=st.lists(st.integers(1, 11), min_size=1, max_size=3), repeat=st.integers(0, 3),
       chunk=st.integers(1, 12), window=st.integers(1, 5), sliding_window=st.sampled_from([0, 4]),
       seed=st.integers(0, 2**16))
def test_score_reconstruction_matches_reference(lengths, repeat, chunk, window, sliding_window, seed):
    """Chunks from one token to longer than the prompt (one repetition of it all), pads, repeat prompts, sliding
    windows: the scores and the attention equal float64 loops over the layout's own definition of what each query
    sees."""
    torch.manual_seed(seed)
    q, k, v, pos = reconstruction_batch(lengths, repeat, chunk)
    scale = 1 / math.sqrt(q.shape[-1])
    exp_entropy, exp_kv, exp_out = reference(q, k, v, pos, scale, sliding_window, window, repeat, chunk)
    out, lse = ops.attention_reconstruction(q, k, v, pos, pos, scale, sliding_window, repeat, chunk)
    valid = pos >= 0
    torch.testing.assert_close(out.cpu().double().transpose(1, 2)[valid.cpu()],
                               exp_out.transpose(1, 2)[valid.cpu()], atol=1e-5, rtol=1e-5)
    entropy, kv_scores, layer_scores = ops.score_reconstruction(q, k, pos, pos, scale, sliding_window, window, repeat,
                                                                chunk)
    torch.testing.assert_close(entropy.cpu().double(), exp_entropy, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(kv_scores.cpu().double(), exp_kv, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer_scores, kv_scores.amax(1))
    assert ((kv_scores >= 0) & (kv_scores <= 1 + 1e-6)).all()
    assert (layer_scores[pos < 0] == 0).all()  # pads are never attended
    reused = ops.score_reconstruction(q, k, pos, pos, scale, sliding_window, window, repeat, chunk, lse)
    for a, b in zip(reused, (entropy, kv_scores, layer_scores)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unpadded_rows_take_the_fused_path_with_the_general_paths_results(dtype, monkeypatch):
    """Unpadded rows run fused kernels without position checks; forced onto the general path (position-checked
    attention per segment) they give the same outputs and normalizers."""
    torch.manual_seed(10)
    q, k, v, pos = reconstruction_batch([23, 23], 2, chunk=5, dtype=dtype)
    fused = ops.attention_reconstruction(q, k, v, pos, pos, 0.3, 0, 2, 5)
    read = ops._read_prompt_layout
    monkeypatch.setattr(ops, "_read_prompt_layout", lambda *args: (read(*args)[0], False))
    monkeypatch.setattr(ops, "_MEMO", {})
    general = ops.attention_reconstruction(q, k, v, pos, pos, 0.3, 0, 2, 5)
    tol = dict(atol=2e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused[0].float(), general[0].float(), **tol)
    torch.testing.assert_close(fused[1], general[1], atol=1e-3, rtol=1e-3)


def test_score_reconstruction_in_low_precision_scores_in_float32():
    torch.manual_seed(3)
    q, k, v, pos = reconstruction_batch([6, 4], 2, dtype=torch.bfloat16)
    got = ops.score_reconstruction(q, k, pos, pos, 0.3, 0, 3, 2, 4)
    exp_entropy, exp_kv, _ = reference(q, k, v, pos, 0.3, 0, 3, 2, 4)
    assert all(t.dtype == torch.float32 for t in got)
    torch.testing.assert_close(got[1].cpu().double(), exp_kv, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[0].cpu().double(), exp_entropy, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lengths, repeat, chunk, sliding_window", [([5, 3], 2, 2, 0), ([7], 0, 3, 3),
                                                                   ([6], 1, 8, 0)])
def test_score_reconstruction_opcheck(lengths, repeat, chunk, sliding_window):
    torch.manual_seed(4)
    q, k, v, pos = reconstruction_batch(lengths, repeat, chunk)
    torch.library.opcheck(torch.ops.entropykv.score_reconstruction.default,
                          (q, k, pos, pos, 0.25, sliding_window, 2, repeat, chunk))
    lse = ops.attention_reconstruction(q, k, v, pos, pos, 0.25, sliding_window, repeat, chunk)[1]
    torch.library.opcheck(torch.ops.entropykv.score_reconstruction.default,
                          (q, k, pos, pos, 0.25, sliding_window, 2, repeat, chunk, lse))
    torch.library.opcheck(torch.ops.entropykv.attention_reconstruction.default,
                          (q, k, v, pos, pos, 0.25, sliding_window, repeat, chunk))


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_attention_lse_of_queries_that_see_every_key(dtype):
    """A repeated chunk over the prompt before it (every query sees every key): the fused kernel's output and
    normalizers, the same as from the logits; a window that cuts keys off, or a pad, takes the general path."""
    torch.manual_seed(8)
    q, k, v = (torch.randn(1, 6, n, 16, device=DEVICE).to(dtype) for n in (12, 30, 30))
    q_pos, k_pos = torch.arange(30, 42, device=DEVICE)[None], torch.arange(30, device=DEVICE)[None]
    assert ops._sees_every_key(q_pos, k_pos, 0) and ops._sees_every_key(q_pos, k_pos, 42)
    assert not ops._sees_every_key(q_pos, k_pos, 41) and not ops._sees_every_key(q_pos, k_pos.clone().fill_(-1), 0)
    out, lse = ops.attention_lse(q, k[:, :2], v[:, :2], q_pos, k_pos, 0.25, 0)
    torch.testing.assert_close(out.float(), ops.attention(q, k[:, :2], v[:, :2], q_pos, k_pos, 0.25, 0).float(),
                               atol=2e-2 if dtype == torch.bfloat16 else 1e-5, rtol=1e-2)
    torch.testing.assert_close(lse.double().cpu(), reference_lse(q, k[:, :2], q_pos, k_pos, 0.25, 0).cpu(), atol=1e-3,
                               rtol=1e-3)


def test_merge_attention_is_attention_over_both_key_sets():
    """Attention over two disjoint key sets merged by normalizers equals attention over their union; a query that
    sees neither part stays zero with lse -inf."""
    torch.manual_seed(9)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    q_pos = torch.tensor([[9, 10, 11, 12, 13], [-1, 10, 11, 12, 13]])
    k_pos = torch.tensor([[0, 1, 2, -1, 4, 9, 10, 11, 12], [0, 1, 2, 3, 4, 9, 10, 11, 12]])
    whole = ops.attention_lse(q, k, v, q_pos, k_pos, 0.3, 0)
    parts = [ops.attention_lse(q, k[:, :, cols], v[:, :, cols], q_pos, k_pos[:, cols], 0.3, 0)
             for cols in (slice(0, 5), slice(5, 9))]
    out, lse = ops.merge_attention(*parts)
    torch.testing.assert_close(out, whole[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, whole[1], atol=1e-5, rtol=1e-5)
    assert lse[1, :, 0].isneginf().all() and (out[1, :, 0] == 0).all()


def test_attention_lse_opcheck():
    torch.manual_seed(7)
    q, k, _, pos = reconstruction_batch([5, 3], 2)
    torch.library.opcheck(torch.ops.entropykv.attention_lse.default, (q, k, k, pos, pos, 0.25, 0))
    plain = torch.arange(q.shape[2], device=DEVICE)[None].expand(2, -1).contiguous()
    torch.library.opcheck(torch.ops.entropykv.attention_lse.default, (q, k, k, plain, plain, 0.25, 0))


@pytest.mark.parametrize("slots", [0, 6, 13])
def test_max_attention_opcheck(slots):
    torch.manual_seed(5)
    q, k, _, pos = reconstruction_batch([5, 4], 3, chunk=5)
    torch.library.opcheck(torch.ops.entropykv.max_attention.default, (q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0, slots))
    lse = ops.log_normalizers(q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0)
    torch.library.opcheck(torch.ops.entropykv.max_attention.default,
                          (q[:, :, 8:], k, pos[:, 8:], pos, 0.25, 0, slots, lse))


def test_score_reconstruction_rejects_bad_arguments():
    q, k, v, pos = reconstruction_batch([4], 1)
    with pytest.raises(ValueError, match="window and chunk must be >= 1"):
        ops.score_reconstruction(q, k, pos, pos, 0.25, 0, 0, 1, 4)
    with pytest.raises(ValueError, match="window and chunk must be >= 1"):
        ops.attention_reconstruction(q, k, v, pos, pos, 0.25, 0, 1, 0)
    with pytest.raises(ValueError, match="q_pos must be"):
        ops.score_reconstruction(q, k, pos[:, 1:], pos, 0.25, 0, 2, 1, 4)
    with pytest.raises(ValueError, match="10 columns are no reconstruction prefill's"):
        ops.attention_reconstruction(torch.cat([q, q[:, :, :1]], 2), torch.cat([k, k[:, :, :1]], 2),
                                     torch.cat([v, v[:, :, :1]], 2), torch.cat([pos, pos[:, :1]], 1),
                                     torch.cat([pos, pos[:, :1]], 1), 0.25, 0, 1, 4)
    with pytest.raises(ValueError, match="queries and keys are its columns"):
        ops.score_reconstruction(q[:, :, 1:], k, pos[:, 1:], pos, 0.25, 0, 2, 1, 4)
    with pytest.raises(ValueError, match="slots must be in 0..9"):
        ops.max_attention(q, k, pos, pos, 0.25, 0, 10)
    with pytest.raises(ValueError, match=r"lse must be float32 \[B, Hq, L\]=\(1, 4, 9\)"):
        ops.score_reconstruction(q, k, pos, pos, 0.25, 0, 2, 1, 4, torch.zeros(1, 4, 8))
    with pytest.raises(ValueError, match="lse must be float32"):
        ops.max_attention(q, k, pos, pos, 0.25, 0, 9, torch.zeros(1, 4, 9, dtype=torch.float64))


def test_context_queries_hides_the_repetition():
    prompt_pos = torch.tensor([[-1, 0, 1], [0, 1, 2]])
    _, pos = repeat_context(torch.zeros(2, 3, 1), prompt_pos, torch.zeros(1, 1), 2)
    assert pos.shape[1] == 2 * 3 + 2 * 1
    assert ops.context_queries(pos, 1, 2).tolist() == [[-1, 0, 1] + [-1] * 5, [0, 1, 2] + [-1] * 5]


@pytest.mark.parametrize("length", range(1, 40))
@pytest.mark.parametrize("repeat, chunk", [(0, 1), (0, 7), (3, 4), (2, 64)])
def test_prompt_columns_inverts_the_layouts_length(length, repeat, chunk):
    total = length + sum(width for _, width, _ in segments(length, repeat, chunk))
    assert total == 2 * length + repeat * -(-length // chunk)
    assert prompt_columns(total, repeat, chunk) == length


def test_repeat_context_lays_the_prompt_out_in_the_prefills_own_columns():
    """The prompt's columns unmoved; then per chunk of each row's own tokens a slot of the repeat prompt and the
    chunk, at the positions right after the chunk, left-padded to the longest row's slot; a row without tokens in a
    chunk leaves its slot to pads."""
    length, hidden = 5, 3
    positions = torch.tensor([[-1, -1, 0, 1, 2], [0, 1, 2, 3, 4]])
    embeds = torch.arange(2 * length * hidden, dtype=torch.float32).view(2, length, hidden)
    prompt = -torch.arange(2 * hidden, dtype=torch.float32).view(2, hidden) - 1
    got, pos = repeat_context(embeds, positions, prompt, 2)
    assert pos.tolist() == [[-1, -1, 0, 1, 2, 2, 3, 4, 5, -1, 3, 4, 5, -1, -1, -1],
                            [0, 1, 2, 3, 4, 2, 3, 4, 5, 4, 5, 6, 7, 5, 6, 7]]
    r0, r1 = prompt
    want = {0: [r0, r1, embeds[0, 2], embeds[0, 3], r0, r1, embeds[0, 4]],
            1: [r0, r1, embeds[1, 0], embeds[1, 1], r0, r1, embeds[1, 2], embeds[1, 3], r0, r1, embeds[1, 4]]}
    for b in range(2):
        assert torch.equal(got[b, :length], embeds[b]), "the prompt stays in the prefill's columns"
        assert torch.equal(got[b, length:][pos[b, length:] >= 0], torch.stack(want[b])), f"row {b}"


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
                                  repeat_prompt=(7, 8, 9), reconstruct_chunk=16)  # 4 and 3 chunks
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
                                  sink_tokens=2, reconstruct_chunk=16)  # 4 and 3 chunks: rows chunk their own tokens
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
    """The prefill graph's attention keeps the softmax normalizers (`attention_reconstruction`) and `max_attention`
    receives them, so the scorer makes one pass over the keys; a window-scored prefill runs plain `attention`."""
    ids = random_prompt(40, seed=1)

    def op_inputs(scorer: str) -> dict[str, list]:
        model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", scorer=scorer, budget=0.5)
        with torch.no_grad(), torch.profiler.profile(record_shapes=True) as prof:
            model(ids, use_cache=True)
        return {e.name: e.input_shapes for e in prof.events() if e.name.startswith("entropykv::")}

    reconstruct, window = op_inputs("reconstruct"), op_inputs("window")
    assert "entropykv::attention_reconstruction" in reconstruct
    assert "entropykv::attention" not in reconstruct, "an unpadded prompt's segments run fused kernels only"
    q_rec = reconstruct["entropykv::max_attention"][0]
    assert reconstruct["entropykv::max_attention"][-1] == q_rec[:3], "lse [B, Hq, L] of the repeated queries"
    assert "entropykv::attention" in window and "entropykv::attention_lse" not in window


def counted_reads(monkeypatch) -> collections.Counter:
    """How many times each kind of positions fact was read from the device (`ops._remembered`'s misses)."""
    reads = collections.Counter()
    remembered = ops._remembered
    monkeypatch.setattr(ops, "_remembered", lambda kind, q_pos, k_pos, question, read: remembered(
        kind, q_pos, k_pos, question, lambda: reads.update([kind]) or read()))
    return reads


@pytest.mark.parametrize("policy, scorer, padded", [("cache_topk", "reconstruct", False),
                                                    ("cache_topk", "reconstruct", True),
                                                    ("entropy", "reconstruct", False), ("uniform", "window", False)])
def test_a_prefill_reads_its_positions_layout_from_the_device_once(policy, scorer, padded, monkeypatch):
    """Reading the positions' layout (unpadded? each row's tokens?) waits for the device: the ops read it for the
    first layer and reuse it for the others (the graph pass hands every layer one positions tensor), so a
    prefill's waits do not grow with its layers (a left-padded batch's segments still ask per layer). Under
    inference mode (no version counters) every layer reads again, with the same tokens."""
    reads = counted_reads(monkeypatch)
    model = entropykv_fx.optimize(tiny_model("llama"), policy=policy, scorer=scorer, budget=0.5, reconstruct_chunk=8)
    assert model.config.num_hidden_layers >= 2
    ids, mask = left_padded([random_prompt(21, seed=2)[0], random_prompt(15, seed=3)[0]]) if padded else \
        (random_prompt(21, seed=2), None)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True).logits
    # a left-padded batch's segments go through position-checked attention, which asks about slices of them
    # (on CUDA a short prompt's attention runs a kernel that masks by position: nothing to read)
    asked = [reads["prompt_layout"]] if padded else list(reads.values())
    assert max(asked, default=0) <= 1, f"{dict(reads)} for {model.config.num_hidden_layers} layers"
    assert reads["prompt_layout"] == (scorer == "reconstruct")
    with torch.inference_mode():
        again = model(ids, attention_mask=mask, use_cache=True).logits
    torch.testing.assert_close(again, out)
    assert not any(asked) or max(reads.values()) > 1


def test_positions_changed_in_place_are_read_again(monkeypatch):
    reads = counted_reads(monkeypatch)
    q, k, v, pos = reconstruction_batch([9, 9], 2, chunk=4)
    first = ops.attention_reconstruction(q, k, v, pos, pos, 0.3, 0, 2, 4)
    assert torch.equal(ops.attention_reconstruction(q, k, v, pos, pos, 0.3, 0, 2, 4)[0], first[0])
    assert reads["prompt_layout"] == 1
    pos[:, :9] = torch.arange(9).flip(0)  # the same tensor, changed in place: another prompt's layout
    ops.attention_reconstruction(q, k, v, pos, pos, 0.3, 0, 2, 4)
    assert reads["prompt_layout"] == 2


def test_a_reconstruction_past_the_trained_positions_warns_before_the_forward():
    """A repetition whose last chunk reaches past max_position_embeddings: a PositionRangeWarning naming the lengths
    and the chunk that would fit, raised before the forward runs; prompts whose repetition fits run without it."""
    import warnings

    from entropykv_fx import PositionRangeWarning

    model = tiny_model("llama")
    model.config.max_position_embeddings = 150
    entropykv_fx.optimize(model, policy="cache_topk", scorer="reconstruct", budget=0.5, repeat_prompt=(5, 6, 7),
                          reconstruct_chunk=32)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionRangeWarning)
        greedy(model, random_prompt(71), 2)  # its last chunk (7 tokens) reaches 71 + 3 + 7 = 81 positions
        model(random_prompt(120), use_cache=True)  # 120 + 3 + 24
    with pytest.warns(PositionRangeWarning, match=r"140-token prompt in chunks of 32 .*repeat prompt: 3.*position "
                      r"154.*max_position_embeddings=150.*reconstruct_chunk=7 or less"):
        model(random_prompt(140), use_cache=True)
    with pytest.warns(PositionRangeWarning, match=r"150-token prompt.*choose a scorer without repetition"):
        model(random_prompt(150), use_cache=True)
    # the shorter row reaches further (128 + 3 + 32 against 130 + 3 + 2)
    ids, mask = left_padded([random_prompt(128, seed=2)[0], random_prompt(130, seed=3)[0]])
    with pytest.warns(PositionRangeWarning, match=r"128-token prompt.*position 162.*reconstruct_chunk=17 or less"):
        model(ids, attention_mask=mask, use_cache=True)
    forwards = []
    model.lm_head.register_forward_pre_hook(lambda *_: forwards.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", PositionRangeWarning)
        with pytest.raises(PositionRangeWarning):
            model(random_prompt(140), use_cache=True)
    assert forwards == []  # raised as an error, the warning stopped the call before the forward
    model(random_prompt(60), use_cache=True)
    assert forwards == [1]


def test_each_chunks_scores_are_the_unmodified_models_attention_while_it_repeats_that_chunk():
    """The whole path (layout, positions, rotary embeddings, the rewritten graph) against the model's own eager
    attention: for each chunk, a forward of [prompt up to the chunk's end, repeat prompt, chunk] through the
    unmodified model, whose attention probabilities from the chunk's queries to the prompt's tokens, maxed over
    those queries and each KV head's query heads and then over the chunks, are the layer's scores."""
    ids = random_prompt(45, seed=4)
    chunk, repeat = 16, (5, 6)
    full, _ = scored_prefill(tiny_model("llama"), ids, EntropyKVConfig(scorer="reconstruct", repeat_prompt=repeat,
                                                                       reconstruct_chunk=chunk))
    plain = tiny_model("llama")
    plain.set_attn_implementation("eager")
    hkv = full.layers[0].keys.shape[1]
    want = torch.zeros(len(full.layers), hkv, ids.shape[1], dtype=torch.float64)
    for start in range(0, ids.shape[1], chunk):
        end = min(start + chunk, ids.shape[1])
        seq = torch.cat([ids[0, :end], torch.tensor(repeat, device=DEVICE), ids[0, start:end]])[None]
        with torch.no_grad():
            attentions = plain(seq, output_attentions=True).attentions  # per layer [1, Hq, T, T]
        for i, a in enumerate(attentions):
            got = a[0, :, end + len(repeat):, :end].unflatten(0, (hkv, -1)).amax(dim=(1, 2)).double().cpu()
            want[i, :, :end] = torch.maximum(want[i, :, :end], got)
    for i, layer in enumerate(full.layers):
        torch.testing.assert_close(layer.stats.kv_scores[0].double().cpu(), want[i], atol=1e-5, rtol=1e-5)
