"""What the ONNX Runtime and TensorRT runners share: layout loading, cache buffers and the greedy loop.

Both run the exported prefill/decode pair with preallocated buffers: the logits, and two sets of cache tensors
that decode steps alternate between (a step reads one set and writes the other, since neither runtime may
alias an input with an output), so no step allocates cache memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..exported import ExportLayout, check_new_tokens, left_padded, program_files, read_layout


def load_layout(runner: str, directory: Path, fmt: str, trust_code: bool = False) -> tuple[ExportLayout, list[Path]]:
    """The validated layout.json of an exporter's directory and the verified paths of its `fmt` programs
    (`exported.read_layout`, `exported.program_files`)."""
    layout = read_layout(directory)
    return layout, program_files(directory, layout, fmt, runner, trust_code)


def cache_shapes(layout: ExportLayout) -> list[tuple[tuple[int, ...], bool]]:
    """(shape, holds positions) of each cache tensor in the programs' flat order: per layer key, value, positions."""
    b, heads, dim = layout.batch, layout.kv_heads, layout.head_dim
    return [spec for c in layout.capacities
            for spec in (((b, heads, c, dim), False), ((b, heads, c, dim), False), ((b, c), True))]


class BufferedGenerator:
    """Greedy loop over prefill/decode runs that read and write preallocated torch buffers on `device`.

    Subclasses implement `_prefill` and `_decode`; the cache holds the layout's dtype, positions int64."""

    name = "BufferedGenerator"

    def __init__(self, layout: ExportLayout, device: torch.device, pad_token_id: int) -> None:
        self.layout, self.device, self.pad_token_id = layout, device, pad_token_id
        dtype = getattr(torch, layout.dtype)
        self._caches = tuple([torch.empty(shape, dtype=torch.int64 if positions else dtype, device=device)
                              for shape, positions in cache_shapes(layout)] for _ in range(2))
        self._logits = torch.empty(layout.batch, layout.vocab_size, dtype=dtype, device=device)

    def _prefill(self, ids: Tensor, positions: Tensor, cache: list[Tensor]) -> None:
        raise NotImplementedError

    def _decode(self, token: Tensor, position: Tensor, step: int, cache: list[Tensor], out: list[Tensor]) -> None:
        raise NotImplementedError

    def generate(self, input_ids, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of an unpadded prompt batch [B, n] (numpy or tensor); returns [B, max_new_tokens].
        InputError before the prefill runs, as `ExportedGenerator.generate`."""
        check_new_tokens(self.name, max_new_tokens, self.layout)
        ids, positions = (t.to(self.device) for t in left_padded(self.name, input_ids, self.layout, self.pad_token_id))
        current, spare = self._caches
        self._prefill(ids, positions, current)
        token = self._logits.argmax(-1, keepdim=True)
        new, position = [token], positions[:, -1:] + 1
        for step in range(max_new_tokens - 1):
            self._decode(token, position, step, current, spare)
            current, spare = spare, current
            token = self._logits.argmax(-1, keepdim=True)
            new.append(token)
            position = position + 1
        return torch.cat(new, 1).cpu().numpy()
