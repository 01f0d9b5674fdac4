"""Sliding-window layers (Mistral) hold only what a query can still attend, in prefill and all through decode."""

from __future__ import annotations

import pytest
import torch
from tiny_models import random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import compat
from entropykv_fx.headwise import HeadwiseLayer

pytestmark = [pytest.mark.filterwarnings("ignore:entropykv. budget"),
              pytest.mark.compat]  # in the compatibility suite (scripts/test_transformers.sh)
WINDOW = 24  # tiny_models' Mistral


@pytest.mark.parametrize("settings", [dict(policy="full"), dict(budget=0.25), dict(policy="snapkv", budget=0.25),
                                      dict(policy="uniform", budget=20)])
def test_window_layers_never_hold_more_than_the_window_and_tokens_match(settings):
    """200-token prompt, 50 new tokens: after the prefill every layer holds at most window - 1 slots (what HF's own
    sliding-window cache holds); decoding, a dense layer holds exactly `window` slots (a ring: the window - 1 a
    query can still attend and the step's own token, which HF's cache concatenates for the step), and a head-wise
    layer exactly `window` slots per head (packed rings); with the full policy the tokens are the unmodified model's."""
    plain = tiny_model("mistral")
    model = entropykv_fx.optimize(tiny_model("mistral"), window=8, sink_tokens=2, **settings)
    ids = random_prompt(200)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = compat.cache_of(out)
        prefill_bytes = cache.nbytes
        tokens = [out.logits[:, -1:].argmax(-1)]
        assert all(layer.get_seq_length() <= WINDOW - 1 for layer in cache.layers)
        for _ in range(50):
            step = model(tokens[-1], **compat.with_cache(cache), use_cache=True)
            for layer in cache.layers:
                if isinstance(layer, HeadwiseLayer):
                    assert layer.packed.ring and layer.head_lengths() == [WINDOW] * len(layer.packed.caps)
                else:
                    assert layer.get_seq_length() <= WINDOW and layer.keys.shape[2] == WINDOW
            tokens.append(step.logits[:, -1:].argmax(-1))
    report = entropykv_fx.report(model)
    assert all(r.slots_after <= WINDOW - 1 for r in report.layers)
    assert report.bytes_after == prefill_bytes  # the report counts what is held
    if settings.get("policy") == "full":
        expected = plain.generate(ids, max_new_tokens=51, do_sample=False)[:, 200:]
        assert torch.equal(torch.cat(tokens, 1), expected)


@pytest.mark.parametrize("policy", ["uniform", "cache_topk"])  # one token set per layer; per KV head
def test_a_window_layers_budget_is_not_spent_on_tokens_it_can_never_attend(policy):
    """At a budget above the window, a window layer keeps exactly the window - 1 reachable tokens (the last ones)."""
    model = entropykv_fx.optimize(tiny_model("mistral"), policy=policy, budget=0.5, window=8, sink_tokens=4)
    with torch.no_grad():
        cache = compat.cache_of(model(random_prompt(200), use_cache=True))
    for layer in cache.layers:
        heads = [head.positions for head in layer.heads] if isinstance(layer, HeadwiseLayer) else [layer.positions]
        for positions in heads:
            assert positions[0].tolist() == list(range(200 - WINDOW + 1, 200))
