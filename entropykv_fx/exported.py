"""Run programs written by `entropykv_fx.export` (needs torch only: no transformers, no model code).

    gen = ExportedGenerator("out/", kind="aoti")          # or kind="pt2" (needs `import entropykv_fx.ops`)
    tokens = gen.generate(input_ids, max_new_tokens=32)  # greedy
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor


def check_new_tokens(runner: str, max_new_tokens: int, layout: dict) -> None:
    if not 1 <= max_new_tokens <= layout["max_new_tokens"]:
        raise ValueError(f"{runner}: max_new_tokens must be in 1..{layout['max_new_tokens']} "
                         f"(the exported cache capacity), got {max_new_tokens}")


def left_pad_count(runner: str, shape: tuple[int, ...], layout: dict) -> int:
    """How many pad tokens an unpadded prompt batch of `shape` needs to fill the exported prompt length."""
    length, batch = layout["prompt_length"], layout["batch"]
    if len(shape) != 2 or shape[0] != batch or shape[1] > length:
        raise ValueError(f"{runner}: input_ids must be [{batch}, <= {length}] (the exported batch and "
                         f"prompt length), got {tuple(shape)}")
    return length - shape[1]


def left_padded(runner: str, input_ids, layout: dict, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """An unpadded prompt batch (tensor or array) left-padded to the exported prompt length, and its positions
    (-1 on padding), both int64 on the CPU."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    pad = left_pad_count(runner, tuple(ids.shape), layout)
    ids = torch.nn.functional.pad(ids, (pad, 0), value=pad_token_id)
    positions = (torch.arange(ids.shape[1]) - pad).clamp(min=-1)
    return ids, positions.expand(ids.shape[0], -1).contiguous()


class ExportedGenerator:
    """Greedy generation with an exported prefill/decode pair and its compressed cache layout."""

    def __init__(self, directory: str | Path, kind: str = "aoti", pad_token_id: int = 0) -> None:
        self.dir = Path(directory)
        layout_path = self.dir / "layout.json"
        if not layout_path.is_file():
            raise FileNotFoundError(f"{layout_path} not found: not a directory written by entropykv_fx.export")
        self.layout = json.loads(layout_path.read_text())
        files = self.layout["programs"].get(kind)
        if not files:
            raise ValueError(f"ExportedGenerator: kind={kind!r} was not exported here; available: "
                             f"{[k for k, v in self.layout['programs'].items() if v]}")
        if kind == "aoti":
            self.prefill, self.decode = (torch._inductor.aoti_load_package(str(self.dir / f)) for f in files)
        elif kind == "pt2":
            from . import ops  # noqa: F401  (the programs call the entropykv ops)

            self.prefill, self.decode = (torch.export.load(self.dir / f).module() for f in files)
        else:
            raise ValueError(f"ExportedGenerator: kind must be 'aoti' or 'pt2', got {kind!r}")
        self.pad_token_id = pad_token_id

    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation of an unpadded prompt batch [B, n]; returns the new tokens [B, max_new_tokens]."""
        check_new_tokens("ExportedGenerator", max_new_tokens, self.layout)
        device = torch.device(self.layout["device"])
        ids, positions = (t.to(device) for t in left_padded("ExportedGenerator", input_ids, self.layout,
                                                             self.pad_token_id))
        with torch.no_grad():
            logits, *cache = self.prefill(ids, positions)
            token = logits.argmax(-1, keepdim=True)
            new, position = [token], positions[:, -1:] + 1
            for step in range(max_new_tokens - 1):
                logits, *cache = self.decode(token, position, torch.tensor(step, device=device), *cache)
                token = logits.argmax(-1, keepdim=True)
                new.append(token)
                position = position + 1
        return torch.cat(new, 1)
