"""Quality on the real embedded model (SmolLM2-135M-Instruct): the planted fact survives compression."""

from __future__ import annotations

import pytest
import torch

from tiny_models import DEVICE

import entropykv_fx
from entropykv_fx.demo import ANSWER_KEY, needle_prompt

pytestmark = pytest.mark.slow
DEPTHS = (0.1, 0.3, 0.5, 0.6, 0.8)


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from entropykv_fx.models import load_default_model

    model, tokenizer = load_default_model(show_progress=False)
    return model.to(DEVICE), tokenizer


def retrieved(model, tokenizer, depth: float) -> bool:
    inputs = needle_prompt(tokenizer, 2000, depth).to(DEVICE)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return ANSWER_KEY in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:]).lower()


def test_planted_fact_survives_25_percent_budget(smollm2):
    model, tokenizer = smollm2
    entropykv_fx.optimize(model, policy="full")
    assert all(retrieved(model, tokenizer, d) for d in DEPTHS), "the full cache must find the fact"
    hits = {}
    for policy in ("uniform", "entropy"):
        entropykv_fx.optimize(model, policy=policy, budget=0.25)
        hits[policy] = sum(retrieved(model, tokenizer, d) for d in DEPTHS)
        assert entropykv_fx.report(model).kept_fraction == pytest.approx(0.25, abs=0.01)
    # Measured on CPU fp32: uniform 5/5, entropy 3/5 (the entropy policy starves low-entropy middle layers).
    assert hits["uniform"] == len(DEPTHS), hits
    assert hits["entropy"] >= 3, hits


def test_explain_rewrites_all_30_attention_sites_on_prefill_and_decode_graphs(smollm2):
    model, tokenizer = smollm2
    entropykv_fx.optimize(model, policy="entropy", budget=0.25)
    reports = entropykv_fx.explain(model, tokenizer("The capital of France is", return_tensors="pt")["input_ids"].to(DEVICE))
    assert [r.name.split("(")[1] for r in reports] == ["prefill)", "decode)"]
    assert all(r.found == r.rewritten == 30 for r in reports), "\n".join(map(str, reports))


def test_the_cli_knows_the_default_models_shape(smollm2):
    """`entropykv-fx export` checks a calibration against DEFAULT_MODEL_SHAPE before loading the model."""
    from entropykv_fx.config import model_shape
    from entropykv_fx.models import DEFAULT_MODEL_SHAPE

    assert model_shape(smollm2[0]) == DEFAULT_MODEL_SHAPE
