"""Models with their own static KV buffers (gpt-fast style, SDPA or eager math), rewritten by the static-cache pass."""

from __future__ import annotations

import copy

import pytest
import torch
from static_models import TinyGPT

from entropykv_fx.static import StaticCacheModel

PROMPT, NEW = 60, 12


def greedy(fn, ids: torch.Tensor, new: int = NEW, before_decode=None) -> torch.Tensor:
    n = ids.shape[1]
    with torch.no_grad():
        tokens = [fn(ids, torch.arange(n, device=ids.device))[:, -1].argmax(-1)]
        if before_decode is not None:
            before_decode()
        for t in range(new - 1):
            tokens.append(fn(tokens[-1][:, None], torch.tensor([n + t], device=ids.device))[:, -1].argmax(-1))
    return torch.stack(tokens, 1)


def pair(eager: bool, seed: int = 0) -> tuple[TinyGPT, TinyGPT]:
    torch.manual_seed(seed)
    ref = TinyGPT(eager=eager).eval()
    return ref, copy.deepcopy(ref)


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager-math"])
def test_full_budget_reproduces_the_models_own_tokens(eager):
    ref, model = pair(eager)
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    wrapped = StaticCacheModel(model, policy="full")
    assert torch.equal(greedy(wrapped, ids), greedy(ref, ids))
    assert wrapped.kept_slots() == [PROMPT + NEW - 1] * 3


@pytest.mark.parametrize("eager", [False, True], ids=["sdpa", "eager-math"])
def test_compressed_decode_equals_the_model_with_evicted_tokens_masked(eager):
    """The oracle: the unmodified model whose decode rows cannot see the tokens the pass evicted, layer by layer."""
    ref, model = pair(eager, seed=3)
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(4))
    unmasked = greedy(copy.deepcopy(ref), ids)
    wrapped = StaticCacheModel(model, policy="uniform", budget=0.5, window=8, sink_tokens=2)
    got = greedy(wrapped, ids)
    assert not torch.equal(got, unmasked), "this case is chosen so that eviction changes the tokens"
    kept = [layer.positions[0, :PROMPT // 2].tolist() for layer in wrapped.layers]
    assert wrapped.kept_slots() == [PROMPT // 2 + NEW - 1] * 3
    for positions in kept:
        assert positions == sorted(positions) and positions[:2] == [0, 1] and positions[-8:] == list(range(52, 60))

    def hide_evicted():
        for layer, positions in zip(ref.layers, kept):
            evicted = sorted(set(range(PROMPT)) - set(positions))
            layer.causal[PROMPT:, evicted] = False
    assert torch.equal(got, greedy(ref, ids, before_decode=hide_evicted))


@pytest.mark.parametrize("mode", [None, pytest.param("reduce-overhead", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA graphs need a GPU"))], ids=["inductor", "inductor-cudagraphs"])
def test_inductor_compiles_the_compressed_static_decode(mode):
    """Inductor (and on GPU its CUDA graphs: static buffers, static shapes) runs the same rewritten graphs."""
    device = "cuda" if mode else "cpu"
    ref, model = pair(False, seed=3)
    options = {"policy": "uniform", "budget": 0.5, "window": 8, "sink_tokens": 2}
    eager = StaticCacheModel(ref.to(device), **options)
    compiled = StaticCacheModel(model.to(device), inductor=True, mode=mode, **options)
    ids = torch.randint(1, 97, (1, PROMPT), generator=torch.Generator().manual_seed(4)).to(device)
    torch._dynamo.utils.counters.clear()
    assert torch.equal(greedy(compiled, ids), greedy(eager, ids))
    assert compiled.kept_slots() == eager.kept_slots() == [PROMPT // 2 + NEW - 1] * 3
    if mode:
        assert not torch._dynamo.utils.counters["inductor"]["cudagraph_skips"], "CUDA graphs were skipped"
        # Copied into the graph at each replay: only the token and input_pos of each recorded graph (prefill,
        # decode), never the 3 x 4 cache buffers and positions/slot state (H100, torch 2.11: 2).
        assert torch._dynamo.utils.counters["inductor"]["cudagraph_recorded_non_static_inputs"] <= 2 * 2


def test_reset_starts_a_new_sequence_and_a_new_prompt_length_recompiles_with_the_same_buffers():
    ref, model = pair(False, seed=5)
    wrapped = StaticCacheModel(model, policy="full")
    first = torch.randint(1, 97, (1, 40), generator=torch.Generator().manual_seed(6))
    second = torch.randint(1, 97, (1, 52), generator=torch.Generator().manual_seed(7))
    greedy(wrapped, first)
    wrapped.reset()
    assert wrapped.kept_slots() == [0, 0, 0]
    assert torch.equal(greedy(wrapped, second), greedy(ref, second))


def test_models_it_cannot_rewrite_and_unsupported_policies_are_refused():
    from test_passes import MathAttention

    with pytest.raises(ValueError, match="layer budgets come from entropies alone, with dynamic budgets"):
        StaticCacheModel(TinyGPT(), policy="snapkv")
    wrapped = StaticCacheModel(MathAttention())
    with pytest.raises(Exception, match="not static buffers written at input_pos"):
        wrapped(*(torch.randn(1, 2, 6, 8) for _ in range(3)))
