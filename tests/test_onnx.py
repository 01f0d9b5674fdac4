"""ONNX export and ONNX Runtime generation: standard ops only, compressed KV shapes, tokens and logits."""

from __future__ import annotations

import json
import time

import numpy as np
import onnx
import pytest
import torch
from tiny_models import DEVICE, calibrated, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.aot import ExportError, build_programs
from entropykv_fx.exporters.onnx import OrtGenerator, export_onnx, write_onnx
from entropykv_fx.exporters.tensorrt import TOPK_LIMIT

pytestmark = pytest.mark.skipif(DEVICE.type != "cpu", reason="ONNX Runtime runs on the CPU here")
PROMPT, NEW = 96, 8


def _check_graphs(out, layout):
    """Checker-clean, standard domain only, static TopK k within TensorRT's limit; returns the decode model."""
    models = {name: onnx.load(out / f"{name}.onnx") for name in ("prefill", "decode")}
    for name, model in models.items():
        onnx.checker.check_model(out / f"{name}.onnx")  # by path: the weights are external data
        assert model.opset_import[0].version >= 18
        assert {n.domain for n in model.graph.node} == {""}, f"{name}: non-standard domain"
        assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
        assert "Sort" not in {n.op_type for n in model.graph.node}
        constants = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
        constants |= {n.output[0]: onnx.numpy_helper.to_array(n.attribute[0].t)
                      for n in model.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}
        topk = [n for n in model.graph.node if n.op_type == "TopK"]
        ks = [int(constants[n.input[1]].item()) for n in topk]  # KeyError: a dynamic k
        assert all(1 <= k <= TOPK_LIMIT for k in ks), ks
        if name == "prefill":
            assert sorted(ks) == sorted(2 * layout["budgets"]), "two TopKs per layer: rank, then temporal order"
        assert [i.name for i in model.graph.input] == layout["onnx"][name]["inputs"]
        assert [o.name for o in model.graph.output] == layout["onnx"][name]["outputs"]
    return models["decode"]


def _input_shapes(model):
    return [tuple(d.dim_value for d in i.type.tensor_type.shape.dim) for i in model.graph.input]


def test_llama_onnx_generates_the_optimized_models_tokens_with_compressed_kv_inputs(tmp_path):
    model = calibrated(tmp_path, "llama", [0.6, 0.5, 0.7])
    ids = random_prompt(PROMPT, seed=5)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    prefill, decode, layout = build_programs(model, prompt_length=PROMPT, max_new_tokens=NEW)
    start = time.perf_counter()
    layout = json.loads(write_onnx(prefill, decode, layout, tmp_path / "out").read_text())
    print(f"ONNX export (both graphs): {time.perf_counter() - start:.1f} s")
    assert layout["capacities"] == [round(f * PROMPT) + NEW for f in (0.6, 0.5, 0.7)]

    decode_onnx = _check_graphs(tmp_path / "out", layout)
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    assert _input_shapes(decode_onnx) == [(1, 1), (1, 1), (), *[
        s for c in layout["capacities"] for s in ((1, heads, c, dim), (1, heads, c, dim), (1, c))]]

    gen = OrtGenerator(tmp_path / "out")
    got = gen.generate(ids.numpy(), NEW)
    assert np.array_equal(got, want.numpy()), (got, want)

    positions = torch.arange(PROMPT)[None]
    with torch.no_grad():
        ref_logits, *ref_cache = prefill.module()(ids, positions)
    ort_logits, *ort_cache = gen.prefill.run(None, {"input_ids": ids.numpy(), "positions": positions.numpy()})
    diff = np.abs(ort_logits - ref_logits.numpy()).max()
    print(f"first-step logits max abs diff, ORT vs exported program: {diff:.2e}")
    assert diff < 1e-4
    for i in range(2, len(ref_cache), 3):  # kept slot positions: the same tokens were selected
        assert np.array_equal(ort_cache[i], ref_cache[i].numpy())


def test_mistral_sliding_window_onnx_matches_generate_and_runs_shorter_prompts(tmp_path):
    model = calibrated(tmp_path, "mistral", [0.5, 0.4, 0.6])
    export_onnx(model, tmp_path / "out", prompt_length=PROMPT, max_new_tokens=NEW)
    gen = OrtGenerator(tmp_path / "out")
    for length in (PROMPT, 70):  # 70: left-padded to the exported prompt length
        ids = random_prompt(length, seed=7)
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, length:]
        assert np.array_equal(gen.generate(ids, NEW), want.numpy()), length


def test_onnx_export_and_runner_errors(tmp_path):
    with pytest.raises(ExportError, match="need static budgets"):
        export_onnx(entropykv_fx.optimize(tiny_model("llama")), tmp_path, prompt_length=8, max_new_tokens=2)
    entropykv_fx.export(calibrated(tmp_path, "llama", [0.5] * 3), tmp_path / "pt2", prompt_length=16,
                        max_new_tokens=2, aoti=False)
    with pytest.raises(ValueError, match=r"no onnx programs in .*available: \['pt2'\]"):
        OrtGenerator(tmp_path / "pt2")
    with pytest.raises(FileNotFoundError, match="not a directory written by"):
        OrtGenerator(tmp_path)
