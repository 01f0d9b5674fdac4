"""The entropykv ops against independent float64 references, opcheck, edge cases and input errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import DEVICE

from entropykv_fx import ops

TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
SHAPES = [  # B, Hq, Hkv, L, S, D
    (1, 1, 1, 1, 1, 16), (2, 4, 2, 5, 7, 16), (2, 6, 2, 9, 33, 64), (1, 4, 4, 3, 40, 32),
]


def positions(b: int, n: int, pads: list[int], start: int = 0) -> torch.Tensor:
    """[b, n] positions start.. with the first pads[i] slots of row i marked -1 (left padding)."""
    pos = torch.arange(start, start + n).repeat(b, 1)
    for i, p in enumerate(pads):
        pos[i, :p] = -1
        pos[i, p:] -= p
    return pos.to(DEVICE)


def inputs(shape, dtype, pads=None, seed=0):
    b, hq, hkv, length, s, d = shape
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, n, d, generator=g).to(DEVICE, dtype) for h, n in ((hq, length), (hkv, s), (hkv, s)))
    pads = pads or [0] * b
    k_pos = positions(b, s, pads)
    q_pos = k_pos[:, -length:] if length <= s else positions(b, length, pads)
    return q, k, v, q_pos, k_pos


def ref_probs(q, k, q_pos, k_pos, scale, window):
    """float64 softmax probabilities [B, Hq, L, S] over the visible slots, built with explicit loops over GQA."""
    group = q.shape[1] // k.shape[1]
    kk = k.double().repeat_interleave(group, dim=1)
    logits = (q.double() @ kk.transpose(-1, -2)) * scale
    qp, kp = q_pos[:, None, :, None], k_pos[:, None, None, :]
    seen = (kp >= 0) & (qp >= 0) & (kp <= qp)
    if window:
        seen &= qp - kp < window
    p = torch.softmax(logits.masked_fill(~seen, float("-inf")), -1).nan_to_num(0.0)
    return p, seen


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("window", [0, 4])
def test_attention_matches_reference(shape, dtype, window):
    pads = [0, 2][: shape[0]]
    q, k, v, q_pos, k_pos = inputs(shape, dtype, pads, seed=shape[4] + window)
    scale = q.shape[-1] ** -0.5
    out = ops.attention(q, k, v, q_pos, k_pos, scale, window)
    p, _ = ref_probs(q, k, q_pos, k_pos, scale, window)
    expected = p @ v.double().repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    assert out.dtype == dtype and out.shape == expected.shape
    err = (out.double() - expected).norm() / expected.norm().clamp(min=1e-12)
    assert err < TOL[dtype] * 10, f"relative error {err:.2e}"


def test_attention_query_that_sees_nothing_returns_zeros():
    q, k, v, q_pos, k_pos = inputs((2, 2, 1, 4, 4, 16), torch.float32, pads=[0, 2])
    out = ops.attention(q, k, v, q_pos, k_pos, 0.25, 0)
    assert torch.equal(out[1, :, :2], torch.zeros_like(out[1, :, :2]))  # pad queries of row 1
    assert out[1, :, 2:].abs().sum() > 0 and torch.isfinite(out).all()


def test_attention_fast_paths_equal_masked_path():
    """Unpadded prefill (causal) and full-visibility decode take SDPA shortcuts: same numbers as the masked form."""
    q, k, v, q_pos, k_pos = inputs((1, 4, 2, 12, 12, 16), torch.float32)
    p, _ = ref_probs(q, k, q_pos, k_pos, 0.25, 0)
    expected = p @ v.double().repeat_interleave(2, dim=1)
    torch.testing.assert_close(ops.attention(q, k, v, q_pos, k_pos, 0.25, 0).double(), expected, atol=1e-5, rtol=1e-5)
    last = q_pos[:, -1:]
    out = ops.attention(q[:, :, -1:], k, v, last, k_pos, 0.25, 0)
    torch.testing.assert_close(out.double(), expected[:, :, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("window", [0, 5])
def test_score_matches_reference(shape, dtype, window):
    pads = [0, 3][: shape[0]]
    q, k, _, q_pos, k_pos = inputs(shape, dtype, pads, seed=7 + shape[4])
    scale = q.shape[-1] ** -0.5
    entropy, kv_scores, layer_scores = ops.score(q, k, q_pos, k_pos, scale, window)
    p, seen = ref_probs(q, k, q_pos, k_pos, scale, window)
    valid_q = seen.any(-1)  # [B, 1, L]
    ent = -(p * p.clamp(min=1e-300).log()).sum(-1) * valid_q
    exp_entropy = ent.sum(-1) / valid_q.sum(-1).clamp(min=1)
    b, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
    exp_kv = p.sum(2).reshape(b, hkv, hq // hkv, -1).sum(2)
    tol = TOL[dtype] * 20
    for got, exp in ((entropy, exp_entropy), (kv_scores, exp_kv), (layer_scores, exp_kv.sum(1))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), exp, atol=tol, rtol=tol)
    # Each valid window query distributes probability 1 over the slots, per query head.
    torch.testing.assert_close(layer_scores.sum(-1).double(), (valid_q.sum(-1) * hq).double().squeeze(1), atol=1e-3, rtol=1e-3)


def test_score_entropy_of_uniform_attention_is_log_n():
    n = 50
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)  # zero query: uniform attention over the visible keys
    k = torch.randn(1, 1, n, 16, device=DEVICE)
    pos = positions(1, n, [0])
    entropy, _, layer_scores = ops.score(q, k, pos[:, -1:], pos, 0.25, 0)
    torch.testing.assert_close(entropy, torch.full_like(entropy, torch.log(torch.tensor(float(n))).item()))
    torch.testing.assert_close(layer_scores, torch.full_like(layer_scores, 2.0 / n))


def ref_select(scores, k_pos, budget, sinks, window):
    """Python reference: forced slots first, then by score descending, ties to the earlier slot; pads last."""
    out = []
    for row_scores, row_pos in zip(scores.tolist(), k_pos.tolist()):
        last = max(row_pos)
        def key(j):
            p = row_pos[j]
            rank = 2 if p >= 0 and (p < sinks or p > last - window) else (1 if p >= 0 else 0)
            return (-rank, -row_scores[j] if rank == 1 else 0.0, j)
        out.append(sorted(sorted(range(len(row_pos)), key=key)[: min(budget, len(row_pos))]))
    return out


@pytest.mark.parametrize("s,budget,sinks,window", [(20, 8, 2, 3), (20, 20, 2, 3), (20, 50, 0, 1), (1, 1, 4, 1),
                                                   (33, 12, 4, 4), (9, 5, 0, 0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_select_matches_reference(s, budget, sinks, window, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (2, s), generator=g).float().to(DEVICE)  # few distinct values: many ties
    k_pos = positions(2, s, [0, min(3, s - 1)])
    idx = ops.select(scores, k_pos, budget, sinks, window)
    assert idx.shape == (2, min(budget, s)) and idx.dtype == torch.int64
    assert idx.tolist() == ref_select(scores.cpu(), k_pos.cpu(), budget, sinks, window)


def test_select_per_head_and_forced_tokens():
    scores = torch.rand(1, 3, 30, device=DEVICE)
    scores[:, :, 10] = 100.0  # a clear winner in every head
    k_pos = positions(1, 30, [0])
    idx = ops.select(scores, k_pos, 10, 2, 4)
    assert idx.shape == (1, 3, 10)
    for row in idx[0].tolist():
        assert row == sorted(row) and {0, 1, 10, 26, 27, 28, 29} <= set(row)


def test_select_never_takes_pads_when_enough_real_tokens():
    scores = torch.zeros(1, 12, device=DEVICE)
    scores[0, :5] = 10.0  # pads score highest but must lose
    k_pos = positions(1, 12, [5])
    assert (k_pos.gather(1, ops.select(scores, k_pos, 6, 1, 2)) >= 0).all()


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("dtype", list(TOL))
def test_gather_matches_index_loops(per_head, dtype):
    k = torch.randn(2, 3, 10, 8).to(DEVICE, dtype)
    v = torch.randn(2, 3, 10, 4).to(DEVICE, dtype)
    shape = (2, 3, 5) if per_head else (2, 5)
    idx = torch.stack([torch.randperm(10)[:5].sort().values for _ in range(shape[0] * (3 if per_head else 1))])
    idx = idx.reshape(shape).to(DEVICE)
    kk, vv = ops.gather(k, v, idx)
    assert kk.shape == (2, 3, 5, 8) and vv.shape == (2, 3, 5, 4)
    for b in range(2):
        for h in range(3):
            rows = idx[b, h] if per_head else idx[b]
            for j, src in enumerate(rows.tolist()):
                assert torch.equal(kk[b, h, j], k[b, h, src]) and torch.equal(vv[b, h, j], v[b, h, src])


def opcheck_cases():
    q, k, v, q_pos, k_pos = inputs((2, 4, 2, 3, 9, 16), torch.float32, [0, 2])
    return [
        (torch.ops.entropykv.attention.default, (q, k, v, q_pos, k_pos, 0.25, 0)),
        (torch.ops.entropykv.attention.default, (q.half(), k.half(), v.half(), q_pos, k_pos, 0.25, 4)),
        (torch.ops.entropykv.score.default, (q, k, q_pos, k_pos, 0.25, 0)),
        (torch.ops.entropykv.select.default, (torch.rand(2, 9, device=DEVICE), k_pos, 4, 1, 2)),
        (torch.ops.entropykv.select.default, (torch.rand(2, 2, 9, device=DEVICE), k_pos, 20, 1, 2)),
        (torch.ops.entropykv.gather.default, (k, v, torch.tensor([[0, 3, 8], [2, 4, 5]], device=DEVICE))),
        (torch.ops.entropykv.gather.default, (k, v, torch.randint(0, 9, (2, 2, 4), device=DEVICE))),
    ]


@pytest.mark.parametrize("case", range(len(opcheck_cases())))
def test_opcheck(case):
    op, args = opcheck_cases()[case]
    torch.library.opcheck(op, args)


def test_bad_inputs_name_the_problem():
    q, k, v, q_pos, k_pos = inputs((1, 4, 2, 3, 9, 16), torch.float32)
    with pytest.raises(ValueError, match="dtype mismatch"):
        ops.attention(q, k.half(), v, q_pos, k_pos, 0.25, 0)
    with pytest.raises(ValueError, match="not a multiple of kv heads"):
        ops.attention(q[:, :3], k, v, q_pos, k_pos, 0.25, 0)
    with pytest.raises(ValueError, match="k_pos must be"):
        ops.score(q, k, q_pos, k_pos[:, :4], 0.25, 0)
    with pytest.raises(ValueError, match="must be int64"):
        ops.score(q, k, q_pos.int(), k_pos, 0.25, 0)
    if torch.cuda.is_available():  # a second real device is needed: 'meta' inputs dispatch to the fake impl
        with pytest.raises(ValueError, match="device mismatch"):
            ops.attention(q, k.to("cpu" if DEVICE.type == "cuda" else "cuda"), v, q_pos, k_pos, 0.25, 0)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        ops.select(torch.rand(1, 9), k_pos.cpu(), 0, 1, 1)
    with pytest.raises(ValueError, match="idx must be int64"):
        ops.gather(k, v, torch.zeros(1, 2, dtype=torch.int32, device=DEVICE))
