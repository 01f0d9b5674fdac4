"""The decode-step cache write kernel vs `entropykv::write_in_place` (its reference); opcheck: test_opcheck.py."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_testing import DEVICE, DTYPES, GPU, randn, seed

from entropykv_fx import kernels, ops


def write_both(positions, dtype, h=3, dk=16, dv=8):
    """(kernel's keys, values, positions; reference's) after one write into copies of the same buffers."""
    b, s = positions.shape
    keys, values = randn(b, h, s, dk, dtype=dtype), randn(b, h, s, dv, dtype=dtype)
    k_new, v_new = randn(b, h, 1, dk, dtype=dtype), randn(b, h, 1, dv, dtype=dtype)
    new_pos = positions.max(-1, keepdim=True).values.clamp(min=0) + 1
    ref = [t.cpu().clone() for t in (keys, values, positions)]
    ops.write_in_place(*ref, k_new.cpu(), v_new.cpu(), new_pos.cpu(), 0)
    got = [keys, values, positions.clone()]
    kernels.write_in_place(*got, k_new, v_new, new_pos, 0)
    return got, ref


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 3), s=st.integers(1, 40), dtype=st.sampled_from(DTYPES), data=st.data())
def test_write_matches_the_reference(b, s, dtype, data):
    """Random positions with empty slots (-1), repeats and ties: the same slot chosen (the first of equal
    minima), the same bytes written, nothing else touched."""
    rows = [data.draw(st.lists(st.integers(-1, 8), min_size=s, max_size=s)) for _ in range(b)]
    seed("write", b, s, dtype, rows)
    got, ref = write_both(torch.tensor(rows, device=DEVICE), dtype)
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)


@pytest.mark.parametrize("s", [1023, 1025, 5000] + ([33000] if GPU else []))
def test_write_across_search_blocks(s):
    """Caches longer than one search block (1024 slots): the lowest slot found in any block, ties across blocks."""
    seed("write blocks", s)
    positions = torch.arange(s, device=DEVICE).repeat(2, 1) + 5
    positions[0, s - 1] = positions[0, 1030 % s] = 0  # two minima: the earlier wins
    positions[1, s // 2] = -1
    got, ref = write_both(positions, torch.float32, h=8, dk=128, dv=128)
    for g, r in zip(got, ref):
        assert torch.equal(g.cpu(), r)

