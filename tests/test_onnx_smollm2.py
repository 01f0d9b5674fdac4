"""The real model through ONNX Runtime: SmolLM2-135M exported with 25% budgets generates what PyTorch generates.

About 5 minutes on 2 CPU cores (mostly the export), so it runs when ENTROPYKV_EXPORT_SMOLLM2=1 is set."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
import torch

import entropykv_fx
from entropykv_fx.demo import needle_prompt
from entropykv_fx.exporters.onnx import OrtGenerator, export_onnx

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("ENTROPYKV_EXPORT_SMOLLM2"),
                                                   reason="set ENTROPYKV_EXPORT_SMOLLM2=1 (about 5 min on 2 cores)")]
PROMPT, NEW, FRACTION = 64, 16, 0.25


def test_smollm2_onnx_generates_the_optimized_models_tokens(tmp_path):
    pytest.importorskip("gguf")
    from entropykv_fx.models import load_default_model

    model, tokenizer = load_default_model(show_progress=False)
    calibration = tmp_path / "budgets.json"
    calibration.write_text(json.dumps({"layer_fractions": [FRACTION] * 30}))
    entropykv_fx.optimize(model, budget_source="calibrated", calibration_file=str(calibration), window=8,
                          sink_tokens=4)  # 12 always-kept tokens fit in the 16-token budget
    ids = needle_prompt(tokenizer, 400, 0.5)["input_ids"][:, -PROMPT:]
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0)[:, PROMPT:]

    layout = json.loads(export_onnx(model, tmp_path / "onnx", prompt_length=PROMPT, max_new_tokens=NEW).read_text())
    assert layout["budgets"] == [int(FRACTION * PROMPT)] * 30
    assert layout["capacities"] == [int(FRACTION * PROMPT) + NEW] * 30
    decode = onnx.load(tmp_path / "onnx" / "decode.onnx", load_external_data=False)
    shapes = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in decode.graph.input}
    assert shapes["past_key_values.7.key"] == [1, 3, int(FRACTION * PROMPT) + NEW, 64]
    got = OrtGenerator(tmp_path / "onnx").generate(ids.numpy(), NEW)
    np.testing.assert_array_equal(got, want.numpy())
