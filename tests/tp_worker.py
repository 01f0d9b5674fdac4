"""Run by tests/test_tensor_parallel.py under `torchrun --nproc-per-node 2` (gloo, CPU): the tiny Llama saved at
argv[1], loaded with transformers' tp_plan="auto", generates under every configuration of `CONFIGS`; rank 0 writes
tokens, kept positions and the refusals to the JSON file argv[2]."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from transformers import LlamaForCausalLM

import entropykv_fx
from entropykv_fx import StaticDecoder, compat, hf

# (policy, scorer, budget): every layer-wise policy at full and reduced budgets; the other scorers on two of them;
# every head-wise policy (each rank keeps its heads' share of one plan over all heads); the cache-wide top-k, both
# granularities (the default composition, cache_topk + reconstruct, among them)
CONFIGS = [(p, "window", b) for p in ("uniform", "entropy", "pyramidkv", "streaming", "full") for b in (1.0, 0.3)] + [
    ("uniform", "last_query", 0.3), ("entropy", "last_query", 40), ("uniform", "reconstruct", 0.3),
    ("pyramidkv", "reconstruct", 1.0)] + [
    ("adakv", "window", 1.0), ("adakv", "window", 0.3), ("snapkv", "last_query", 0.3), ("entropy_head", "window", 0.5),
    ("matrix_entropy", "window", 0.3), ("cache_topk", "reconstruct", 0.3), ("cache_topk_layer", "reconstruct", 0.3)]


def kept_positions(cache) -> list:
    """Per layer: its positions [B, S], or for a head-wise layer each KV head's [B, K_h]."""
    return [[head.positions.tolist() for head in layer.heads] if hasattr(layer, "heads") else layer.positions.tolist()
            for layer in cache.layers]


def prompts() -> tuple[torch.Tensor, torch.Tensor]:
    """Two prompts of 160 and 130 tokens, left-padded."""
    ids = torch.randint(1, 320, (2, 160), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    ids[1, :30], mask[1, :30] = 0, 0
    return ids, mask


def run(model, policy: str, scorer: str, budget: float, **flags) -> dict:
    entropykv_fx.optimize(model, policy=policy, scorer=scorer, budget=budget, window=8, sink_tokens=2, **flags)
    ids, mask = prompts()
    with torch.no_grad():
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
        cache = compat.cache_of(model(ids, attention_mask=mask, use_cache=True))
    return {"tokens": tokens.tolist(), "positions": kept_positions(cache)}


def static_decode(model) -> list:
    """Greedy tokens of `StaticDecoder` after a compressed prefill (uniform, 30% kept) of the two prompts."""
    entropykv_fx.optimize(model, policy="uniform", scorer="window", budget=0.3, window=8, sink_tokens=2)
    ids, mask = prompts()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        decoder = StaticDecoder(model, compat.cache_of(out), max_new_tokens=8)
        return decoder.generate(out.logits[:, -1:].argmax(-1), steps=6).tolist()


def main() -> None:
    model = LlamaForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto").eval()
    ids, mask = prompts()
    with torch.no_grad():
        out = {"unmodified": model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 160:].tolist()}
    out["runs"] = [run(model, *config, verify_ranks=True) for config in CONFIGS]
    out["static"] = static_decode(model)
    refused = {}
    for name, overrides in (("key_norm", {"scorer": "key_norm"}),):
        try:
            entropykv_fx.optimize(model, **overrides)
        except entropykv_fx.UnsupportedModelError as e:
            refused[name] = str(e)
    # The guard: with each rank deciding from its own heads only, the ranks keep different positions (layer-wise)
    # or plan from different statistics (head-wise).
    hf.combine_prefill_stats = lambda *args, **kwargs: None
    for name, policy in (("guard", "uniform"), ("guard_headwise", "adakv")):
        try:
            run(model, policy, "window", 0.3, verify_ranks=True)
        except entropykv_fx.RankDivergenceError as e:
            refused[name] = str(e)
    out["refused"] = refused
    if dist.get_rank() == 0:
        with open(sys.argv[2], "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main()
