"""entropykv_fx.compat: both spellings of the cache argument, and the tested-range check at optimize()."""

from __future__ import annotations

import warnings

import pytest
import torch
from packaging.version import Version
from tiny_models import ARCHS, random_prompt, tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import entropykv_fx
from entropykv_fx import EntropyKVCache, compat

pytestmark = pytest.mark.compat  # in the compatibility suite (scripts/test_transformers.sh)


def test_issue_reproduction_generates_on_the_installed_release():
    """The issue's reproduction: an optimized model's generate() (which passes the cache under the installed
    release's name, `cache` from 5.24 on) gives the unmodified model's tokens."""
    cfg = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(3, 100, (1, 40))
    with torch.no_grad():
        expected = plain.generate(ids, max_new_tokens=5, do_sample=False)
        model = entropykv_fx.optimize(plain, policy="full")
        got = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert got.shape == (1, 45)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_either_spelling_of_the_cache_argument_reaches_the_compressed_cache(arch, name):
    """A manual prefill + decode loop passing the cache under either name (the old one is deprecated, not gone,
    from 5.24 on) continues the compressed cache, with the same logits either way."""
    if name not in ("past_key_values", compat.CACHE_ARG):
        pytest.skip(f"transformers {compat.INSTALLED} has no `{name}` argument")
    model = entropykv_fx.optimize(tiny_model(arch), policy="uniform", budget=0.5, window=8, sink_tokens=2)  # layer-wise
    ids = random_prompt(48)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        out = model(ids, use_cache=True)
        cache = compat.cache_of(out)
        assert isinstance(cache, EntropyKVCache)
        assert cache.physical_lengths() == [r.slots_after for r in entropykv_fx.report(model).layers]
        step = model(ids[:, -1:], **{name: cache}, use_cache=True)
        assert compat.cache_of(step) is cache
        assert cache.get_seq_length() == 49
        reference = entropykv_fx.optimize(tiny_model(arch), policy="uniform", budget=0.5, window=8, sink_tokens=2)
        ref_cache = compat.cache_of(reference(ids, use_cache=True))
        ref_step = reference(ids[:, -1:], **compat.with_cache(ref_cache), use_cache=True)
    torch.testing.assert_close(step.logits, ref_step.logits)


def test_cache_in_call_reads_either_name_and_refuses_both():
    sentinel = object()
    assert compat.cache_in_call({"cache": sentinel}) == ("cache", sentinel)
    assert compat.cache_in_call({"past_key_values": sentinel}) == ("past_key_values", sentinel)
    assert compat.cache_in_call({}) == (compat.CACHE_ARG, None)
    assert compat.cache_in_call({"past_key_values": None}) == ("past_key_values", None)
    with pytest.raises(ValueError, match="not both"):
        compat.cache_in_call({"cache": sentinel, "past_key_values": object()})


def test_cache_argument_matches_the_installed_models_forward():
    import inspect

    for build in ARCHS.values():
        params = inspect.signature(type(build()).forward).parameters
        assert compat.CACHE_ARG in params


def test_newer_untested_release_warns_naming_version_and_range(monkeypatch):
    monkeypatch.setattr(compat, "INSTALLED", Version("99.0.0"))
    with pytest.warns(compat.UntestedTransformersWarning, match=r"99\.0\.0.*tested range 5\.17\.0\.\.5\.24\.0"):
        entropykv_fx.optimize(tiny_model("llama"), policy="full")


def test_known_broken_release_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(compat, "INSTALLED", Version("5.99.0"))
    monkeypatch.setitem(compat.KNOWN_BROKEN, "5.99.0", "renamed the attention interface")
    model = tiny_model("llama")
    forward = model.forward
    with pytest.raises(compat.TransformersVersionError, match=r"5\.99\.0.*renamed the attention interface.*5\.17\.0"):
        entropykv_fx.optimize(model)
    assert model.forward == forward and not hasattr(model, "entropykv")


def test_installed_release_inside_the_tested_range_is_silent():
    if not compat.OLDEST_TESTED <= compat.INSTALLED <= compat.NEWEST_TESTED:
        pytest.skip(f"transformers {compat.INSTALLED} is outside the tested range")
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.UntestedTransformersWarning)
        compat.check_transformers_version()

