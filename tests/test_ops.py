"""The entropykv ops against independent plain references, opcheck, edge cases and input errors.

References are written without the library's helpers: visibility masks with explicit loops, softmax and
entropy in float64, selection with Python's sorted(), gathering with index loops.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import DEVICE

from entropykv_fx import ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
ATTN_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}  # (atol = rtol) of the attention output
SCORE_TOL = {torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}  # score computes in float32 for all

SHAPES = [  # B, Hq, Hkv, L, S, D
    (1, 1, 1, 1, 1, 16),  # length 1
    (2, 1, 1, 1, 33, 16),  # decode step
    (2, 4, 2, 7, 7, 16),  # full prefill, GQA 2
    (1, 4, 2, 4, 7, 64),  # window queries over a longer prefix
    (2, 6, 2, 5, 33, 64),  # GQA 3
    (2, 4, 4, 33, 33, 16),  # MHA, long prefill
]
SHAPE_IDS = ["B{}-Hq{}-Hkv{}-L{}-S{}-D{}".format(*s) for s in SHAPES]


def seed(*parts) -> None:
    """A per-test seed that is stable across runs (str hashes are salted per process)."""
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def left_padded(b: int, s: int, pads: list[int]) -> torch.Tensor:
    """[b, s] int64 positions: row i holds pads[i] pads (-1) then 0, 1, ..., s - pads[i] - 1."""
    rows = [[-1] * p + list(range(s - p)) for p in pads]
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def random_inputs(shape, dtype, pads):
    b, hq, hkv, length, s, d = shape
    q = torch.randn(b, hq, length, d, device=DEVICE).to(dtype)
    k = torch.randn(b, hkv, s, d, device=DEVICE).to(dtype)
    v = torch.randn(b, hkv, s, d, device=DEVICE).to(dtype)
    k_pos = left_padded(b, s, pads)
    q_pos = k_pos[:, s - length:]  # the queries are the last `length` tokens
    return q, k, v, q_pos, k_pos


def pads_for(b: int, s: int) -> list[int]:
    """Row 0 unpadded, row 1 left-padded (a shorter prompt) when there is room."""
    return [0, min(3, s - 1)][:b]


def ref_visible(q_pos, k_pos, sliding_window):
    """[B][L][S] python bools, by loops."""
    qp, kp = q_pos.tolist(), k_pos.tolist()
    out = []
    for b in range(len(qp)):
        rows = []
        for i in qp[b]:
            rows.append([j >= 0 and i >= 0 and j <= i and (sliding_window == 0 or i - j < sliding_window)
                         for j in kp[b]])
        out.append(rows)
    return torch.tensor(out, dtype=torch.bool)


def ref_probs(q, k, q_pos, k_pos, scale, sliding_window):
    """float64 probabilities [B, Hq, L, S] by an explicit masked softmax; rows that see nothing are all zero."""
    seen = ref_visible(q_pos.cpu(), k_pos.cpu(), sliding_window)  # [B, L, S]
    q64, k64 = q.cpu().double(), k.cpu().double()
    b, hq, length, _ = q.shape
    group = hq // k.shape[1]
    probs = torch.zeros(b, hq, length, k.shape[2], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            logits = q64[bi, h] @ k64[bi, h // group].T * scale  # [L, S]
            for i in range(length):
                mask = seen[bi, i]
                if not mask.any():
                    continue
                x = logits[i][mask]
                e = torch.exp(x - x.max())
                probs[bi, h, i, mask] = e / e.sum()
    return probs, seen


# --------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sliding_window", [0, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_attention_matches_reference(shape, dtype, sliding_window, padded):
    seed("attention", shape, dtype, sliding_window, padded)
    pads = pads_for(shape[0], shape[4]) if padded else [0] * shape[0]
    q, k, v, q_pos, k_pos = random_inputs(shape, dtype, pads)
    scale = 1 / math.sqrt(shape[-1])
    out = ops.attention(q, k, v, q_pos, k_pos, scale, sliding_window)
    probs, seen = ref_probs(q, k, q_pos, k_pos, scale, sliding_window)
    group = shape[1] // shape[2]
    expected = probs @ v.cpu().double().repeat_interleave(group, dim=1)
    assert out.shape == expected.shape and out.dtype == dtype and out.device == q.device
    tol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), expected, atol=tol, rtol=tol)
    blind = ~seen.any(-1)  # [B, L]: pad queries
    assert torch.equal(out.cpu()[blind.unsqueeze(1).expand(-1, shape[1], -1)].abs().sum(), torch.tensor(0, dtype=dtype))


def test_attention_left_padded_rows_of_different_lengths():
    torch.manual_seed(1)
    s = 12
    q, k, v, _, _ = random_inputs((3, 4, 2, s, s, 16), torch.float32, [0, 0, 0])
    k_pos = left_padded(3, s, [0, 4, 9])
    out = ops.attention(q, k, v, k_pos, k_pos, 0.25, 0)
    probs, _ = ref_probs(q, k, k_pos, k_pos, 0.25, 0)
    expected = probs @ v.cpu().double().repeat_interleave(2, dim=1)
    torch.testing.assert_close(out.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    assert out[1, :, :4].abs().sum() == 0 and out[2, :, :9].abs().sum() == 0  # pad queries -> zeros
    # A padded row equals the same prompt run alone without padding: pads are never attended.
    alone = ops.attention(q[2:, :, 9:], k[2:, :, 9:], v[2:, :, 9:], k_pos[2:, 9:], k_pos[2:, 9:], 0.25, 0)
    torch.testing.assert_close(out[2:, :, 9:], alone, atol=1e-6, rtol=1e-6)


def test_attention_rows_that_see_nothing_are_zero():
    torch.manual_seed(2)
    q, k, v, _, k_pos = random_inputs((2, 2, 1, 1, 6, 16), torch.float32, [0, 0])
    # Row 0 decodes far beyond the sliding window of every cached key; row 1 is a pad query.
    q_pos = torch.tensor([[100], [-1]], device=DEVICE)
    out = ops.attention(q, k, v, q_pos, k_pos, 0.25, 4)
    assert torch.equal(out, torch.zeros_like(out))
    # Keys that are all empty slots: nothing visible either.
    empty = torch.full_like(k_pos, -1)
    out = ops.attention(q, k, v, torch.tensor([[3], [5]], device=DEVICE), empty, 0.25, 0)
    assert torch.equal(out, torch.zeros_like(out)) and torch.isfinite(out).all()


def test_attention_positions_not_slots_define_the_mask():
    """Slots in any order with gaps (a compressed cache): visibility follows the stored positions."""
    torch.manual_seed(3)
    q, k, v, _, _ = random_inputs((1, 2, 2, 2, 6, 16), torch.float32, [0])
    k_pos = torch.tensor([[40, 3, -1, 17, 0, 41]], device=DEVICE)
    q_pos = torch.tensor([[17, 41]], device=DEVICE)
    for sliding_window in (0, 20):
        out = ops.attention(q, k, v, q_pos, k_pos, 0.3, sliding_window)
        probs, seen = ref_probs(q, k, q_pos, k_pos, 0.3, sliding_window)
        torch.testing.assert_close(out.cpu().double(), probs @ v.cpu().double(), atol=1e-5, rtol=1e-5)
    # With the sliding window of 20: position 17 sees 3, 17 and 0; position 41 sees 40 and 41 (not 17: 41 - 17 >= 20).
    assert seen[0, 0].tolist() == [False, True, False, True, True, False]
    assert seen[0, 1].tolist() == [True, False, False, False, False, True]


# --------------------------------------------------------------------------------------------- score
def ref_score(q, k, q_pos, k_pos, scale, sliding_window):
    probs, seen = ref_probs(q, k, q_pos, k_pos, scale, sliding_window)  # full window x S, float64
    b, hq = q.shape[:2]
    hkv, s = k.shape[1], k.shape[2]
    group = hq // hkv
    valid = seen.any(-1)  # [B, L]
    entropy = torch.zeros(b, hq, dtype=torch.float64)
    kv = torch.zeros(b, hkv, s, dtype=torch.float64)
    for bi in range(b):
        n_valid = int(valid[bi].sum())
        for h in range(hq):
            ents = []
            for i in range(q.shape[2]):
                if not valid[bi, i]:
                    continue
                p = probs[bi, h, i]
                p = p[p > 0]
                ents.append(float(-(p * p.log()).sum()))
                kv[bi, h // group] += probs[bi, h, i]
            entropy[bi, h] = sum(ents) / n_valid if n_valid else 0.0
    return entropy, kv, kv.sum(1), valid


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("sliding_window", [0, 3])
@pytest.mark.parametrize("padded", [False, True])
def test_score_matches_reference(shape, dtype, sliding_window, padded):
    seed("score", shape, dtype, sliding_window, padded)
    pads = pads_for(shape[0], shape[4]) if padded else [0] * shape[0]
    q, k, _, q_pos, k_pos = random_inputs(shape, dtype, pads)
    scale = 1 / math.sqrt(shape[-1])
    entropy, kv_scores, layer_scores = ops.score(q, k, q_pos, k_pos, scale, sliding_window)
    exp_entropy, exp_kv, exp_layer, valid = ref_score(q, k, q_pos, k_pos, scale, sliding_window)
    b, hq, hkv, _, s, _ = shape
    assert entropy.shape == (b, hq) and kv_scores.shape == (b, hkv, s) and layer_scores.shape == (b, s)
    tol = SCORE_TOL[dtype]
    for got, exp in ((entropy, exp_entropy), (kv_scores, exp_kv), (layer_scores, exp_layer)):
        assert got.dtype == torch.float32 and got.device == q.device
        torch.testing.assert_close(got.cpu().double(), exp, atol=tol, rtol=tol)
    # Every visible window query spreads probability 1 per query head; pads receive nothing.
    torch.testing.assert_close(layer_scores.sum(-1).cpu().double(), valid.sum(-1).double() * hq, atol=1e-3, rtol=1e-4)
    assert (layer_scores[k_pos < 0] == 0).all()
    assert (entropy >= 0).all() and (entropy.cpu().double() <= math.log(s) + 1e-4).all()


def test_score_uniform_attention_has_entropy_log_n():
    torch.manual_seed(4)
    n = 50
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)  # a zero query attends uniformly to what it sees
    k = torch.randn(1, 1, n, 16, device=DEVICE)
    pos = left_padded(1, n, [0])
    entropy, kv_scores, layer_scores = ops.score(q, k, pos[:, -1:], pos, 0.25, 0)
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(n)))
    torch.testing.assert_close(kv_scores, torch.full_like(kv_scores, 2.0 / n))
    entropy, _, layer_scores = ops.score(q, k, pos[:, -1:], pos, 0.25, 10)  # the window sees 10 tokens
    torch.testing.assert_close(entropy, torch.full_like(entropy, math.log(10)))
    assert (layer_scores[0, :40] == 0).all()


def test_score_padded_rows_and_blind_queries():
    torch.manual_seed(5)
    s, w = 20, 6
    q, k, _, _, _ = random_inputs((3, 4, 2, w, s, 16), torch.float32, [0, 0, 0])
    k_pos = left_padded(3, s, [0, 8, 17])  # row 2 has 3 tokens: half of its window queries are pads
    q_pos = k_pos[:, -w:]
    entropy, kv_scores, layer_scores = ops.score(q, k, q_pos, k_pos, 0.25, 0)
    exp_entropy, exp_kv, _, valid = ref_score(q, k, q_pos, k_pos, 0.25, 0)
    assert valid[2].tolist() == [False] * 3 + [True] * 3
    torch.testing.assert_close(entropy.cpu().double(), exp_entropy, atol=1e-5, rtol=1e-5)  # mean over valid queries
    torch.testing.assert_close(kv_scores.cpu().double(), exp_kv, atol=1e-5, rtol=1e-5)
    assert layer_scores[2].sum().item() == pytest.approx(3 * 4, rel=1e-5)
    # A row whose window queries are all pads scores nothing and has zero entropy.
    q_pos_blind = q_pos.clone()
    q_pos_blind[1] = -1
    entropy, kv_scores, _ = ops.score(q, k, q_pos_blind, k_pos, 0.25, 0)
    assert (entropy[1] == 0).all() and (kv_scores[1] == 0).all() and torch.isfinite(entropy).all()


# --------------------------------------------------------------------------------------------- select
def ref_select_row(scores: list[float], pos: list[int], budget: int, sinks: int, window: int) -> list[int]:
    """Forced (sinks + last window) first, then by (score desc, slot asc), then pads; result ascending."""
    last = max(pos)
    forced = [j for j, p in enumerate(pos) if p >= 0 and (p < sinks or p > last - window)]
    rest = sorted((j for j, p in enumerate(pos) if p >= 0 and j not in forced), key=lambda j: (-scores[j], j))
    pads = [j for j, p in enumerate(pos) if p < 0]
    return sorted((forced + rest + pads)[: min(budget, len(pos))])


def ref_select(scores: torch.Tensor, k_pos: torch.Tensor, budget, sinks, window):
    pos = k_pos.tolist()
    values = scores.float().cpu().tolist()
    if scores.dim() == 2:
        return [ref_select_row(values[b], pos[b], budget, sinks, window) for b in range(len(pos))]
    return [[ref_select_row(row, pos[b], budget, sinks, window) for row in values[b]] for b in range(len(pos))]


SELECT_CASES = [  # S, budget, sinks, window
    (1, 1, 4, 1), (1, 5, 0, 0), (7, 3, 1, 1), (7, 7, 1, 2), (7, 50, 0, 1), (20, 8, 2, 3), (33, 12, 4, 4),
    (33, 5, 0, 0), (33, 6, 4, 4),  # forced slots outnumber the budget
]


@pytest.mark.parametrize("s,budget,sinks,window", SELECT_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True])
def test_select_matches_sorted_reference(s, budget, sinks, window, dtype, per_head):
    torch.manual_seed(s * 1000 + budget * 10 + sinks + window)
    b = 2
    shape = (b, 3, s) if per_head else (b, s)
    scores = torch.randint(0, 5, shape, device=DEVICE).to(dtype) * 0.5 + torch.rand(shape, device=DEVICE).to(dtype) * (
        torch.rand(shape, device=DEVICE) < 0.5)  # a mix of exact ties and distinct values
    k_pos = left_padded(b, s, pads_for(b, s))
    idx = ops.select(scores, k_pos, budget, sinks, window)
    kk = min(budget, s)
    assert idx.shape == (*shape[:-1], kk) and idx.dtype == torch.int64 and idx.device == scores.device
    assert idx.tolist() == ref_select(scores, k_pos, budget, sinks, window)
    flat = idx.reshape(-1, kk)
    assert torch.equal(flat, flat.sort(-1).values) and all(len(set(r)) == kk for r in flat.tolist())


def test_select_budget_at_least_length_returns_everything():
    torch.manual_seed(6)
    k_pos = left_padded(2, 9, [0, 4])
    for budget in (9, 10, 1000):
        idx = ops.select(torch.rand(2, 9, device=DEVICE), k_pos, budget, 1, 1)
        assert idx.tolist() == [list(range(9))] * 2
    idx = ops.select(torch.rand(1, 1, device=DEVICE), left_padded(1, 1, [0]), 3, 0, 1)
    assert idx.tolist() == [[0]]


def test_select_ties_keep_the_earlier_slot():
    torch.manual_seed(7)
    k_pos = left_padded(1, 16, [0])
    equal = torch.full((1, 16), 0.5, device=DEVICE)
    assert ops.select(equal, k_pos, 5, 0, 0).tolist() == [[0, 1, 2, 3, 4]]
    assert ops.select(equal, k_pos, 6, 1, 2).tolist() == [[0, 1, 2, 3, 14, 15]]
    scores = torch.rand(1, 16, device=DEVICE) * 0.1
    scores[0, [11, 5, 8]] = 1.0  # a three-way tie at the top, two places left
    assert ops.select(scores, k_pos, 2, 0, 0).tolist() == [[5, 8]]
    per_head = torch.stack([equal[0], equal[0].flip(-1)])[None]  # identical values in both heads
    assert ops.select(per_head, k_pos, 3, 0, 0).tolist() == [[[0, 1, 2], [0, 1, 2]]]


def test_select_forces_sinks_and_window():
    torch.manual_seed(8)
    s, sinks, window = 30, 3, 5
    scores = torch.rand(2, s, device=DEVICE)
    k_pos = left_padded(2, s, [0, 6])
    scores[:, :sinks + 6] = -1.0  # sinks score worst: still kept
    scores[:, -window:] = -1.0  # so does the window
    scores[:, 15] = 10.0
    idx = ops.select(scores, k_pos, sinks + window + 1, sinks, window)
    kept = k_pos.gather(1, idx).tolist()
    assert kept[0] == [0, 1, 2, 15, 25, 26, 27, 28, 29]
    assert kept[1] == [0, 1, 2, 9, 19, 20, 21, 22, 23]  # positions of the padded row: 24 tokens, 15 -> position 9
    per_head = torch.rand(2, 4, s, device=DEVICE)
    for row in k_pos.gather(1, ops.select(per_head, k_pos, 10, sinks, window).flatten(1)).view(2, 4, 10).tolist():
        for head in row:
            assert {0, 1, 2} <= set(head) and len({p for p in head if p >= max(head) - window + 1}) == window


def test_select_never_takes_pads_when_enough_valid_tokens():
    torch.manual_seed(9)
    s = 24
    k_pos = left_padded(3, s, [0, 10, 20])
    scores = torch.rand(3, s, device=DEVICE)
    scores[k_pos < 0] = 100.0  # pads score highest, yet must lose
    for budget in range(1, s + 1):
        got = k_pos.gather(1, ops.select(scores, k_pos, budget, 1, 2))
        for row, n_valid in zip(got.tolist(), (24, 14, 4)):
            assert sum(p >= 0 for p in row) == min(budget, n_valid)  # pads fill in only past the valid tokens


# --------------------------------------------------------------------------------------------- gather
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("b,h,s,d,kk", [(1, 1, 1, 16, 1), (2, 2, 7, 16, 3), (2, 4, 33, 64, 33), (2, 3, 10, 8, 5)])
def test_gather_matches_index_loops(dtype, per_head, b, h, s, d, kk):
    torch.manual_seed(b * 100 + h * 10 + s + kk)
    k = torch.randn(b, h, s, d, device=DEVICE).to(dtype)
    v = torch.randn(b, h, s, d // 2, device=DEVICE).to(dtype)  # values may have their own head_dim
    rows = [torch.randperm(s)[:kk].sort().values for _ in range(b * (h if per_head else 1))]
    idx = torch.stack(rows).reshape((b, h, kk) if per_head else (b, kk)).to(DEVICE)
    kg, vg = ops.gather(k, v, idx)
    assert kg.shape == (b, h, kk, d) and vg.shape == (b, h, kk, d // 2) and kg.dtype == vg.dtype == dtype
    exp_k, exp_v = torch.empty_like(kg), torch.empty_like(vg)
    for bi in range(b):
        for hi in range(h):
            src = idx[bi, hi] if per_head else idx[bi]
            for j, slot in enumerate(src.tolist()):
                exp_k[bi, hi, j] = k[bi, hi, slot]
                exp_v[bi, hi, j] = v[bi, hi, slot]
    assert torch.equal(kg, exp_k) and torch.equal(vg, exp_v)
    assert kg.is_contiguous() and kg.untyped_storage().nbytes() == kg.numel() * kg.element_size()  # a copy, not a view


def test_select_then_gather_keeps_the_chosen_positions():
    torch.manual_seed(10)
    k = torch.randn(2, 2, 20, 8, device=DEVICE)
    k_pos = left_padded(2, 20, [0, 5])
    idx = ops.select(torch.rand(2, 20, device=DEVICE), k_pos, 8, 2, 3)
    kg, _ = ops.gather(k, k, idx)
    for bi in range(2):
        for j, slot in enumerate(idx[bi].tolist()):
            assert torch.equal(kg[bi, :, j], k[bi, :, slot])


# --------------------------------------------------------------------------------------------- opcheck
def opcheck_cases():
    torch.manual_seed(11)
    cases = []
    for shape, dtype, sliding_window, pads in [((2, 4, 2, 3, 9, 16), torch.float32, 0, [0, 2]),
                                               ((1, 2, 2, 5, 5, 16), torch.float32, 0, [0]),
                                               ((2, 6, 2, 4, 11, 32), torch.float16, 4, [0, 5]),
                                               ((1, 1, 1, 1, 1, 16), torch.bfloat16, 0, [0])]:
        q, k, v, q_pos, k_pos = random_inputs(shape, dtype, pads)
        cases.append(("attention", (q, k, v, q_pos, k_pos, 0.25, sliding_window)))
        cases.append(("score", (q, k, q_pos, k_pos, 0.25, sliding_window)))
        s = shape[4]
        cases.append(("select", (torch.rand(shape[0], s, device=DEVICE).to(dtype), k_pos, 4, 1, 2)))
        cases.append(("select", (torch.rand(shape[0], shape[2], s, device=DEVICE), k_pos, s + 3, 1, 2)))
        kk = max(1, s // 2)
        idx = torch.stack([torch.randperm(s)[:kk].sort().values for _ in range(shape[0])]).to(DEVICE)
        cases.append(("gather", (k, v, idx)))
        cases.append(("gather", (k, v, torch.randint(0, s, (shape[0], shape[2], kk), device=DEVICE))))
    return cases


OPCHECK_IDS = [f"{i}-{name}" for i, (name, _) in enumerate(opcheck_cases())]


@pytest.mark.parametrize("case", range(len(OPCHECK_IDS)), ids=OPCHECK_IDS)
def test_opcheck(case):
    name, args = opcheck_cases()[case]
    torch.library.opcheck(getattr(torch.ops.entropykv, name).default, args)


def test_fake_implementations_give_the_real_shapes():
    torch.manual_seed(12)
    q, k, v, q_pos, k_pos = random_inputs((2, 4, 2, 3, 9, 16), torch.float16, [0, 2])
    meta = [t.to("meta") for t in (q, k, v, q_pos, k_pos)]
    real = ops.attention(q, k, v, q_pos, k_pos, 0.25, 0)
    fake = ops.attention(*meta, 0.25, 0)
    assert fake.shape == real.shape and fake.dtype == real.dtype and fake.device.type == "meta"
    for r, f in zip(ops.score(q, k, q_pos, k_pos, 0.25, 0), ops.score(meta[0], meta[1], *meta[3:], 0.25, 0)):
        assert f.shape == r.shape and f.dtype == r.dtype == torch.float32
    scores = torch.rand(2, 9, device=DEVICE)
    for budget in (1, 4, 9, 30):
        fake = ops.select(scores.to("meta"), meta[4], budget, 1, 1)
        assert fake.shape == ops.select(scores, k_pos, budget, 1, 1).shape == (2, min(budget, 9))
    idx = torch.tensor([[0, 4], [3, 8]], device=DEVICE)
    fk, fv = ops.gather(meta[1], meta[2], idx.to("meta"))
    assert fk.shape == fv.shape == (2, 2, 2, 16)


# --------------------------------------------------------------------------------------------- input errors
def _base():
    torch.manual_seed(13)
    return random_inputs((1, 4, 2, 3, 9, 16), torch.float32, [0])


def test_attention_and_score_reject_bad_inputs():
    q, k, v, q_pos, k_pos = _base()
    cases = [
        ((q, k.half(), v, q_pos, k_pos), "dtype mismatch, q is torch.float32 but k/v is torch.float16"),
        ((q, k, v.bfloat16(), q_pos, k_pos), "dtype mismatch"),
        ((q.double(), k.double(), v.double(), q_pos, k_pos), "dtype torch.float64 not supported"),
        ((q, k.to("meta"), v, q_pos, k_pos), "device mismatch, q on"),
        ((q, k, v, q_pos, k_pos.to("meta")), "k_pos on meta"),
        ((q[0], k, v, q_pos, k_pos), "must be 4-D"),
        ((q, k[:, :, :, :8], v, q_pos, k_pos), "head_dim mismatch q 16 vs k 8"),
        ((q[:, :3], k, v, q_pos, k_pos), "query heads 3 not a multiple of kv heads 2"),
        ((q.expand(2, -1, -1, -1), k, v, q_pos, k_pos), "batch mismatch q 2 vs k 1"),
        ((q, k, v[:, :, :5], q_pos, k_pos), "v shape (1, 2, 5, 16) does not match k (1, 2, 9, 16)"),
        ((q, k, v, q_pos[:, :2], k_pos), "q_pos must be [B, L]=(1, 3), got (1, 2)"),
        ((q, k, v, q_pos, k_pos[:, :4]), "k_pos must be [B, S]=(1, 9), got (1, 4)"),
        ((q, k, v, q_pos.int(), k_pos), "q_pos must be int64, got torch.int32"),
        ((q, k, v, q_pos, k_pos.float()), "k_pos must be int64, got torch.float32"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError) as err:
            ops.attention(*args, 0.25, 0)
        assert message in str(err.value) and "entropykv.attention" in str(err.value)
        if args[2] is v:  # score takes no v
            with pytest.raises(ValueError) as err:
                ops.score(args[0], args[1], *args[3:], 0.25, 0)
            assert message in str(err.value) and "entropykv.score" in str(err.value)


def test_select_rejects_bad_inputs():
    _, _, _, _, k_pos = _base()
    scores = torch.rand(1, 9, device=DEVICE)
    for budget in (0, -3):
        with pytest.raises(ValueError, match=f"budget must be >= 1, got {budget}"):
            ops.select(scores, k_pos, budget, 1, 1)
    with pytest.raises(ValueError, match=r"scores must be \[B, S\] or \[B, H, S\], got \(9,\)"):
        ops.select(scores[0], k_pos, 3, 1, 1)
    with pytest.raises(ValueError, match=r"k_pos \(1, 8\) does not match scores \(1, 9\)"):
        ops.select(scores, k_pos[:, :8], 3, 1, 1)
    with pytest.raises(ValueError, match="sink_tokens and window must be >= 0"):
        ops.select(scores, k_pos, 3, -1, 1)
    with pytest.raises(ValueError, match="sink_tokens and window must be >= 0"):
        ops.select(scores, k_pos, 3, 0, -2)
    with pytest.raises(ValueError, match="k_pos on meta"):
        ops.select(scores, k_pos.to("meta"), 3, 1, 1)


def test_gather_rejects_bad_inputs():
    _, k, v, _, _ = _base()
    idx = torch.tensor([[0, 2, 4]], device=DEVICE)
    with pytest.raises(ValueError, match="idx must be int64, got torch.int32"):
        ops.gather(k, v, idx.int())
    with pytest.raises(ValueError, match="must be on one device"):
        ops.gather(k, v.to("meta"), idx)
    with pytest.raises(ValueError, match="must be on one device"):
        ops.gather(k, v, idx.to("meta"))
    with pytest.raises(ValueError, match=r"must be \[B, H, S, D\]"):
        ops.gather(k, v[:, :, :4], idx)
    with pytest.raises(ValueError, match=r"idx must be \[B, K\] or \[B, H, K\] .*got \(2, 3\)"):
        ops.gather(k, v, idx.expand(2, -1))
    with pytest.raises(ValueError, match=r"got \(1, 3, 3\)"):
        ops.gather(k, v, idx[:, None].expand(-1, 3, -1))  # 3 heads for a 2-head cache


# --------------------------------------------------------------------------------------------- write_in_place
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 12), dtype=st.sampled_from(DTYPES), data=st.data())
def test_write_in_place_writes_each_rows_next_slot(b, s, dtype, data):
    """Row b's entry lands in slot fill[b] % S, whose count moves on for a token and not for a pad (-1) (loop
    reference); nothing else changes and the buffers keep their storage (what a replayed step relies on)."""
    rows = [data.draw(st.lists(st.integers(-1, 40), min_size=s, max_size=s)) for _ in range(b)]
    fills = data.draw(st.lists(st.integers(0, 3 * s), min_size=b, max_size=b))
    pads = data.draw(st.lists(st.booleans(), min_size=b, max_size=b))
    seed("write_in_place", b, s, dtype, rows, fills, pads)
    keys, values = (torch.randn(b, 2, s, 8, device=DEVICE).to(dtype) for _ in range(2))
    positions, fill = torch.tensor(rows, device=DEVICE), torch.tensor(fills, device=DEVICE)
    k_new, v_new = (torch.randn(b, 2, 1, 8, device=DEVICE).to(dtype) for _ in range(2))
    new_pos = torch.tensor([[-1 if pad else 41 + row] for row, pad in enumerate(pads)], device=DEVICE)
    want = [t.clone() for t in (keys, values, positions, fill)]
    for row in range(b):
        slot = fills[row] % s
        want[0][row, :, slot], want[1][row, :, slot] = k_new[row, :, 0], v_new[row, :, 0]
        want[2][row, slot], want[3][row] = new_pos[row, 0], fills[row] + (not pads[row])
    addresses = [t.data_ptr() for t in (keys, values, positions, fill)]
    ops.write_in_place(keys, values, positions, k_new, v_new, new_pos, fill, 0)
    for got, expected in zip((keys, values, positions, fill), want):
        assert torch.equal(got, expected)
    assert [t.data_ptr() for t in (keys, values, positions, fill)] == addresses


def test_write_in_place_opcheck_and_bad_arguments():
    seed("write_in_place opcheck")
    keys, values = torch.randn(2, 2, 6, 8, device=DEVICE), torch.randn(2, 2, 6, 8, device=DEVICE)
    positions = torch.tensor([[0, 1, 2, -1, -1, -1], [0, 1, 2, 3, -1, -1]], device=DEVICE)
    args = (torch.randn(2, 2, 1, 8, device=DEVICE), torch.randn(2, 2, 1, 8, device=DEVICE),
            torch.tensor([[3], [4]], device=DEVICE))
    fill = torch.tensor([3, 4], device=DEVICE)
    torch.library.opcheck(torch.ops.entropykv.write_in_place.default, (keys, values, positions, *args, fill, 0))
    with pytest.raises(ValueError, match="writes one entry per row, got 2"):
        ops.write_in_place(keys, values, positions, *(t.repeat_interleave(2, -2 if t.dim() == 4 else -1)
                                                      for t in args), fill, 0)
    with pytest.raises(ValueError, match=r"fill must be int64 \[2\]"):
        ops.write_in_place(keys, values, positions, *args, fill.int(), 0)


# --------------------------------------------------------------------------------------------- packed heads
def packed_layer(b: int, caps: list[int], d: int, dtype: torch.dtype):
    """keys/values [b, sum(caps), d], positions with empty slots, starts [len(caps) + 1]."""
    t = sum(caps)
    keys, values = (torch.randn(b, t, d, device=DEVICE).to(dtype) for _ in range(2))
    positions = torch.randint(0, 50, (b, t), device=DEVICE)
    positions[torch.rand(b, t, device=DEVICE) < 0.2] = -1
    starts = torch.tensor([0, *torch.tensor(caps).cumsum(0).tolist()], device=DEVICE)
    return keys, values, positions, starts


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), caps=st.lists(st.integers(0, 20), min_size=1, max_size=4), group=st.integers(1, 3),
       window=st.sampled_from([0, 7]), dtype=st.sampled_from(DTYPES))
def test_attention_packed_is_attention_over_each_heads_segment(b, caps, group, window, dtype):
    """Query head g*group.. of KV head h attends exactly h's segment starts[h]..starts[h+1]-1 (loop reference over
    the heads, each through `attention` on its own slots); an empty segment gives zeros."""
    seed("attention_packed", b, caps, group, window, dtype)
    keys, values, positions, starts = packed_layer(b, caps, 8, dtype)
    q = torch.randn(b, group * len(caps), 1, 8, device=DEVICE).to(dtype)
    q_pos = torch.full((b, 1), 50, device=DEVICE)
    got = ops.attention_packed(q, keys, values, q_pos, positions, starts, 0.3, window)
    start = 0
    for h, cap in enumerate(caps):
        rows = slice(h * group, (h + 1) * group)
        seg = slice(start, start + cap)
        if cap:
            want = ops.attention(q[:, rows], keys[:, None, seg], values[:, None, seg], q_pos, positions[:, seg], 0.3,
                                 window)
        else:
            want = torch.zeros_like(got[:, rows])
        torch.testing.assert_close(got[:, rows], want, rtol=ATTN_TOL[dtype], atol=ATTN_TOL[dtype])
        start += cap


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), caps=st.lists(st.integers(1, 6), min_size=1, max_size=4), data=st.data())
def test_write_heads_in_place_writes_each_rows_next_slot_of_each_head(b, caps, data):
    """Row b's entry of head h lands in slot starts[h] + fill[b, h] % caps[h] (loop reference), fill moves on for a
    token and not for a pad; nothing else changes and the buffers keep their storage."""
    fills = data.draw(st.lists(st.lists(st.integers(0, 15), min_size=len(caps), max_size=len(caps)), min_size=b,
                               max_size=b))
    pads = data.draw(st.lists(st.booleans(), min_size=b, max_size=b))
    seed("write_heads_in_place", b, caps, fills, pads)
    keys, values, positions, starts = packed_layer(b, caps, 8, torch.float32)
    fill = torch.tensor(fills, device=DEVICE)
    k_new, v_new = (torch.randn(b, len(caps), 1, 8, device=DEVICE) for _ in range(2))
    new_pos = torch.tensor([[-1 if pad else 60 + row] for row, pad in enumerate(pads)], device=DEVICE)
    want = [t.clone() for t in (keys, values, positions, fill)]
    for row in range(b):
        for h, cap in enumerate(caps):
            slot = int(starts[h]) + fills[row][h] % cap
            want[0][row, slot], want[1][row, slot] = k_new[row, h, 0], v_new[row, h, 0]
            want[2][row, slot], want[3][row, h] = new_pos[row, 0], fills[row][h] + (not pads[row])
    addresses = [t.data_ptr() for t in (keys, values, positions, fill)]
    ops.write_heads_in_place(keys, values, positions, k_new, v_new, new_pos, starts, fill, 0)
    for got, expected in zip((keys, values, positions, fill), want):
        assert torch.equal(got, expected)
    assert [t.data_ptr() for t in (keys, values, positions, fill)] == addresses


def test_packed_ops_opcheck_and_bad_arguments():
    seed("packed opcheck")
    keys, values, positions, starts = packed_layer(2, [5, 0, 9], 8, torch.float32)
    q, q_pos = torch.randn(2, 6, 1, 8, device=DEVICE), torch.full((2, 1), 50, device=DEVICE)
    new = (torch.randn(2, 3, 1, 8, device=DEVICE), torch.randn(2, 3, 1, 8, device=DEVICE))
    fill = torch.tensor([[1, 0, 3], [4, 0, 8]], device=DEVICE)
    torch.library.opcheck(torch.ops.entropykv.attention_packed.default, (q, keys, values, q_pos, positions, starts,
                                                                         0.3, 0))
    room = packed_layer(2, [5, 2, 9], 8, torch.float32)  # writing needs a slot in every segment
    torch.library.opcheck(torch.ops.entropykv.write_heads_in_place.default, (*room[:3], *new, q_pos, room[3], fill, 0))
    torch.library.opcheck(torch.ops.entropykv.packed_cache.default, (keys, values, positions, starts, q_pos, 0))
    dense_k, _ = ops.packed_cache(keys, values, positions, starts, q_pos, 0)
    assert torch.equal(dense_k[:, 2, :9], keys[:, 5:]) and not dense_k[:, 1].any()
    with pytest.raises(ValueError, match="starts must rise from 0 to the 14 packed slots"):
        ops.attention_packed(q, keys, values, q_pos, positions, starts.flip(0), 0.3, 0)
    with pytest.raises(ValueError, match=r"starts must be int64 \[Hkv \+ 1\]"):
        ops.attention_packed(q, keys, values, q_pos, positions, starts.int(), 0.3, 0)
    with pytest.raises(ValueError, match="query heads 6 not a multiple of kv heads 4"):
        ops.attention_packed(q, keys, values, q_pos, positions, torch.cat([starts[:1], starts]), 0.3, 0)
    with pytest.raises(ValueError, match=r"fill must be int64 \[2, 3\]"):
        ops.write_heads_in_place(keys, values, positions, *new, q_pos, starts, fill[:, :2], 0)
