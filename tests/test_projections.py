"""Fused projections (issue 18): q/k/v and gate/up weights laid out in one tensor per group, computed by one
matmul in decode graphs (`entropykv_fx.projections`, `passes.fuse_projections`)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHS, DEVICE, left_padded, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx import compat
from entropykv_fx.passes import backend as backend_module
from entropykv_fx.projections import GROUPS

pytestmark = pytest.mark.filterwarnings("ignore:entropykv. budget")


def generate(model, ids, n, **kw):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False, output_scores=True, return_dict_in_generate=True,
                              **kw)


def linears(model):
    return [getattr(getattr(layer, owner), name) for layer in model.model.layers for owner, names in GROUPS
            for name in names]


def matmuls_per_decode_graph(run) -> list[int]:
    """Linear calls left in each decode graph compiled while `run()` runs."""
    counts = []
    original = backend_module.EntropyKVBackend._compile

    def count(self, gm, example_inputs):
        if self.on_stats is None:
            counts.append(sum(n.op == "call_function" and n.target is torch._C._nn.linear for n in gm.graph.nodes))
        return original(self, gm, example_inputs)

    backend_module.EntropyKVBackend._compile = count
    try:
        run()
    finally:
        backend_module.EntropyKVBackend._compile = original
    return counts


@pytest.mark.compat
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_fused_decode_gives_the_unfused_tokens_and_logits(arch):
    """Every architecture (Qwen2's q/k/v biases fused too), a left-padded batch, a compressed cache: the same greedy
    tokens and logits as with `fuse_projections=False`."""
    ids, mask = left_padded([random_prompt(n, seed=n)[0] for n in (50, 33)])
    got = generate(entropykv_fx.optimize(tiny_model(arch), budget=0.4, window=6), ids, 12, attention_mask=mask)
    want = generate(entropykv_fx.optimize(tiny_model(arch), budget=0.4, window=6, fuse_projections=False), ids, 12,
                    attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences)
    torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), rtol=1e-5, atol=1e-5)


def test_decode_graphs_run_one_matmul_per_group():
    """3 layers x (q/k/v + gate/up fused: 2, o_proj and down_proj: 2) + lm_head outside the decoder = 12 linear
    calls in a decode graph, against 3 x 7 = 21 unfused."""
    ids = random_prompt(30)
    for fuse, linears_left in ((True, 12), (False, 21)):
        model = entropykv_fx.optimize(tiny_model("llama"), budget=0.5, fuse_projections=fuse)
        assert set(matmuls_per_decode_graph(lambda model=model: generate(model, ids, 3))) == {linears_left}


def test_weights_share_one_tensor_until_restored():
    """While optimized, each group's weights are consecutive rows of one tensor (no extra memory); restore() and
    fuse_projections=False give every Linear its own tensor again, with the same values."""
    model = tiny_model("qwen2")
    before = [(m.weight.clone(), m.bias.clone() if m.bias is not None else None) for m in linears(model)]
    entropykv_fx.optimize(model)
    q, k, v = (getattr(model.model.layers[0].self_attn, n) for n in ("q_proj", "k_proj", "v_proj"))
    assert q.weight.untyped_storage().data_ptr() == v.weight.untyped_storage().data_ptr()
    assert k.weight.data_ptr() == q.weight.data_ptr() + q.weight.nbytes
    assert k.bias.data_ptr() == q.bias.data_ptr() + q.bias.nbytes
    for undo in (lambda: entropykv_fx.optimize(model, fuse_projections=False), lambda: entropykv_fx.restore(model)):
        entropykv_fx.optimize(model, fuse_projections=True)
        undo()
        storages = {m.weight.untyped_storage().data_ptr() for m in linears(model)}
        assert len(storages) == len(linears(model))
        for m, (w, b) in zip(linears(model), before):
            assert torch.equal(m.weight, w) and (b is None or torch.equal(m.bias, b))


def test_a_replaced_weight_is_used_at_the_next_sequence():
    """A parameter replaced after optimize() (e.g. new weights assigned) is fused again at the next prefill, so
    decoding uses it: the tokens equal the unmodified model's with the same new weight."""
    ids = random_prompt(24)
    model = entropykv_fx.optimize(tiny_model("llama"), policy="full")
    generate(model, ids, 3)
    torch.manual_seed(5)
    new = torch.nn.Parameter(torch.randn_like(model.model.layers[1].self_attn.k_proj.weight))
    model.model.layers[1].self_attn.k_proj.weight = new
    got = generate(model, ids, 8).sequences
    reference = tiny_model("llama")
    reference.model.layers[1].self_attn.k_proj.weight = torch.nn.Parameter(new.detach().clone())
    with torch.no_grad():
        want = reference.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)


def test_a_graph_that_records_gradients_is_not_fused():
    """The fused view reaches past the first weight, where no gradient can go: a decode graph compiled with
    gradients enabled keeps one matmul per weight (21 linear calls)."""
    model = entropykv_fx.optimize(tiny_model("llama"), budget=0.5)
    ids = random_prompt(30)

    def prefill_and_step():
        with torch.enable_grad():
            cache = compat.cache_of(model(ids, use_cache=True))
            model(ids[:, :1], **compat.with_cache(cache), use_cache=True)

    assert matmuls_per_decode_graph(prefill_and_step) == [21]


def test_options_are_kept_until_given_again(tmp_path):
    """A later optimize() call without an option keeps the model's current value; saving while fused round-trips."""
    model = entropykv_fx.optimize(tiny_model("qwen2"), fuse_projections=False, cuda_graphs=False)
    entropykv_fx.optimize(model, budget=0.1)
    handle = model.entropykv
    assert (handle.fuse_projections, handle.cuda_graphs, handle.projections) == (False, False, None)
    entropykv_fx.optimize(model, fuse_projections=True)
    assert handle.projections is not None and handle.cuda_graphs is False
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    entropykv_fx.optimize(model, inductor=True, mode="reduce-overhead")
    entropykv_fx.optimize(model, policy="entropy")
    assert (handle.inductor, handle.mode) == (True, "reduce-overhead")
    entropykv_fx.optimize(model, inductor=False)  # the mode follows inductor when that is given
    assert (handle.inductor, handle.mode) == (False, None)
    with pytest.raises(entropykv_fx.errors.InputError, match="pass inductor=True with it"):
        entropykv_fx.optimize(model, mode="max-autotune")


def test_fuse_projections_must_be_a_bool():
    with pytest.raises(entropykv_fx.errors.ArgumentTypeError, match="fuse_projections"):
        entropykv_fx.optimize(tiny_model("llama"), fuse_projections="yes")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graph replay needs a GPU")
def test_replayed_fused_steps_equal_unfused_eager_steps():
    ids, mask = left_padded([random_prompt(n, seed=n)[0] for n in (40, 29)])
    model = tiny_model("llama", dtype=torch.bfloat16)
    got = generate(entropykv_fx.optimize(model, budget=0.5), ids, 10, attention_mask=mask)
    want = generate(entropykv_fx.optimize(model, budget=0.5, fuse_projections=False, cuda_graphs=False), ids, 10,
                    attention_mask=mask)
    assert torch.equal(got.sequences, want.sequences)
