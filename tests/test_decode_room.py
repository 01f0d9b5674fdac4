"""The decode layout (issue 18): one-token steps write into room reserved after each layer's slots, and on a GPU
replay a recorded CUDA graph. Reference: the same calls on the plain layout (every step appends a copy), which
the rest of the suite checks against the unmodified model. Layer-wise layers reserve room after their slots;
head-wise layers (adakv, cache_topk) pack their heads with room after each (`headwise.PackedHeads`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, DEVICE, left_padded, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import EntropyKVCache, compat, hf

pytestmark = pytest.mark.filterwarnings("ignore:entropykv. budget")
GPU = DEVICE.type == "cuda"


def generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              **kw)


@pytest.fixture
def small_room(monkeypatch):
    """Room for 5 tokens at a time, so a short generation refills it several times."""
    monkeypatch.setattr(hf, "DECODE_ROOM", 5)


@pytest.fixture
def plain_layout(monkeypatch):
    """The reference: no layer ever reserves room."""
    def plain():
        monkeypatch.setattr(EntropyKVCache, "can_reserve", lambda self: False)
    return plain


# Each policy on llama and on mistral (sliding-window rings); one on each other architecture.
ROOM_CASES = [(arch, policy) for arch in ("llama", "mistral") for policy in ("uniform", "entropy", "adakv")] + [
    ("qwen2", "adakv"), ("qwen3", "uniform")]


@pytest.mark.parametrize("arch, policy", ROOM_CASES)
def test_room_decodes_exactly_what_the_plain_layout_decodes(arch, policy, small_room, plain_layout):
    """Greedy tokens and every step's logits of a left-padded batch, across several refills of the room (sliding
    windows included, mistral), equal the plain layout's; a head-wise policy (adakv) through its packed layout."""
    prompts = [random_prompt(n, seed=n)[0] for n in (70, 41)]
    ids, mask = left_padded(prompts)
    model = entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.3, window=6, sink_tokens=2)
    got = generate(model, ids, 23, attention_mask=mask)
    plain_layout()
    want = generate(entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.3, window=6, sink_tokens=2), ids,
                    23, attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-5)


@pytest.mark.compat
def test_a_step_writes_in_place_and_a_full_room_is_refilled(small_room):
    """Steps within the room keep every buffer where it is (no copy of the cache); the step that finds the room
    used up reserves a new one, and the slots held are the prefill's kept ones plus one per step."""
    model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=0.5, window=4)
    ids = random_prompt(40)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = compat.cache_of(out)
        kept = cache.physical_lengths()
        token = out.logits[:, -1:].argmax(-1)
        addresses = []
        for _ in range(12):
            out = model(token, **compat.with_cache(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            addresses.append(cache.layers[0].keys.data_ptr())
    assert cache.physical_lengths() == [k + 12 for k in kept]
    assert cache.get_seq_length() == 52
    assert len(set(addresses[:5])) == 1 and len(set(addresses[5:10])) == 1 and addresses[4] != addresses[5]
    assert cache.room == 3 and all(layer.keys.shape[2] == k + 15 for layer, k in zip(cache.layers, kept))


def test_headwise_layers_pack_their_heads_and_write_in_place(small_room):
    """A head-wise layer's steps write into its packed buffers without moving them until the room is used up;
    every head holds its own kept slots plus one per step, and the bytes held are those slots plus the room."""
    model = entropykv_fx.optimize(tiny_model("llama"), policy="adakv", budget=0.5, window=4)
    with torch.no_grad():
        out = model(random_prompt(40), use_cache=True)
        cache = compat.cache_of(out)
        kept = [layer.head_lengths() for layer in cache.layers]
        token, addresses = out.logits[:, -1:].argmax(-1), []
        for _ in range(12):
            out = model(token, **compat.with_cache(cache), use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
            addresses.append(cache.layers[0].packed.keys.data_ptr())
    layer = cache.layers[0]
    assert len(set(addresses[:5])) == 1 and len(set(addresses[5:10])) == 1 and addresses[4] != addresses[5]
    assert [layer.head_lengths() for layer in cache.layers] == [[n + 12 for n in k] for k in kept]
    assert cache.room == 3 and layer.packed.caps == [n + 15 for n in kept[0]]
    keys = layer.packed.keys
    assert layer.nbytes == 2 * sum(n + 15 for n in kept[0]) * keys.shape[-1] * keys.element_size()
    heads = layer.heads  # back to the plain layout: each head's written slots, in order
    assert layer.packed is None and [h.positions.shape[-1] for h in heads] == [n + 12 for n in kept[0]]
    assert all(h.positions[0, -12:].tolist() == list(range(40, 52)) for h in heads)


@pytest.mark.parametrize(("arch", "policy"), [("qwen3", "uniform"), ("mistral", "uniform"), ("mistral", "adakv")])
def test_a_longer_continuation_after_decoding_leaves_the_room(arch, policy, small_room, plain_layout):
    """A chat turn: decode, then feed several tokens at once, then decode again; logits equal the plain layout's.
    Mistral's window layers are rings that have wrapped by then: compacting puts their slots back in order."""
    def turns(model):
        with torch.no_grad():
            out = model(random_prompt(50), use_cache=True)
            cache, logits = compat.cache_of(out), []
            for step in range(40):
                token = random_prompt(9, seed=step) if step == 30 else out.logits[:, -1:].argmax(-1)
                out = model(token, **compat.with_cache(cache), use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits), cache

    got, cache = turns(entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.4, window=4))
    assert cache.room > 0
    plain_layout()
    want, _ = turns(entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.4, window=4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "policy"), [("llama", "uniform"), ("mistral", "uniform"), ("mistral", "adakv")])
def test_a_padded_step_takes_no_slot(arch, policy, small_room, plain_layout):
    """A one-token step whose token is masked out in one row (attention_mask 0) leaves that row's cache as it
    was: its next token takes the same slot, in the room and in a full ring; logits equal the plain layout's."""
    ids, mask = left_padded([random_prompt(n, seed=n)[0] for n in (40, 33)])

    def steps(model):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=True)
            cache, logits, seen = compat.cache_of(out), [], mask
            for step in range(30):
                token = out.logits[:, -1:].argmax(-1)
                seen = torch.cat([seen, torch.tensor([[1], [0 if step in (3, 20) else 1]], device=DEVICE)], 1)
                out = model(token, attention_mask=seen, **compat.with_cache(cache), use_cache=True)
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    got = steps(entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.5, window=4))
    plain_layout()
    want = steps(entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.5, window=4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_sliding_window_layers_are_rings_of_the_window():
    """Mistral's window layers hold exactly `window` slots however long the generation, never refilled; the tokens
    are the unmodified model's."""
    ids = random_prompt(30)
    model = entropykv_fx.optimize(tiny_model("mistral"), policy="full")
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=60, do_sample=False, return_dict_in_generate=True)
        want = tiny_model("mistral").generate(ids, max_new_tokens=60, do_sample=False)
    window = model.config.sliding_window
    assert all(layer.ring and layer.keys.shape[2] == window for layer in compat.cache_of(out).layers)
    assert torch.equal(out.sequences, want)


def test_beam_search_matches_the_plain_layout(plain_layout):
    """Beam search reorders the cache between steps: the room is given up and reserved again."""
    ids = random_prompt(40)
    kw = dict(max_new_tokens=8, num_beams=3, do_sample=False)
    with torch.no_grad():
        got = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=0.5, window=4).generate(ids, **kw)
        plain_layout()
        want = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=0.5, window=4).generate(ids, **kw)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------- CUDA graphs (GPU only)
gpu_only = pytest.mark.skipif(not GPU, reason="CUDA graphs need a GPU: ENTROPYKV_TEST_DEVICE=cuda on the GPU machine")


@gpu_only
@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("policy", ["uniform", "adakv"])
def test_replayed_steps_equal_eager_steps(arch, policy, small_room):
    """Greedy tokens and logits over many refills and a batch with pads: replayed graphs = eager steps, layer-wise
    and packed head-wise."""
    prompts = [random_prompt(n, seed=n)[0] for n in (90, 57)]
    ids, mask = left_padded(prompts)
    runs = {}
    for graphs in (True, False):
        model = entropykv_fx.optimize(tiny_model(arch), policy=policy, budget=0.3, window=6, cuda_graphs=graphs)
        runs[graphs] = generate(model, ids, 40, attention_mask=mask)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    torch.testing.assert_close(torch.stack(runs[True].scores), torch.stack(runs[False].scores), rtol=1e-5, atol=1e-5)


@gpu_only
def test_sampling_and_a_new_cache_record_new_graphs():
    """Seeded sampling gives the eager steps' tokens; a second generate (a new cache) does not replay the first
    one's graph."""
    ids = random_prompt(64)
    model = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=0.5, window=4)
    eager = entropykv_fx.optimize(tiny_model("llama"), policy="uniform", budget=0.5, window=4, cuda_graphs=False)
    for prompt in (ids, random_prompt(64, seed=5)):
        outs = []
        for m in (model, eager):
            torch.manual_seed(0)
            with torch.no_grad():
                outs.append(m.generate(prompt, max_new_tokens=30, do_sample=True, top_k=20))
        assert torch.equal(*outs)
    assert model.entropykv._step_graph is not None and eager.entropykv._step_graph is None
