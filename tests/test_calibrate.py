"""Calibration: static per-layer budgets from sample prompts, then used by budget_source='calibrated'."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.calibrate import calibrate


def test_calibration_file_drives_static_budgets(tmp_path):
    model = tiny_model("llama")
    samples = [random_prompt(64, seed=s) for s in range(3)]
    path = calibrate(model, samples, tmp_path / "cal.json", budget=0.5, window=8)
    data = json.loads(path.read_text())
    fractions = data["layer_fractions"]
    assert data["samples"] == 3 and data["prompt_tokens"] == [64, 64, 64] and len(fractions) == 3
    assert sum(fractions) / 3 == pytest.approx(0.5, abs=0.02)  # the requested mean survives averaging
    assert all(0 < f <= 1 for f in fractions)

    entropykv_fx.optimize(model, budget_source="calibrated", calibration_file=str(path))
    for length in (64, 100):
        with torch.no_grad():
            model(random_prompt(length, seed=9), use_cache=True)
        kept = [lr.slots_after for lr in entropykv_fx.report(model).layers]
        assert kept == [round(f * length) for f in fractions]  # same shape for any prompt of that length


def test_calibrate_without_samples_fails(tmp_path):
    with pytest.raises(ValueError, match="no samples"):
        calibrate(tiny_model("llama"), [], tmp_path / "cal.json")


def test_calibration_for_another_model_is_rejected(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"layer_fractions": [0.5, 0.5]}))
    with pytest.raises(entropykv_fx.ConfigError, match="3 numbers"):
        entropykv_fx.optimize(tiny_model("llama"), budget_source="calibrated", calibration_file=str(path))
