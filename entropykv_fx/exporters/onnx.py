"""ONNX export of the rewritten prefill/decode programs, and greedy generation with ONNX Runtime.

    export_onnx(model, "out/", prompt_length=512, max_new_tokens=64)   # model optimized with calibrated budgets
    tokens = OrtGenerator("out/").generate(input_ids, max_new_tokens=64)

The programs are those of `entropykv_fx.export` (`aot.build_programs`), lowered to plain torch
(`passes.decompose`) and translated by `torch.onnx.export`, so the graphs hold standard ONNX ops only.
I/O names follow onnxruntime-genai / optimum: per layer i the compressed cache is `past_key_values.{i}.key|value`
`[B, Hkv, C_i, D]` plus `past_key_values.{i}.positions` `[B, C_i]` in, `present.{i}.*` out.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops
from ..aot import build_programs
from ..exported import check_new_tokens, left_pad_count
from ..passes.decompose import decompositions

OPSET = 18
TENSOR_KINDS = ("key", "value", "positions")
_NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16}  # what the runner's cache buffers can hold


def select_with_topk(scores: Tensor, k_pos: Tensor, budget: int, sink_tokens: int, window: int) -> Tensor:
    """`entropykv::select` without sort, which ONNX lacks: TopK with a static k picks the kept slots, a second
    TopK puts them back in temporal order. ONNX TopK breaks ties by lower index, as the reference's stable sort."""
    ranked = ops.selection_ranks(scores, k_pos, sink_tokens, window)
    kept = torch.topk(ranked, min(budget, scores.shape[-1]), dim=-1).indices
    # Ordered as floats: TensorRT's TopK takes no int64, and slot indices are exact in float32.
    return torch.topk(kept.float(), kept.shape[-1], dim=-1, largest=False).values.long()


def io_names(num_layers: int) -> dict:
    """Input and output names of both graphs, in the programs' flat order."""
    def cache(prefix: str) -> list[str]:
        return [f"{prefix}.{i}.{kind}" for i in range(num_layers) for kind in TENSOR_KINDS]

    return {"prefill": {"inputs": ["input_ids", "positions"], "outputs": ["logits", *cache("present")]},
            "decode": {"inputs": ["input_ids", "positions", "step", *cache("past_key_values")],
                       "outputs": ["logits", *cache("present")]}}


def export_onnx(model: nn.Module, out_dir: str | Path, *, prompt_length: int, max_new_tokens: int,
                batch: int = 1) -> Path:
    """Write `prefill.onnx`, `decode.onnx` (weights as external data) and `layout.json`; returns the layout path.
    Same preconditions and errors as `entropykv_fx.export` (an optimized model with calibrated budgets)."""
    programs = build_programs(model, prompt_length=prompt_length, max_new_tokens=max_new_tokens, batch=batch)
    return write_onnx(*programs, out_dir)


def write_onnx(prefill: torch.export.ExportedProgram, decode: torch.export.ExportedProgram, layout: dict,
               out_dir: str | Path) -> Path:
    """Translate programs from `aot.build_programs` to ONNX files in `out_dir`; returns the layout path."""
    if layout["dtype"] not in _NUMPY_DTYPES:
        raise ValueError(f"export_onnx: cache dtype {layout['dtype']} has no numpy equivalent for ONNX Runtime; "
                         f"optimize a model in one of {sorted(_NUMPY_DTYPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    names = io_names(layout["num_layers"])
    table = decompositions()
    table[torch.ops.entropykv.select.default] = select_with_topk
    for name, program in (("prefill", prefill), ("decode", decode)):
        torch.onnx.export(program.run_decompositions(table), f=out / f"{name}.onnx", dynamo=True, external_data=True,
                          opset_version=OPSET, input_names=names[name]["inputs"],
                          output_names=names[name]["outputs"], verbose=False)
    layout = {**layout, "programs": {"onnx": ["prefill.onnx", "decode.onnx"]}, "onnx": {"opset": OPSET, **names}}
    path = out / "layout.json"
    path.write_text(json.dumps(layout, indent=1))
    return path


class OrtGenerator:
    """Greedy generation with an exported ONNX pair on ONNX Runtime's CPU provider.

    The cache lives in two preallocated sets of numpy buffers bound with IOBinding: each decode step reads one
    set and writes the other (ORT may not alias an input with an output), so no step allocates cache memory."""

    def __init__(self, directory: str | Path, pad_token_id: int = 0) -> None:
        import onnxruntime as ort

        self.dir = Path(directory)
        layout_path = self.dir / "layout.json"
        if not layout_path.is_file():
            raise FileNotFoundError(f"{layout_path} not found: not a directory written by an entropykv_fx exporter")
        self.layout = json.loads(layout_path.read_text())
        files = self.layout["programs"].get("onnx")
        if not files:
            raise ValueError(f"OrtGenerator: no ONNX programs here ({self.dir}); available: "
                             f"{[k for k, v in self.layout['programs'].items() if v]}")
        self.prefill, self.decode = (ort.InferenceSession(str(self.dir / f), providers=["CPUExecutionProvider"])
                                     for f in files)
        self.pad_token_id = pad_token_id
        self._caches = (self._cache_buffers(), self._cache_buffers())
        self._logits = np.empty((self.layout["batch"], self.layout["vocab_size"]), _NUMPY_DTYPES[self.layout["dtype"]])

    def _cache_buffers(self) -> list[np.ndarray]:
        b, heads, dim = self.layout["batch"], self.layout["kv_heads"], self.layout["head_dim"]
        dtype = _NUMPY_DTYPES[self.layout["dtype"]]
        return [buffer for c in self.layout["capacities"] for buffer in
                (np.empty((b, heads, c, dim), dtype), np.empty((b, heads, c, dim), dtype), np.empty((b, c), np.int64))]

    def _bind_outputs(self, binding, graph: str, cache: list[np.ndarray]) -> None:
        for name, array in zip(self.layout["onnx"][graph]["outputs"], (self._logits, *cache)):
            binding.bind_output(name, "cpu", 0, array.dtype, array.shape, array.ctypes.data)

    def generate(self, input_ids, max_new_tokens: int) -> np.ndarray:
        """Greedy continuation of an unpadded prompt batch [B, n] (numpy or CPU tensor); returns [B, max_new_tokens]."""
        check_new_tokens("OrtGenerator", max_new_tokens, self.layout)
        ids = np.asarray(input_ids, dtype=np.int64)
        pad = left_pad_count("OrtGenerator", ids.shape, self.layout)
        ids = np.pad(ids, ((0, 0), (pad, 0)), constant_values=self.pad_token_id)
        positions = np.broadcast_to(np.maximum(np.arange(ids.shape[1]) - pad, -1), ids.shape).copy()

        binding = self.prefill.io_binding()
        for name, array in zip(("input_ids", "positions"), (ids, positions)):
            binding.bind_cpu_input(name, array)
        current, spare = self._caches
        self._bind_outputs(binding, "prefill", current)
        self.prefill.run_with_iobinding(binding)

        token = self._logits.argmax(-1, keepdims=True)
        new, position = [token], positions[:, -1:] + 1
        inputs = self.layout["onnx"]["decode"]["inputs"]
        for step in range(max_new_tokens - 1):
            binding = self.decode.io_binding()
            for name, array in zip(inputs, (token, position, np.array(step, np.int64), *current)):
                binding.bind_cpu_input(name, array)
            self._bind_outputs(binding, "decode", spare)
            self.decode.run_with_iobinding(binding)
            current, spare = spare, current
            token = self._logits.argmax(-1, keepdims=True)
            new.append(token)
            position = position + 1
        return np.concatenate(new, 1)
