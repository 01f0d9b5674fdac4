"""`optimize()` under transformers' tensor parallelism (issue 20): two CPU processes (torchrun, gloo) keep the same
positions and generate the same tokens as one process, for every policy (`tests/tp_worker.py`); a head-wise policy's
rank 0 holds the first half of each layer's KV heads and keeps exactly what one process keeps in them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from tp_worker import CONFIGS, kept_positions, prompts, static_decode
from transformers import LlamaConfig, LlamaForCausalLM

import entropykv_fx
from entropykv_fx import compat

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")


@pytest.fixture(scope="module")
def tensor_parallel_run(tmp_path_factory):
    """(the saved model's directory, what rank 0 of the two-process run recorded)."""
    root = tmp_path_factory.mktemp("tp")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent),
                                                                               os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).parent / "tp_worker.py"), str(root / "model"), str(root / "out.json")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "model", json.loads((root / "out.json").read_text())


def test_ranks_keep_and_generate_what_one_process_does(tensor_parallel_run):
    path, recorded = tensor_parallel_run
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids, mask = prompts()
    with torch.no_grad():
        unmodified = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 160:]
    assert recorded["unmodified"] == unmodified.tolist()
    for (policy, scorer, budget), got in zip(CONFIGS, recorded["runs"]):
        entropykv_fx.optimize(model, policy=policy, scorer=scorer, budget=budget, window=8, sink_tokens=2)
        with torch.no_grad():
            tokens = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)[:, 160:]
            cache = compat.cache_of(model(ids, attention_mask=mask, use_cache=True))
        where = f"{policy}/{scorer}/{budget}"
        want = kept_positions(cache)
        if hasattr(cache.layers[0], "heads"):  # a head-wise layout: rank 0 holds the first half of the KV heads
            want = [heads[:len(heads) // 2] for heads in want]
        assert got["positions"] == want, where
        assert got["tokens"] == tokens.tolist(), where
        if budget == 1.0:
            assert got["tokens"] == unmodified.tolist(), where


def test_static_decoder_on_ranks_decodes_what_one_process_does(tensor_parallel_run):
    """`StaticDecoder` (the model's own modules, its sharded projections and their collectives) over each rank's
    shard of a compressed cache gives one process's tokens."""
    path, recorded = tensor_parallel_run
    assert recorded["static"] == static_decode(LlamaForCausalLM.from_pretrained(path).eval())


def test_what_is_not_supported_is_refused_and_divergence_is_caught(tensor_parallel_run):
    refused = tensor_parallel_run[1]["refused"]
    assert "scorer 'key_norm'" in refused["key_norm"]
    assert "kept different token positions in layers" in refused["guard"]
    assert "decide from different statistics in layers" in refused["guard_headwise"]
