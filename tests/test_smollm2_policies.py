"""Every policy end to end on the real embedded model (SmolLM2-135M-Instruct, 30 layers, 9 / 3 heads)."""

from __future__ import annotations

import pytest
import torch

from tiny_models import DEVICE

import entropykv_fx
from entropykv_fx.demo import ANSWER_KEY, needle_prompt
from entropykv_fx.headwise import HeadwiseLayer
from entropykv_fx.policies import POLICIES

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:entropykv. budget")]


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    from entropykv_fx.models import load_default_model

    model, tokenizer = load_default_model(show_progress=False)
    return model.to(DEVICE), tokenizer, needle_prompt(tokenizer, 400, 0.5).to(DEVICE)


@pytest.mark.parametrize("policy", sorted(entropykv_fx.policies()))
def test_policy_runs_on_smollm2_within_its_bytes(smollm2, policy):
    model, tokenizer, inputs = smollm2
    entropykv_fx.optimize(model, policy=policy, budget=0.5)
    with torch.no_grad():
        cache = model(**inputs, use_cache=True).past_key_values
    rep = entropykv_fx.report(model)
    n = inputs["input_ids"].shape[1]
    assert rep.prompt_tokens == n and rep.bytes_before == 30 * 3 * n * 2 * 64 * 4  # fp32 K + V, 3 KV heads
    assert cache.nbytes == rep.bytes_after
    assert all(isinstance(layer, HeadwiseLayer) for layer in cache.layers) == POLICIES[policy].headwise
    if policy == "full":
        assert rep.kept_fraction == 1.0
    elif policy == "entropy_head":
        assert 0.49 < rep.kept_fraction <= 0.5
    else:
        assert rep.kept_fraction == pytest.approx(round(0.5 * n) / n, abs=1e-9)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    answer = tokenizer.decode(out[0, n:], skip_special_tokens=True).lower()
    assert out.shape[1] > n
    if policy == "full":
        assert ANSWER_KEY in answer, answer
