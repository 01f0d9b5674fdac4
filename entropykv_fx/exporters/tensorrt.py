"""TensorRT export of the rewritten prefill/decode programs, through the ONNX graphs of `exporters.onnx`.

    export_tensorrt(model, "out/", prompt_length=512, max_new_tokens=64)   # model optimized with calibrated budgets
    tokens = TrtGenerator("out/").generate(input_ids, max_new_tokens=64)

No plugins: every entropykv op is already lowered to standard ONNX ops (`passes.decompose`; `entropykv::select`
becomes two TopK with a static k), which TensorRT's ONNX parser maps to built-in layers. `check_tensorrt_graph`
verifies that before any engine is built, so it also runs (and is tested) where TensorRT is not installed.
Engines are built for the exported static shapes (no optimization profiles). This module imports TensorRT
lazily: importing it never needs TensorRT.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ..aot import build_programs, check_export, static_budgets
from ..errors import ExportError
from ..exported import prepare_export_dir, read_layout, writable_path, write_layout
from .onnx import ONNX_FILES, write_onnx
from .runner import BufferedGenerator, load_layout

TOPK_LIMIT = 3840  # TensorRT's TopK layer takes k <= 3840 (TensorRT operator documentation, TopK)
# The ONNX ops our prefill/decode graphs contain (tiny Llama, Mistral, Qwen2, Qwen3 exports) plus Constant, each
# marked supported in onnx-tensorrt's docs/operators.md (TensorRT 10.15). A new op in the graphs must be checked
# against that table before it is added here.
TENSORRT_OPS = frozenset({
    "Add", "And", "Cast", "Clip", "Concat", "Constant", "Cos", "Equal", "Exp", "Expand", "Gather", "GatherElements",
    "Gemm", "Greater", "GreaterOrEqual", "Identity", "Less", "LessOrEqual", "LogSoftmax", "MatMul", "MaxPool", "Mul",
    "Neg", "Not", "Or", "Pow", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Reshape", "ScatterND",
    "Sigmoid", "Sin", "Slice", "Softmax", "Sqrt", "Squeeze", "Sub", "TopK", "Transpose", "Unsqueeze", "Where"})
_FLOAT_TYPES = {1: "float32", 10: "float16", 16: "bfloat16"}  # onnx.TensorProto data types TopK may take
_MAX_LISTED = 20


class TensorRTNotInstalled(ExportError, ModuleNotFoundError):
    """TensorRT is missing: an ExportError for the exporter, a ModuleNotFoundError for `except ImportError`."""


def _tensorrt(hint: str):
    try:
        import tensorrt
    except ImportError as err:
        raise TensorRTNotInstalled(f"TensorRT is not installed (pip install tensorrt, Linux + NVIDIA GPU); {hint}") \
            from err
    return tensorrt


def check_topk_budgets(budgets: list[int]) -> None:
    """Refuse budgets TensorRT's TopK cannot select (each layer's budget is the k of its TopKs)."""
    over = [f"layer {i} budget {b} > {TOPK_LIMIT}" for i, b in enumerate(budgets) if b > TOPK_LIMIT]
    if over:
        raise ExportError(f"{'; '.join(over)}: TensorRT's TopK takes k <= {TOPK_LIMIT}; calibrate with a smaller "
                          "budget or export ONNX for ONNX Runtime (export_onnx / --format onnx)")


class _Constants:
    """Values of initializers and Constant node outputs, read on demand (a k or an axes list, never the weights)."""

    def __init__(self, model, base: Path | None) -> None:
        self.base = base
        self.initializers = {t.name: t for t in model.graph.initializer}
        self.nodes = {n.output[0]: n.attribute[0] for n in model.graph.node if n.op_type == "Constant" and n.attribute}

    def __contains__(self, name: str) -> bool:
        return name in self.initializers or name in self.nodes

    def value(self, name: str) -> np.ndarray | None:
        import onnx
        from onnx import numpy_helper
        from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

        if name in self.nodes:
            return np.asarray(onnx.helper.get_attribute_value(self.nodes[name]) if self.nodes[name].name != "value"
                              else numpy_helper.to_array(self.nodes[name].t))
        tensor = self.initializers.get(name)
        if tensor is None or uses_external_data(tensor) and self.base is None:
            return None
        if uses_external_data(tensor):
            tensor = onnx.TensorProto.FromString(tensor.SerializeToString())  # leave the model's proto as it was
            load_external_data_for_tensor(tensor, str(self.base))
        return numpy_helper.to_array(tensor)


def _element_types(model) -> dict[str, int]:
    """Name -> onnx element type of every typed value (shape inference fills in what the exporter left out)."""
    import onnx

    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001  (best effort: the exporter's own value_info is usually complete)
        pass
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*model.graph.input, *model.graph.value_info, *model.graph.output)}
    types |= {t.name: t.data_type for t in model.graph.initializer}
    return types


def _node_problems(node, label: str, constants: _Constants, types: dict[str, int]) -> list[str]:
    if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
        return [f"{label}: op {node.domain + '.' if node.domain else ''}{node.op_type} is not among the ONNX ops "
                f"this exporter lets TensorRT parse (standard domain: {', '.join(sorted(TENSORRT_OPS))})"]
    problems = []
    attrs = {a.name: a for a in node.attribute}
    if node.op_type == "TopK":
        k = constants.value(node.input[1]) if node.input[1] in constants else None
        if k is None or k.size != 1:
            problems.append(f"{label}: k ({node.input[1]!r}) is computed at run time; TensorRT's TopK needs k "
                            "as a one-element initializer or Constant (a static budget)")
        elif not 1 <= int(k.item()) <= TOPK_LIMIT:
            problems.append(f"{label}: k = {int(k.item())} is outside 1..{TOPK_LIMIT}, TensorRT's TopK limit; "
                            "calibrate with a smaller budget or export ONNX for ONNX Runtime")
        kind = types.get(node.input[0], 0)
        if kind not in _FLOAT_TYPES:
            from onnx import TensorProto

            problems.append(f"{label}: input {node.input[0]!r} is {TensorProto.DataType.Name(kind).lower()}; "
                            f"TopK must take {'/'.join(_FLOAT_TYPES.values())} (older TensorRT releases have no "
                            "integer TopK, so the ONNX exporter orders slot indices as float32)")
        if "sorted" in attrs and attrs["sorted"].i == 0:
            problems.append(f"{label}: sorted=0; TensorRT's TopK takes sorted=1 only")
    elif node.op_type == "MaxPool":
        if len(attrs["kernel_shape"].ints) not in (2, 3) or len(node.output) > 1 and node.output[1]:
            problems.append(f"{label}: TensorRT pools in 2D or 3D without the Indices output; got kernel "
                            f"{list(attrs['kernel_shape'].ints)} and outputs {list(node.output)}")
    elif node.op_type.startswith("Reduce") and len(node.input) > 1 and node.input[1] \
            and node.input[1] not in constants:
        problems.append(f"{label}: axes ({node.input[1]!r}) are computed at run time; TensorRT's {node.op_type} "
                        "needs axes as an initializer")
    return problems


def check_tensorrt_graph(model) -> None:
    """Raise ExportError unless TensorRT's ONNX parser can take the graph: ops in TENSORRT_OPS (standard domain),
    TopK with a float input, a constant 1 <= k <= 3840 and sorted output, 2D/3D MaxPool, constant Reduce
    axes, and fully static input shapes. `model`: a path (external weights are not loaded) or an onnx.ModelProto."""
    import onnx

    base = None
    if not isinstance(model, onnx.ModelProto):
        base, name = Path(model).parent, Path(model).name
        model = onnx.load(str(model), load_external_data=False)
    else:
        name = model.graph.name or "ONNX graph"
    problems = []
    weights = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        tensor_type = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]
        if value.name not in weights and (not tensor_type.HasField("shape")
                                          or any(not isinstance(d, int) or d < 1 for d in dims)):
            shown = dims if tensor_type.HasField("shape") else "unknown"
            problems.append(f"input {value.name!r}: shape {shown} is not fully static; the engines are built "
                            "for the exported fixed shapes, so every input dimension must be a number >= 1")
    constants, types = _Constants(model, base), _element_types(model)
    for i, node in enumerate(model.graph.node):
        problems += _node_problems(node, f"node {node.name or f'#{i}'} ({node.op_type})", constants, types)
    if problems:
        more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
        raise ExportError(f"{name} would not build with TensorRT:\n  " + "\n  ".join(problems[:_MAX_LISTED]) + more)


def _build_engine(trt, onnx_path: Path, engine_path: Path, fp16: bool, workspace_gib: float) -> None:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch: the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from the file, so the external weights resolve
        errors = "\n  ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ExportError(f"TensorRT could not build an engine from {onnx_path.name} (see its log above)")
    engine_path.write_bytes(engine)  # IHostMemory exposes the buffer protocol


def export_tensorrt(model: nn.Module, out_dir: str | Path, *, prompt_length: int, max_new_tokens: int, batch: int = 1,
                    fp16: bool = False, workspace_gib: float = 4.0) -> Path:
    """Write and check the ONNX pair (`export_onnx`), then build `prefill.engine` and `decode.engine`; returns the
    layout path. Without TensorRT, raises TensorRTNotInstalled after the checked ONNX files are written."""
    check_export(model, prompt_length, max_new_tokens, batch)
    check_topk_budgets(static_budgets(model, prompt_length))  # before the slow export
    out = prepare_export_dir(out_dir, [*ONNX_FILES, *ENGINE_FILES])
    write_onnx(*build_programs(model, prompt_length=prompt_length, max_new_tokens=max_new_tokens, batch=batch), out)
    for name in ("prefill", "decode"):
        check_tensorrt_graph(out / f"{name}.onnx")
    trt = _tensorrt(f"the checked ONNX files are in {out} and can be built with `trtexec --onnx={out}/prefill.onnx "
                    f"--saveEngine={out}/prefill.engine` (and the same for decode)")
    for name, engine in zip(("prefill", "decode"), ENGINE_FILES):
        _build_engine(trt, out / f"{name}.onnx", writable_path(out, engine), fp16, workspace_gib)
    layout = read_layout(out)
    return write_layout(out, replace(layout, programs={**layout.programs, "tensorrt": tuple(ENGINE_FILES)},
                                     tensorrt={"version": trt.__version__, "fp16": fp16,
                                               "workspace_gib": workspace_gib}))


ENGINE_FILES = ["prefill.engine", "decode.engine"]


class TrtGenerator(BufferedGenerator):
    """Greedy generation with engines from `export_tensorrt`, on a CUDA device.

    Every engine I/O tensor is a torch CUDA tensor bound by address (`set_tensor_address`) and the engines run on
    torch's current stream (`execute_async_v3`), ordered with the argmax between steps; the cache is double
    buffered as in OrtGenerator."""

    name = "TrtGenerator"

    def __init__(self, directory: str | Path, pad_token_id: int = 0, device: str | torch.device = "cuda", *,
                 trust_code: bool = False) -> None:
        """trust_code: engines are compiled code (and may carry plugins); without it they are refused."""
        trt = _tensorrt("TrtGenerator runs engines built by export_tensorrt; OrtGenerator runs the ONNX files")
        self.dir = Path(directory)
        layout, files = load_layout(self.name, self.dir, "tensorrt", trust_code)
        if not torch.cuda.is_available():
            raise RuntimeError("TrtGenerator: TensorRT engines run on an NVIDIA GPU, but torch sees no CUDA device")
        super().__init__(layout, torch.device(device), pad_token_id)
        # The logger and runtime are kept: they must outlive the engines deserialized with them.
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        engines = {}
        for graph, file in zip(("prefill", "decode"), files):
            engines[graph] = self._runtime.deserialize_cuda_engine(file.read_bytes())
            if engines[graph] is None:
                raise ExportError(f"TrtGenerator: could not load {file} (built by another TensorRT "
                                 "version or for another GPU? rebuild it with export_tensorrt)")
            self._check_io(trt, graph, engines[graph])
        self._engines = engines  # the contexts need their engines alive
        self._contexts = {graph: engine.create_execution_context() for graph, engine in engines.items()}
        self._steps = torch.arange(layout.max_new_tokens, device=self.device)  # decode's `step`, bound by address

    def _check_io(self, trt, graph: str, engine) -> None:
        """Each engine I/O tensor must have the shape and dtype of the buffer bound to it."""
        torch_dtypes = {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
                        trt.int32: torch.int32, trt.int64: torch.int64, trt.bool: torch.bool}
        b, length = self.layout.batch, self.layout.prompt_length
        cache = [(tuple(t.shape), t.dtype) for t in self._caches[0]]
        if graph == "prefill":  # input_ids, positions
            inputs = [((b, length), torch.int64)] * 2
        else:  # token, position, step, cache
            inputs = [((b, 1), torch.int64)] * 2 + [((), torch.int64)] + cache
        expected = [*inputs, (tuple(self._logits.shape), self._logits.dtype), *cache]
        names = self.layout.onnx[graph]
        for name, (shape, dtype) in zip(names["inputs"] + names["outputs"], expected):
            got = (tuple(engine.get_tensor_shape(name)), torch_dtypes.get(engine.get_tensor_dtype(name)))
            if got != (shape, dtype):
                raise ExportError(f"TrtGenerator: {graph} engine tensor {name!r} is {got}, expected {(shape, dtype)} "
                                 "from layout.json; rebuild the engines with export_tensorrt")

    def _run(self, graph: str, inputs: tuple[Tensor, ...], outputs: list[Tensor]) -> None:
        context = self._contexts[graph]
        names = self.layout.onnx[graph]
        for name, tensor in zip(names["inputs"] + names["outputs"], (*inputs, self._logits, *outputs)):
            context.set_tensor_address(name, tensor.data_ptr())
        if not context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"TrtGenerator: TensorRT failed to run the {graph} engine")

    def _prefill(self, ids: Tensor, positions: Tensor, cache: list[Tensor]) -> None:
        self._run("prefill", (ids, positions), cache)

    def _decode(self, token: Tensor, position: Tensor, step: int, cache: list[Tensor], out: list[Tensor]) -> None:
        self._run("decode", (token, position, self._steps[step], *cache), out)
