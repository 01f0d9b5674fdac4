"""ONNX export of the rewritten prefill/decode programs, and greedy generation with ONNX Runtime.

    export_onnx(model, "out/", prompt_length=512, max_new_tokens=64)   # model optimized with calibrated budgets
    tokens = OrtGenerator("out/").generate(input_ids, max_new_tokens=64)

The programs are those of `entropykv_fx.export` (`aot.build_programs`), lowered to plain torch
(`passes.decompose`) and translated by `torch.onnx.export`, so the graphs hold standard ONNX ops only.
I/O names follow onnxruntime-genai / optimum: per layer i the compressed cache is `past_key_values.{i}.key|value`
`[B, Hkv, C_i, D]` plus `past_key_values.{i}.positions` `[B, C_i]` in, `present.{i}.*` out.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import ops
from ..aot import build_programs, check_export
from ..errors import ExportError
from ..exported import ExportLayout, prepare_export_dir, writable_path, write_layout
from ..passes.decompose import decompositions
from .runner import BufferedGenerator, load_layout

OPSET = 18
TENSOR_KINDS = ("key", "value", "positions")
_CACHE_DTYPES = ("float32", "float16")  # those with a numpy equivalent, which IOBinding needs

logger = logging.getLogger("entropykv_fx")
# What an ONNX export writes (weights as external data beside each graph).
ONNX_FILES = ["prefill.onnx", "prefill.onnx.data", "decode.onnx", "decode.onnx.data"]


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
    check_export(model, prompt_length, max_new_tokens, batch)
    prepare_export_dir(out_dir, ONNX_FILES)
    programs = build_programs(model, prompt_length=prompt_length, max_new_tokens=max_new_tokens, batch=batch)
    return write_onnx(*programs, out_dir)


def write_onnx(prefill: torch.export.ExportedProgram, decode: torch.export.ExportedProgram, layout: ExportLayout,
               out_dir: str | Path) -> Path:
    """Translate programs from `aot.build_programs` to ONNX files in `out_dir`; returns the layout path."""
    if layout.dtype not in _CACHE_DTYPES:
        raise ExportError(f"export_onnx: cache dtype {layout.dtype} has no numpy equivalent for ONNX Runtime; "
                         f"optimize a model in one of {_CACHE_DTYPES}")
    out = prepare_export_dir(out_dir, ONNX_FILES)
    names = io_names(layout.num_layers)
    table = decompositions()
    table[torch.ops.entropykv.select.default] = select_with_topk
    for name, program in (("prefill", prefill), ("decode", decode)):
        logger.info("entropykv_fx: translating the %s program to ONNX (%s; minutes for a real model)", name,
                    out / f"{name}.onnx")
        torch.onnx.export(program.run_decompositions(table), f=writable_path(out, f"{name}.onnx"), dynamo=True,
                          external_data=True,
                          opset_version=OPSET, input_names=names[name]["inputs"],
                          output_names=names[name]["outputs"], verbose=False)
    return write_layout(out, replace(layout, programs={"onnx": ("prefill.onnx", "decode.onnx")},
                                     onnx={"opset": OPSET, **names}), companions=ONNX_FILES)


class OrtGenerator(BufferedGenerator):
    """Greedy generation with an exported ONNX pair on ONNX Runtime's CPU provider.

    The cache lives in two preallocated sets of CPU buffers bound with IOBinding: each decode step reads one
    set and writes the other (ORT may not alias an input with an output), so no step allocates cache memory."""

    name = "OrtGenerator"

    def __init__(self, directory: str | Path, pad_token_id: int = 0, threads: int = 0) -> None:
        import onnxruntime as ort

        self.dir = Path(directory)
        layout, files = load_layout(self.name, self.dir, "onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: ORT's default (one per physical core)
        self.prefill, self.decode = (ort.InferenceSession(str(f), options,
                                                          providers=["CPUExecutionProvider"]) for f in files)
        super().__init__(layout, torch.device("cpu"), pad_token_id)

    def _run(self, session, graph: str, inputs: tuple[Tensor, ...], outputs: list[Tensor]) -> None:
        binding = session.io_binding()
        for name, tensor in zip(self.layout.onnx[graph]["inputs"], inputs):
            binding.bind_cpu_input(name, tensor.numpy())
        for name, tensor in zip(self.layout.onnx[graph]["outputs"], (self._logits, *outputs)):
            binding.bind_output(name, "cpu", 0, tensor.numpy().dtype, tuple(tensor.shape), tensor.data_ptr())
        session.run_with_iobinding(binding)

    def _prefill(self, ids: Tensor, positions: Tensor, cache: list[Tensor]) -> None:
        self._run(self.prefill, "prefill", (ids, positions), cache)

    def _decode(self, token: Tensor, position: Tensor, step: int, cache: list[Tensor], out: list[Tensor]) -> None:
        self._run(self.decode, "decode", (token, position, torch.tensor(step), *cache), out)
