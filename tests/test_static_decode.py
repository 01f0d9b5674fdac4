"""StaticDecoder: greedy decode over static buffers made from a prefill's cache equals `generate()`."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.decode import StaticDecoder

PROMPT, NEW = 60, 10


def decode(model, ids, int8=False, inductor=False, **kwargs):
    with torch.no_grad():
        out = model(ids, use_cache=True, **kwargs)
    first = out.logits[:, -1:].argmax(-1)
    decoder = StaticDecoder(model, out.past_key_values, max_new_tokens=NEW, int8=int8, inductor=inductor)
    return torch.cat([first, decoder.generate(first, NEW - 1)], 1), decoder


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_full_cache_decode_equals_the_models_generate(arch):
    model, ids = tiny_model(arch), random_prompt(PROMPT)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    assert torch.equal(decode(model, ids)[0], want)


@pytest.mark.compat
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_compressed_decode_equals_the_optimized_models_generate(arch):
    model = entropykv_fx.optimize(tiny_model(arch, seed=3), policy="entropy", budget=0.4, window=8, sink_tokens=2)
    ids = random_prompt(PROMPT, seed=4)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    got, decoder = decode(model, ids)
    assert torch.equal(got, want)
    kept = [layer.keys.shape[2] for layer in model(ids, use_cache=True).past_key_values.layers]
    assert decoder.slots.flatten().tolist() == [k + NEW - 1 for k in kept], "each layer writes after its own slots"


def test_inductor_compiled_step_gives_the_same_tokens():
    torch._dynamo.reset()
    model = entropykv_fx.optimize(tiny_model("qwen3", seed=3), policy="entropy", budget=0.4, window=8, sink_tokens=2)
    ids = random_prompt(PROMPT, seed=4)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    got, decoder = decode(model, ids, inductor=True)
    assert torch.equal(got, want)
    assert decoder.compiled() is not decoder.step, "the step must run through torch.compile"


def test_left_padded_batch_decodes_each_row_at_its_own_positions():
    model = entropykv_fx.optimize(tiny_model("llama", seed=5), policy="uniform", budget=0.5, window=8, sink_tokens=2)
    ids = random_prompt(PROMPT, batch=2, seed=6)
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    ids[1, :7] = 0
    want = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    got, decoder = decode(model, ids, attention_mask=mask)
    assert torch.equal(got, want)
    assert decoder.position.flatten().tolist() == [PROMPT + NEW - 1, PROMPT - 7 + NEW - 1]


def test_int8_storage_stays_close_to_the_bf16_path():
    model = entropykv_fx.optimize(tiny_model("qwen2", seed=7), policy="uniform", budget=0.5, window=8, sink_tokens=2)
    ids = random_prompt(PROMPT, seed=8)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        plain, quantized = (StaticDecoder(model, cache, 4, int8=int8) for int8 in (False, True))
        reference, logits = plain.step(), quantized.step()
    assert quantized.kv_bytes < 0.6 * plain.kv_bytes  # int8 + a float32 scale per token and head vs float32
    assert (logits - reference).abs().max() < 0.05 * reference.abs().max()
    assert not torch.equal(logits, reference), "int8 storage must really be used"


def test_bad_inputs_are_refused_with_what_is_accepted():
    model, ids = tiny_model("llama"), random_prompt(PROMPT)
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    decoder = StaticDecoder(model, cache, 3)
    with pytest.raises(ValueError, match=r"steps must be in 1\.\.3"):
        decoder.generate(ids[:, -1:], 4)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        StaticDecoder(model, cache, 0)
    with pytest.raises(ValueError, match="does not have the decoder layout"):
        StaticDecoder(torch.nn.Linear(2, 2), cache, 3)
    with pytest.raises(ValueError, match="head-wise policies are not supported"):
        headwise = entropykv_fx.optimize(tiny_model("llama"), policy="adakv", budget=0.5, window=8, sink_tokens=2)
        with torch.no_grad():
            StaticDecoder(headwise, headwise(ids, use_cache=True).past_key_values, 3)
