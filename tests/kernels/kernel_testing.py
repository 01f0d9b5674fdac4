"""Shared inputs and checks for the kernel tests (see conftest.py for how the device is chosen)."""

from __future__ import annotations

import sys
import zlib

import pytest
import torch

pytest.importorskip("triton")

if "entropykv_fx.kernels" in sys.modules and not torch.cuda.is_available():
    from entropykv_fx.kernels.common import INTERPRET

    if not INTERPRET:
        pytest.skip("the kernels were built before TRITON_INTERPRET=1 was set; run tests/kernels on their own "
                    "or with TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
GPU = DEVICE.type == "cuda"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# ||out - ref|| / ||ref|| of an output stored in each dtype; scores are float32 whatever the input
OUT_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SCORE_TOL = 2e-4


def seed(*parts) -> None:
    torch.manual_seed(zlib.crc32(repr(parts).encode()))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double().cpu(), ref.double().cpu()
    assert not out.isnan().any(), "NaN in the kernel output"
    return ((out - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def prompt_positions(b: int, s: int, pads: list[int]) -> torch.Tensor:
    """[b, s] positions of left-padded prompts: pads[i] slots of -1, then 0, 1, ..."""
    return torch.tensor([[-1] * p + list(range(s - p)) for p in pads], dtype=torch.int64, device=DEVICE)


def compressed_positions(b: int, s: int) -> torch.Tensor:
    """[b, s] positions of a compressed cache: kept positions of a longer prompt, in order; row 1 holds fewer
    tokens and ends in empty (-1) slots, as a batch with different kept lengths does."""
    rows = []
    for i in range(b):
        n = s if i == 0 else max(1, s - 5)
        kept = torch.randperm(2 * s)[:n].sort().values.tolist()
        rows.append(kept + [-1] * (s - n))
    return torch.tensor(rows, dtype=torch.int64, device=DEVICE)


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)

