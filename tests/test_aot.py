"""Ahead-of-time export: rewritten prefill/decode programs, the AOTInductor package in a fresh process, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from tiny_models import DEVICE, random_prompt, tiny_model

import entropykv_fx
from entropykv_fx.aot import ExportError
from entropykv_fx.exported import ExportedGenerator

PROMPT, NEW = 96, 8


def _calibrated(tmp_path, arch, fractions):
    path = tmp_path / "budgets.json"
    path.write_text(json.dumps({"layer_fractions": fractions}))
    return entropykv_fx.optimize(tiny_model(arch), budget_source="calibrated", calibration_file=str(path))


@pytest.mark.compat
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_exported_programs_generate_the_optimized_models_tokens_with_compressed_kv_inputs(tmp_path, arch):
    model = _calibrated(tmp_path, arch, [0.6, 0.5, 0.7])
    ids = random_prompt(PROMPT, seed=5)
    want = model.generate(ids, max_new_tokens=NEW, do_sample=False)[:, PROMPT:]
    layout = json.loads(entropykv_fx.export(model, tmp_path / "out", prompt_length=PROMPT, max_new_tokens=NEW,
                                            aoti=False).read_text())
    assert layout["budgets"] == [round(f * PROMPT) for f in (0.6, 0.5, 0.7)]
    assert layout["capacities"] == [b + NEW for b in layout["budgets"]]
    decode = torch.export.load(tmp_path / "out" / "decode.pt2")
    cache_inputs = [s for s in decode.graph_module.graph.find_nodes(op="placeholder") if "flat_cache" in s.name]
    shapes = [tuple(n.meta["val"].shape) for n in cache_inputs]
    heads, dim = model.config.num_key_value_heads, model.config.head_dim
    assert shapes == [s for c in layout["capacities"] for s in ((1, heads, c, dim), (1, heads, c, dim), (1, c))]
    targets = {n.target for n in decode.graph_module.graph.nodes}
    assert torch.ops.entropykv.attention.default in targets and torch.ops.entropykv.write.default in targets
    assert torch.ops.aten.scaled_dot_product_attention.default not in targets, "every site was rewritten"
    got = ExportedGenerator(tmp_path / "out", kind="pt2", trust_code=True).generate(ids, NEW)
    assert torch.equal(got.cpu(), want.cpu())


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the AOTInductor check runs on the CPU build")
def test_aoti_package_runs_in_a_fresh_process_without_transformers_and_full_budget_matches_unmodified(tmp_path):
    model = _calibrated(tmp_path, "qwen2", [1.0, 1.0, 1.0])
    ids = random_prompt(40, seed=9)
    want = tiny_model("qwen2").generate(ids, max_new_tokens=NEW, do_sample=False)[:, 40:]
    entropykv_fx.export(model, tmp_path / "out", prompt_length=48, max_new_tokens=NEW)  # prompt left-padded by 8
    torch.save(ids, tmp_path / "ids.pt")
    code = ("import sys, torch\nfrom entropykv_fx.exported import ExportedGenerator\n"
            f"tokens = ExportedGenerator({str(tmp_path / 'out')!r}, trust_code=True).generate(torch.load({str(tmp_path / 'ids.pt')!r}), {NEW})\n"
            "print(tokens.tolist(), 'transformers' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[0] == f"{want.tolist()} False"


def test_export_refuses_dynamic_budgets_unoptimized_models_and_bad_sizes(tmp_path):
    with pytest.raises(ExportError, match="optimize the model first"):
        entropykv_fx.export(tiny_model("llama"), tmp_path, prompt_length=8, max_new_tokens=2)
    with pytest.raises(ExportError, match="need static budgets.*calibrate"):
        entropykv_fx.export(entropykv_fx.optimize(tiny_model("llama")), tmp_path, prompt_length=8, max_new_tokens=2)
    model = _calibrated(tmp_path, "llama", [0.5, 0.5, 0.5])
    with pytest.raises(ExportError, match="must be >= 1"):
        entropykv_fx.export(model, tmp_path, prompt_length=64, max_new_tokens=0)


def test_exported_generator_rejects_what_the_export_cannot_hold(tmp_path):
    model = _calibrated(tmp_path, "llama", [0.5, 0.5, 0.5])
    entropykv_fx.export(model, tmp_path / "out", prompt_length=64, max_new_tokens=4, aoti=False)
    gen = ExportedGenerator(tmp_path / "out", kind="pt2", trust_code=True)
    with pytest.raises(ValueError, match=r"input_ids must be \[1, <= 64\]"):
        gen.generate(random_prompt(65), 2)
    with pytest.raises(ValueError, match="max_new_tokens must be in 1..4"):
        gen.generate(random_prompt(10), 5)
    with pytest.raises(ValueError, match=r"no aoti programs in .*available: \['pt2'\]"):
        ExportedGenerator(tmp_path / "out", kind="aoti")
    with pytest.raises(FileNotFoundError, match="not a directory written by an entropykv_fx exporter"):
        ExportedGenerator(tmp_path)


def test_a_graph_without_attention_or_with_unpairable_attention_is_refused_by_export():
    from test_passes import MathAttention

    from entropykv_fx.aot import _rewritten
    from entropykv_fx.passes import RewriteSettings

    with pytest.raises(ExportError, match="holds no attention site"):
        _rewritten(torch.nn.Linear(4, 4), (torch.randn(2, 4),), RewriteSettings())
    with pytest.raises(ExportError, match="(?s)could not be rewritten.*do not come from an entropykv cache"):
        _rewritten(MathAttention(), tuple(torch.randn(1, 2, 6, 8) for _ in range(3)), RewriteSettings())
