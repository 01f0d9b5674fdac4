"""TensorRT export: graph checks (run everywhere), the missing-TensorRT path; engines where TensorRT is installed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from tiny_models import DEVICE, calibrated, random_prompt

from entropykv_fx.aot import ExportError
from entropykv_fx.exporters.onnx import export_onnx
from entropykv_fx.exporters.tensorrt import (TOPK_LIMIT, TensorRTNotInstalled, TrtGenerator, check_tensorrt_graph,
                                             export_tensorrt)

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="the ONNX graphs are exported from CPU models")
PROMPT, NEW = 96, 4  # 96: the budgets differ per layer (at 48 they all hit the sink + window floor)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """`import tensorrt` fails, as where it is not installed (also where it is)."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def _graph(node, inputs, initializers=()):
    out = helper.make_tensor_value_info(node.output[0], TensorProto.FLOAT, None)
    return helper.make_model(helper.make_graph([node], "g", inputs, [out], list(initializers)),
                             opset_imports=[helper.make_opsetid("", 18)])


def _topk(x_type=TensorProto.FLOAT, k=4, x_shape=(1, 8), k_input=False):
    node = helper.make_node("TopK", ["x", "k"], ["values", "indices"], name="select")
    inputs = [helper.make_tensor_value_info("x", x_type, x_shape)]
    if k_input:
        return _graph(node, inputs + [helper.make_tensor_value_info("k", TensorProto.INT64, [1])])
    return _graph(node, inputs, [numpy_helper.from_array(np.array([k], np.int64), "k")])


def test_a_static_float_topk_graph_passes():
    check_tensorrt_graph(_topk(k=TOPK_LIMIT, x_shape=(1, 4000)))  # k == 3840 is still accepted


@pytest.mark.parametrize("model, problem", [
    (_topk(k=4000, x_shape=(1, 5000)), r"node select \(TopK\): k = 4000 is outside 1\.\.3840, TensorRT's TopK limit"),
    (_topk(k=0), r"k = 0 is outside 1\.\.3840"),
    (_topk(k_input=True), r"node select \(TopK\): k \('k'\) is computed at run time; TensorRT's TopK needs k"),
    (_topk(x_type=TensorProto.INT64), r"input 'x' is int64; TopK must take float32/float16/bfloat16"),
    (_topk(x_shape=("batch", 8)), r"input 'x': shape \['batch', 8\] is not fully static"),
    (_graph(helper.make_node("Unique", ["x"], ["y"], name="u"), [helper.make_tensor_value_info("x", 1, [4])]),
     r"node u \(Unique\): op Unique is not among the ONNX ops .* \(standard domain: Add, And, "),
    (_graph(helper.make_node("select", ["x"], ["y"], name="s", domain="entropykv"),
            [helper.make_tensor_value_info("x", 1, [4])]), r"op entropykv\.select is not among"),
    (_graph(helper.make_node("TopK", ["x", "k"], ["v", "i"], name="t", sorted=0),
            [helper.make_tensor_value_info("x", 1, [1, 8])], [numpy_helper.from_array(np.array([2]), "k")]),
     r"node t \(TopK\): sorted=0; TensorRT's TopK takes sorted=1 only"),
    (_graph(helper.make_node("MaxPool", ["x"], ["y"], name="p", kernel_shape=[3]),
            [helper.make_tensor_value_info("x", 1, [1, 2, 8])]), r"node p \(MaxPool\): TensorRT pools in 2D or 3D"),
    (_graph(helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="r"),
            [helper.make_tensor_value_info("x", 1, [2, 8]), helper.make_tensor_value_info("axes", 7, [1])]),
     r"node r \(ReduceSum\): axes \('axes'\) are computed at run time"),
], ids=["k=4000", "k=0", "dynamic-k", "int64-topk", "dynamic-input", "unsupported-op", "custom-domain", "unsorted",
        "1d-maxpool", "dynamic-axes"])
def test_each_tensorrt_rule_raises_a_named_export_error(model, problem):
    with pytest.raises(ExportError, match=problem):
        check_tensorrt_graph(model)


def test_budgets_above_the_topk_limit_are_refused_before_export(tmp_path):
    model = calibrated(tmp_path, "llama", [1.0, 0.5, 1.0])
    with pytest.raises(ExportError, match=r"layer 0 budget 4000 > 3840; layer 2 budget 4000 > 3840: TensorRT's "
                                          r"TopK takes k <= 3840; calibrate with a smaller budget or export ONNX"):
        export_tensorrt(model, tmp_path / "out", prompt_length=4000, max_new_tokens=2)
    assert not (tmp_path / "out").exists()  # nothing was traced or written


def test_export_without_tensorrt_leaves_checked_onnx_and_layout(tmp_path, no_tensorrt):
    out = tmp_path / "out"
    with pytest.raises(TensorRTNotInstalled, match=r"TensorRT is not installed \(pip install tensorrt.*the checked "
                                                   r"ONNX files are in .*out and can be built with `trtexec --onnx="):
        export_tensorrt(calibrated(tmp_path, "llama", [0.6, 0.5, 0.7]), out, prompt_length=PROMPT, max_new_tokens=NEW)
    assert issubclass(TensorRTNotInstalled, ExportError) and issubclass(TensorRTNotInstalled, ImportError)
    layout = json.loads((out / "layout.json").read_text())
    assert layout["programs"] == {"onnx": ["prefill.onnx", "decode.onnx"]}  # no engines claimed
    assert layout["budgets"] == [round(f * PROMPT) for f in (0.6, 0.5, 0.7)]
    for name in ("prefill", "decode"):
        check_tensorrt_graph(out / f"{name}.onnx")

    # The check reads the real graph: raising one TopK's k past the limit is caught and named.
    prefill = onnx.load(out / "prefill.onnx", load_external_data=False)
    topk = next(n for n in prefill.graph.node if n.op_type == "TopK")
    k = next(t for t in prefill.graph.initializer if t.name == topk.input[1])
    k.CopyFrom(numpy_helper.from_array(np.array([5000], np.int64), k.name))
    with pytest.raises(ExportError, match=rf"node {topk.name} \(TopK\): k = 5000 is outside"):
        check_tensorrt_graph(prefill)


def test_mistral_sliding_window_graphs_pass_the_tensorrt_check(tmp_path):
    export_onnx(calibrated(tmp_path, "mistral", [0.5, 0.4, 0.6]), tmp_path, prompt_length=PROMPT, max_new_tokens=NEW)
    for name in ("prefill", "decode"):
        check_tensorrt_graph(tmp_path / f"{name}.onnx")
        ops = {n.op_type for n in onnx.load(tmp_path / f"{name}.onnx", load_external_data=False).graph.node}
        assert ("TopK" in ops) == (name == "prefill")  # selection happens in prefill only


def test_importing_the_module_does_not_need_tensorrt():
    code = ("import sys; sys.modules['tensorrt'] = None\n"
            "import entropykv_fx.exporters.tensorrt as m\nprint(m.TOPK_LIMIT)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "3840"


def test_trt_generator_without_tensorrt_says_so(tmp_path, no_tensorrt):
    with pytest.raises(TensorRTNotInstalled, match="TensorRT is not installed .*OrtGenerator runs the ONNX files"):
        TrtGenerator(tmp_path)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines need an NVIDIA GPU")
def test_engines_generate_the_optimized_models_tokens(tmp_path):
    pytest.importorskip("tensorrt")
    model = calibrated(tmp_path, "llama", [0.6, 0.5, 0.7])
    layout = json.loads(export_tensorrt(model, tmp_path / "out", prompt_length=PROMPT, max_new_tokens=NEW).read_text())
    assert layout["programs"]["tensorrt"] == ["prefill.engine", "decode.engine"]
    ids = random_prompt(PROMPT, seed=5)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    assert np.array_equal(TrtGenerator(tmp_path / "out", trust_code=True).generate(ids, NEW), want.numpy())
