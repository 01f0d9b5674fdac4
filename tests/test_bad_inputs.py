"""Bad inputs at every public entry point get a clear EntropyKVError (or FileNotFoundError) naming the culprit,
raised before the expensive step (issue 19).

Each row: (category, call, expected exception, a substring of the message naming the culprit). The `traps`
fixture makes every expensive step raise `Reached` (a BaseException, so no handler of ours can swallow it):
compiling or running a prefill, tracing an export, loading exported programs, loading the default model. A row
that reaches one fails with `Reached` instead of its expected error. CLI rows expect exit status 2 and the
culprit in the last stderr line (one line in all unless argparse printed its usage first).
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tiny_models import calibrated, random_prompt, tiny_model
from transformers import DynamicCache

import entropykv_fx
import entropykv_fx.aot
import entropykv_fx.calibrate
import entropykv_fx.demo
import entropykv_fx.models
from entropykv_fx import ConfigError, EntropyKVConfig, ExportError
from entropykv_fx.cache import EntropyKVCache
from entropykv_fx.cli import main
from entropykv_fx.errors import ArgumentTypeError, BudgetFloorWarning, EntropyKVError, InputError
from entropykv_fx.exported import ExportedGenerator, ExportLayout, read_layout
from entropykv_fx.exporters.runner import BufferedGenerator
from entropykv_fx.hf import UnsupportedCallError, UnsupportedModelError

pytestmark = pytest.mark.filterwarnings("ignore::entropykv_fx.errors.BudgetFloorWarning")


class Reached(BaseException):
    """An expensive step ran: the bad input was not caught early enough."""


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    cal_dir = root / "cal"
    cal_dir.mkdir()
    return SimpleNamespace(root=root, plain=tiny_model("llama"), opt=entropykv_fx.optimize(tiny_model("llama")),
                           cal=calibrated(cal_dir, "llama", [0.5, 0.5, 0.5]))


@pytest.fixture
def traps(monkeypatch):
    install_traps(monkeypatch)


def install_traps(monkeypatch) -> None:
    """Every expensive step raises Reached (also used to count the table against older commits)."""
    def trap(name):
        def reached(*args, **kwargs):
            raise Reached(name)
        return reached

    monkeypatch.setattr(entropykv_fx.hf.Optimized, "_graph_for", trap("prefill graph"))
    monkeypatch.setattr(entropykv_fx.hf.Optimized, "_plain", trap("plain forward"))
    monkeypatch.setattr(torch.export, "export", trap("torch.export tracing"))
    monkeypatch.setattr(torch.export, "load", trap("loading a pt2 program"))
    monkeypatch.setattr(torch._inductor, "aoti_load_package", trap("loading an AOTInductor package"))
    monkeypatch.setattr(entropykv_fx.models, "load_default_model", trap("loading the default model"))
    monkeypatch.setattr(entropykv_fx.calibrate, "calibrate", trap("the calibration loop"))
    monkeypatch.setattr(entropykv_fx.demo, "load_default_model", trap("loading the default model"))


# ------------------------------------------------------------------------------------------------ helpers
def ids(n=8, batch=1):
    return random_prompt(n, batch=batch)


def write(path: Path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def calibration(tmp, content) -> str:
    return write(tmp / "cal.json", content)


def optimize_calibrated(c, tmp, content, **kw):
    return entropykv_fx.optimize(c.plain, budget_source="calibrated", calibration_file=calibration(tmp, content), **kw)


GOOD_LAYOUT = {"format": "entropykv-export/1", "num_layers": 1, "batch": 1, "prompt_length": 8, "max_new_tokens": 2,
               "budgets": [4], "capacities": [6], "kv_heads": 1, "head_dim": 4, "dtype": "float32", "device": "cpu",
               "vocab_size": 49152, "programs": {"pt2": ["prefill.pt2", "decode.pt2"]}}


def export_dir(tmp, **changes) -> Path:
    """A directory with a layout.json (GOOD_LAYOUT with `changes`; None deletes a key) and program files whose
    SHA-256 it records: it passes every check until the programs are loaded."""
    out = tmp / "export"
    out.mkdir()
    layout = {**GOOD_LAYOUT, "checksums": {}}
    for name in ("prefill.pt2", "decode.pt2"):
        (out / name).write_bytes(b"program " + name.encode())
        layout["checksums"][name] = hashlib.sha256((out / name).read_bytes()).hexdigest()
    layout.update(changes)
    layout = {k: v for k, v in layout.items() if v is not None}
    (out / "layout.json").write_text(json.dumps(layout))
    return out


def load_pt2(tmp, **changes):
    return ExportedGenerator(export_dir(tmp, **changes), kind="pt2", trust_code=True)


class _Gen(BufferedGenerator):
    name = "TestGenerator"

    def _prefill(self, ids, positions, cache):
        raise Reached("prefill of an exported program")


def generate(tokens, n=1):
    return _Gen(ExportLayout.from_dict(GOOD_LAYOUT), torch.device("cpu"), 0).generate(tokens, n)


def export(c, tmp, model=None, **kw):
    kw = {"prompt_length": 32, "max_new_tokens": 2, **kw}
    return entropykv_fx.export(model or c.cal, kw.pop("out", tmp / "out"), aoti=False, **kw)


def export_onnx(c, tmp, **kw):
    from entropykv_fx.exporters.onnx import export_onnx as run

    return run(c.cal, tmp / "out", **{"prompt_length": 32, "max_new_tokens": 2, **kw})


def used_cache(batch):
    cache = EntropyKVCache(3)
    cache.begin_step(torch.arange(4).expand(batch, -1))  # as after a prefill of 4 tokens
    return cache


def a_file(tmp):
    (tmp / "file").write_text("x")
    return tmp / "file"


def dir_with_program_dir(tmp):
    (tmp / "out" / "prefill.pt2").mkdir(parents=True)
    return tmp / "out"


def dir_with_layout_link(tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "layout.json").symlink_to(a_file(tmp))
    return tmp / "out"


def calib_cli(tmp, content=None):
    return write(tmp / "b.json", content if content is not None else {"layer_fractions": [0.5] * 30})


CLI = "cli"  # expected "exception" of a CLI row: exit status 2

# ------------------------------------------------------------------------------------------------ the table
ROWS = [
    # ---- config: every numeric field bounded, NaN and inf refused
    ("config", lambda c, t: EntropyKVConfig(max_layer_budget=1e308), ConfigError, "max_layer_budget=1e+308"),
    ("config", lambda c, t: EntropyKVConfig(max_layer_budget=2e6), ConfigError, "max_layer_budget"),
    ("config", lambda c, t: EntropyKVConfig(window=2**40), ConfigError, "window=1099511627776"),
    ("config", lambda c, t: EntropyKVConfig(sink_tokens=2**40), ConfigError, "sink_tokens"),
    ("config", lambda c, t: EntropyKVConfig(pool_kernel=2**41 + 1), ConfigError, "pool_kernel"),
    ("config", lambda c, t: EntropyKVConfig(matrix_rank=10**20), ConfigError, "matrix_rank"),
    ("config", lambda c, t: EntropyKVConfig(budget=10**20), ConfigError, "budget=100000000000000000000"),
    ("config", lambda c, t: EntropyKVConfig(head_groups=2**40), ConfigError, "head_groups"),
    ("config", lambda c, t: EntropyKVConfig(layer_groups=2**33), ConfigError, "layer_groups"),
    ("config", lambda c, t: EntropyKVConfig(crop_history=10**30), ConfigError, "crop_history"),
    ("config", lambda c, t: EntropyKVConfig(budget=float("inf")), ConfigError, "budget=inf"),
    ("config", lambda c, t: EntropyKVConfig(min_layer_budget=float("nan")), ConfigError, "min_layer_budget=nan"),
    ("config", lambda c, t: EntropyKVConfig(tier_thresholds=(float("nan"), 0.5)), ConfigError, "tier_thresholds"),
    ("config", lambda c, t: EntropyKVConfig(policy="x" * 500), ConfigError, "policy='xxxx"),
    ("config", lambda c, t: EntropyKVConfig().replace(windw=3), ConfigError, "windw"),
    ("config", lambda c, t: EntropyKVConfig(calibration="x"), ConfigError, "calibration"),
    # ---- optimize(): the model and the arguments, before the model is touched
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, config="entropy"), ArgumentTypeError, "'entropy'"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, {"policy": "entropy"}), ArgumentTypeError, "config"),
    ("model", lambda c, t: entropykv_fx.optimize("model"), UnsupportedModelError, "'model' is not supported"),
    ("model", lambda c, t: entropykv_fx.optimize(None), UnsupportedModelError, "None is not supported"),
    ("model", lambda c, t: entropykv_fx.optimize(torch.nn.Linear(2, 2)), UnsupportedModelError, "Linear"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, inductor="yes"), ArgumentTypeError, "inductor='yes'"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, cuda_graphs=1), ArgumentTypeError, "cuda_graphs=1"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, mode="reduce-overhead"), InputError, "mode="),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, inductor=True, mode="fast"), InputError, "mode='fast'"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, budgett=0.5), ConfigError, "budgett"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, max_layer_budget=1e308), ConfigError, "max_layer_budget"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, policy="nope"), ConfigError, "policy='nope'"),
    ("model", lambda c, t: entropykv_fx.optimize(c.plain, window=0), ConfigError, "window=0"),
    # ---- calibration files: parsed once, checked against the model at optimize()
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "model": "Qwen2ForCausalLM"}),
     ConfigError, "model='Qwen2ForCausalLM', but the model has model='LlamaForCausalLM'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "num_layers": 5}),
     ConfigError, "num_layers=5, but the model has num_layers=3"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "num_kv_heads": 4}),
     ConfigError, "num_kv_heads=4, but the model has num_kv_heads=2"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "num_attention_heads": 8}),
     ConfigError, "num_attention_heads=8"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 2}), ConfigError,
     "3 numbers in (0, 1]"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5, 1.5, 0.5]}), ConfigError,
     "'layer_fractions'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, '{"layer_fractions": [0.5, NaN, 0.5]}'), ConfigError,
     "'layer_fractions'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, "{broken"), ConfigError, "not valid JSON"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, b"\xff\xfe\x00"), ConfigError, "not valid JSON"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, ""), ConfigError, "cal.json"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, [0.5, 0.5, 0.5]), ConfigError, "the top level"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "model": 5}), ConfigError,
     "'model'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "num_layers": 0}),
     ConfigError, "'num_layers'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3, "window": -1}),
     ConfigError, "'window'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"layer_fractions": [0.5] * 3}, policy="snapkv"),
     ConfigError, "head_fractions"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"head_fractions": [[0.5, 0.5]] * 3,
                                                             "int8_heads": [[False, False]] * 3}, policy="uniform"),
     ConfigError, "'layer_fractions'"),
    ("calibration", lambda c, t: optimize_calibrated(c, t, {"head_fractions": [[0.5] * 4] * 3,
                                                             "int8_heads": [[False] * 4] * 3}, policy="snapkv"),
     ConfigError, "head_fractions is [3][4] but the model has 3 layers of 2 KV heads"),
    ("calibration", lambda c, t: entropykv_fx.optimize(c.plain, budget_source="calibrated", calibration_file=str(t)),
     ConfigError, "existing calibration JSON file"),
    ("calibration", lambda c, t: entropykv_fx.optimize(c.plain, budget_source="calibrated",
                                                       calibration_file=str(t / "missing.json")),
     ConfigError, "missing.json"),
    # ---- forward inputs of an optimized model: refused before any graph compiles or runs
    ("forward", lambda c, t: c.opt(ids(), attention_mask=torch.ones(1, 4)), UnsupportedCallError, "attention_mask"),
    ("forward", lambda c, t: c.opt(ids(), attention_mask=torch.ones(1, 12)), UnsupportedCallError,
     "attention_mask must be [batch, 8]"),
    ("forward", lambda c, t: c.opt(ids(), attention_mask=torch.ones(1, 1, 8)), UnsupportedCallError, "(1, 1, 8)"),
    ("forward", lambda c, t: c.opt(ids(), attention_mask=torch.ones(2, 8)), UnsupportedCallError, "attention_mask"),
    ("forward", lambda c, t: c.opt(ids()[0]), UnsupportedCallError, "got (8,)"),
    ("forward", lambda c, t: c.opt(ids()[:, :0]), UnsupportedCallError, "non-empty"),
    ("forward", lambda c, t: c.opt(ids().float()), UnsupportedCallError, "torch.float32"),
    ("forward", lambda c, t: c.opt(ids() > 0), UnsupportedCallError, "torch.bool"),
    ("forward", lambda c, t: c.opt(ids() + 1000), UnsupportedCallError, "0..96"),
    ("forward", lambda c, t: c.opt(ids() - 100), UnsupportedCallError, "0..96"),
    ("forward", lambda c, t: c.opt(ids(), position_ids=torch.arange(3)[None]), UnsupportedCallError, "position_ids"),
    ("forward", lambda c, t: c.opt(ids(), position_ids=torch.arange(8)), UnsupportedCallError, "got (8,)"),
    ("forward", lambda c, t: c.opt(ids(), position_ids=torch.arange(8.0)[None]), UnsupportedCallError,
     "position_ids must be integers"),
    ("forward", lambda c, t: c.opt(ids(), inputs_embeds=torch.zeros(1, 8, 64)), UnsupportedCallError, "exactly one"),
    ("forward", lambda c, t: c.opt(), UnsupportedCallError, "exactly one"),
    ("forward", lambda c, t: c.opt(inputs_embeds=torch.zeros(1, 8, 32)), UnsupportedCallError, "(1, 8, 32)"),
    ("forward", lambda c, t: c.opt(ids(), output_attentions=True), UnsupportedCallError, "output_attentions"),
    ("forward", lambda c, t: c.opt(ids(1, batch=2), past_key_values=used_cache(1), use_cache=True),
     UnsupportedCallError, "batch size changed from 1 to 2"),
    ("forward", lambda c, t: c.opt(ids(), past_key_values=EntropyKVCache(5), use_cache=True), UnsupportedCallError,
     "the cache has 5 layers, the model 3"),
    ("forward", lambda c, t: c.opt(ids(), past_key_values=((torch.zeros(1),),), use_cache=True),
     UnsupportedCallError, "tuple"),
    ("forward", lambda c, t: c.opt(ids(), past_key_values=_filled_dynamic_cache(), use_cache=True),
     UnsupportedCallError, "DynamicCache"),
    ("forward", lambda c, t: c.opt(ids(), attention_mask=torch.tensor([[1] * 7 + [0]])), UnsupportedCallError,
     "right padding"),
    # ---- export API: refused before tracing and before the directory is touched
    ("export", lambda c, t: export(c, t, model=tiny_model("llama")), ExportError, "optimize the model first"),
    ("export", lambda c, t: export(c, t, model=c.opt), ExportError, "budgets are dynamic"),
    ("export", lambda c, t: export(c, t, prompt_length=0), ExportError, "prompt_length=0"),
    ("export", lambda c, t: export(c, t, prompt_length=1.5), ExportError, "prompt_length=1.5"),
    ("export", lambda c, t: export(c, t, prompt_length=True), ExportError, "prompt_length=True"),
    ("export", lambda c, t: export(c, t, max_new_tokens=-1), ExportError, "max_new_tokens=-1"),
    ("export", lambda c, t: export(c, t, batch=0), ExportError, "batch=0"),
    ("export", lambda c, t: export(c, t, max_new_tokens=2**40), ExportError, "max_new_tokens=1099511627776"),
    ("export", lambda c, t: export_onnx(c, t, prompt_length="64"), ExportError, "prompt_length='64'"),
    ("export", lambda c, t: export(c, t, model=calibrated_headwise(t)), ExportError, "head-wise"),
    # ---- export directories: the target
    ("export dir", lambda c, t: export(c, t, out=a_file(t)), ExportError, "exists and is not a directory"),
    ("export dir", lambda c, t: export(c, t, out=a_file(t) / "sub"), ExportError, "cannot create"),
    ("export dir", lambda c, t: export(c, t, out=dir_with_program_dir(t)), ExportError, "prefill.pt2 is a directory"),
    ("export dir", lambda c, t: export(c, t, out=dir_with_layout_link(t)), ExportError, "layout.json is a symbolic"),
    ("export dir", lambda c, t: export_onnx(c, t, batch=-2), ExportError, "batch=-2"),
    # ---- export directories: loading (layout validated, files confined and checksummed, before any program loads)
    ("load", lambda c, t: ExportedGenerator(t, kind="pt2", trust_code=True), FileNotFoundError, "layout.json not found"),
    ("load", lambda c, t: read_layout(export_dir(t, format="entropykv-export/0")), ExportError,
     "format 'entropykv-export/0'"),
    ("load", lambda c, t: load_pt2(t, programs={"exe": ["a", "b"]}), ExportError, "'exe'"),
    ("load", lambda c, t: load_pt2(t, programs={"pt2": ["../prefill.pt2", "decode.pt2"]}), ExportError,
     "'../prefill.pt2'"),
    ("load", lambda c, t: load_pt2(t, programs={"pt2": ["sub/prefill.pt2", "decode.pt2"]}), ExportError,
     "'sub/prefill.pt2'"),
    ("load", lambda c, t: load_pt2(t, programs={"pt2": ["prefill.pt2"]}), ExportError, "programs['pt2']"),
    ("load", lambda c, t: load_pt2(t, capacities=[7]), ExportError, "'capacities'"),
    ("load", lambda c, t: load_pt2(t, budgets=[9], capacities=[11]), ExportError, "'budgets'"),
    ("load", lambda c, t: load_pt2(t, dtype="bogus"), ExportError, "dtype 'bogus'"),
    ("load", lambda c, t: load_pt2(t, vocab_size=0), ExportError, "'vocab_size'"),
    ("load", lambda c, t: load_pt2(t, num_layers=None), ExportError, "'num_layers'"),
    ("load", lambda c, t: load_pt2(t, num_layers=2), ExportError, "'budgets'"),
    ("load", lambda c, t: load_pt2(t, checksums=[]), ExportError, "'checksums'"),
    ("load", lambda c, t: load_pt2(t, checksums={"prefill.pt2": "0" * 64}), ExportError, "SHA-256"),
    ("load", lambda c, t: load_pt2(t, programs={"onnx": ["p.onnx", "d.onnx"]}), ExportError, "'onnx'"),
    ("load", lambda c, t: load_pt2(t, tokenizer=5), ExportError, "'tokenizer'"),
    ("load", lambda c, t: ExportedGenerator(export_dir(t), kind="pt2"), ExportError, "trust_code=True"),
    ("load", lambda c, t: ExportedGenerator(export_dir(t), kind="onnx"), InputError, "kind='onnx'"),
    # ---- generation with exported programs: checked before the prefill program runs
    ("generate", lambda c, t: generate(ids(), 0), InputError, "cache capacity), got 0"),
    ("generate", lambda c, t: generate(ids(), 3), InputError, "cache capacity), got 3"),
    ("generate", lambda c, t: generate(ids(), 1.0), InputError, "got 1.0"),
    ("generate", lambda c, t: generate(ids()[None]), InputError, "(1, 1, 8)"),
    ("generate", lambda c, t: generate(ids(9)), InputError, "(1, 9)"),
    ("generate", lambda c, t: generate(ids(4, batch=2)), InputError, "(2, 4)"),
    ("generate", lambda c, t: generate(ids()[:, :0]), InputError, "(1, 0)"),
    ("generate", lambda c, t: generate(ids().float()), InputError, "torch.float32"),
    ("generate", lambda c, t: generate(ids() + 60000), InputError, "0..49151"),
    # ---- CLI: exit 2, one line, before the model loads
    ("cli", lambda c, t: main(["calibrate", "--out", str(t)]), CLI, "is a directory"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--budget", "inf"]), CLI, "'inf'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--budget", "1.5"]), CLI, "'1.5'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--budget", "nan"]), CLI, "'nan'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--budget", "0"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--budget", "10"]), CLI, "budget=10"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--prompt-tokens", "0"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--prompt-tokens", "-5"]), CLI, "'-5'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--prompt-tokens", "1e3"]), CLI, "'1e3'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--policy", "nope"]), CLI, "policy='nope'"),
    ("cli", lambda c, t: main(["calibrate", "--out", str(t / "c.json"), "--texts", str(t / "no.txt")]), CLI, "no.txt"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration", calib_cli(t), "--out", str(t / "o"),
                               "--prompt-length", "0", "--max-new-tokens", "4"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration", calib_cli(t), "--out", str(t / "o"),
                               "--prompt-length", "64", "--max-new-tokens", "0"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration", str(t / "none.json"), "--out",
                               str(t / "o"), "--prompt-length", "64", "--max-new-tokens", "4"]), CLI, "none.json"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration", calib_cli(t, "{"), "--out",
                               str(t / "o"), "--prompt-length", "64", "--max-new-tokens", "4"]), CLI, "not valid JSON"),
    ("cli", lambda c, t: main(["export", "--format", "aoti", "--calibration",
                               calib_cli(t, {"layer_fractions": [0.5] * 28, "model": "Qwen2ForCausalLM",
                                             "num_layers": 28}),
                               "--out", str(t / "o"), "--prompt-length", "64", "--max-new-tokens", "4"]), CLI,
     "Qwen2ForCausalLM"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration",
                               calib_cli(t, {"layer_fractions": [0.5] * 30, "policy": "bogus"}),
                               "--out", str(t / "o"), "--prompt-length", "64", "--max-new-tokens", "4"]), CLI,
     "policy='bogus'"),
    ("cli", lambda c, t: main(["export", "--format", "onnx", "--calibration", calib_cli(t), "--out", str(a_file(t)),
                               "--prompt-length", "64", "--max-new-tokens", "4"]), CLI, "not a directory"),
    ("cli", lambda c, t: main(["run", str(export_dir(t)), "--prompt", "hi", "--max-new-tokens", "0"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["run", str(export_dir(t)), "--prompt", "hi", "--max-new-tokens", "5", "--trust-code"]),
     CLI, "cache capacity), got 5"),
    ("cli", lambda c, t: main(["run", str(export_dir(t, vocab_size=97)), "--prompt", "hi", "--trust-code"]), CLI,
     "vocabulary of 97"),
    ("cli", lambda c, t: main(["run", str(export_dir(t, tokenizer="gpt2")), "--prompt", "hi", "--trust-code"]), CLI,
     "gpt2"),
    ("cli", lambda c, t: main(["run", str(t / "nowhere"), "--prompt", "hi"]), CLI, "nowhere"),
    ("cli", lambda c, t: main(["run", str(export_dir(t)), "--prompt", "hi", "--format", "onnx"]), CLI, "--format onnx"),
    ("cli", lambda c, t: main(["demo", "--depth", "2"]), CLI, "'2'"),
    ("cli", lambda c, t: main(["demo", "--budgets", "1.5"]), CLI, "'1.5'"),
    ("cli", lambda c, t: main(["demo", "--policy", "nope"]), CLI, "policy='nope'"),
    ("cli", lambda c, t: main(["demo", "--scorer", "kvzip"]), CLI, "scorer='kvzip'"),
    ("cli", lambda c, t: main(["demo", "--prompt-tokens", "0"]), CLI, "'0'"),
    ("cli", lambda c, t: main(["demo", "--out", str(a_file(t))]), CLI, "is a file"),
]


def _filled_dynamic_cache():
    cache = DynamicCache()
    cache.update(torch.zeros(1, 2, 3, 32), torch.zeros(1, 2, 3, 32), 0)
    return cache


def calibrated_headwise(tmp):
    path = write(tmp / "h.json", {"head_fractions": [[0.5, 0.5]] * 3, "int8_heads": [[False, False]] * 3})
    return entropykv_fx.optimize(tiny_model("llama"), policy="snapkv", budget_source="calibrated",
                                 calibration_file=path)


def _ids(rows):
    seen: dict[str, int] = {}
    names = []
    for category, *_ in rows:
        seen[category] = seen.get(category, 0) + 1
        names.append(f"{category}-{seen[category]}")
    return names


def test_the_table_covers_every_category_with_at_least_80_rows():
    assert len(ROWS) >= 80
    assert {r[0] for r in ROWS} >= {"config", "model", "calibration", "forward", "export", "export dir", "load", "cli"}


@pytest.mark.parametrize("category, call, expected, culprit", ROWS, ids=_ids(ROWS))
def test_bad_input_is_refused_early_with_a_clear_error(ctx, tmp_path, traps, capsys, category, call, expected, culprit):
    if expected is CLI:
        try:
            status = call(ctx, tmp_path)
        except SystemExit as exit_:  # argparse: usage, then the error line
            status = exit_.code
        err = capsys.readouterr().err.strip().splitlines()
        assert status == 2, err
        assert culprit in err[-1], err
        assert len(err) == 1 or err[0].startswith("usage:"), err
        return
    with pytest.raises(expected) as info:
        call(ctx, tmp_path)
    assert isinstance(info.value, (EntropyKVError, FileNotFoundError)), type(info.value)
    assert culprit in str(info.value), str(info.value)
    assert "entropykv" not in ctx.plain.__dict__, "the model was changed before the error"


# ------------------------------------------------------------------------------------------------ beyond errors
def test_calibration_is_frozen_at_optimize_edit_or_delete_changes_nothing(tmp_path):
    path = tmp_path / "cal.json"
    path.write_text(json.dumps({"layer_fractions": [0.25, 0.5, 0.75], "model": "LlamaForCausalLM", "num_layers": 3}))
    model = entropykv_fx.optimize(tiny_model("llama"), budget_source="calibrated", calibration_file=str(path),
                                  window=4, sink_tokens=2)
    prompt = random_prompt(40, seed=3)

    def kept():
        with torch.no_grad():
            model(prompt, use_cache=True)
        return [r.slots_after for r in entropykv_fx.report(model).layers]

    want = kept()
    assert want == [10, 20, 30]
    path.write_text(json.dumps({"layer_fractions": [1.0, 1.0, 1.0]}))
    assert kept() == want
    path.unlink()
    assert kept() == want
    entropykv_fx.optimize(model, budget=0.5)  # a later reconfiguration keeps the parsed calibration too
    assert kept() == want


def test_calibrate_records_the_model_and_optimize_checks_it(tmp_path):
    from entropykv_fx.calibrate import calibrate

    path = calibrate(tiny_model("llama"), [random_prompt(48, seed=s) for s in range(2)], tmp_path / "c.json",
                     budget=0.5, window=8)
    data = json.loads(path.read_text())
    assert (data["model"], data["num_layers"], data["num_kv_heads"], data["num_attention_heads"]) == (
        "LlamaForCausalLM", 3, 2, 4)
    with pytest.raises(ConfigError, match="model='LlamaForCausalLM', but the model has model='Qwen2ForCausalLM'"):
        entropykv_fx.optimize(tiny_model("qwen2"), budget_source="calibrated", calibration_file=str(path))


def test_export_warns_when_the_floor_overrides_calibrated_budgets(tmp_path):
    model = calibrated(tmp_path, "llama", [0.14, 0.25, 0.52])
    # the instance: sink 4 + window 32 = 36 tokens always kept, more than any layer's budget at 64 tokens
    with pytest.warns(BudgetFloorWarning, match=r"layers \[0, 1, 2\] \(by up to 27 tokens\).*258-token prompt"):
        assert entropykv_fx.aot.static_budgets(model, 64) == [36, 36, 36]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert entropykv_fx.aot.static_budgets(model, 258) == [round(f * 258) for f in (0.14, 0.25, 0.52)]


def test_an_unexpected_cli_error_is_one_line_with_exit_1_and_the_traceback_on_request(tmp_path, capsys, monkeypatch):
    def broken():
        raise RuntimeError("backend refused the graph\n" + "  frame\n" * 100)

    monkeypatch.setattr(entropykv_fx.models, "load_default_model", broken)
    calibration = write(tmp_path / "b.json", {"layer_fractions": [0.5] * 30})
    argv = ["export", "--format", "onnx", "--calibration", calibration, "--out", str(tmp_path / "o"),
            "--prompt-length", "64", "--max-new-tokens", "4"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: backend refused the graph" in err[0] and "--debug" in err[0], err
    with pytest.raises(RuntimeError, match="backend refused"):
        main(["--debug", *argv])
    monkeypatch.setenv("ENTROPYKV_FX_DEBUG", "1")
    with pytest.raises(RuntimeError, match="backend refused"):
        main(argv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_int8_round_trips_tiny_and_zero_rows(dtype):
    from entropykv_fx import ops

    rows = torch.tensor([[1e-35, -3e-36, 5e-36, 0.0], [1e-31, 2e-31, -4e-31, 1e-32], [0.0] * 4, [1.0, -2.0, 0.5, 0.25]])
    if dtype != torch.float32:  # rows within the dtype's range: its smallest normal scaled up
        rows = rows / rows.abs().amax(-1, keepdim=True).clamp(min=1e-40) * torch.finfo(dtype).tiny * 8
        rows[3] = torch.tensor([1.0, -2.0, 0.5, 0.25])
    x = rows.to(dtype)
    q, scale = ops.quantize_int8(x)
    back = ops.dequantize_int8(q, scale)
    amax = x.float().abs().amax(-1, keepdim=True)
    assert torch.all((back - x.float()).abs() <= amax / 254 * 1.0001), (q, scale)
    assert q[:, :].abs().amax(-1).tolist()[:2] == [127, 127] and q[2].eq(0).all() and scale[2] == 0
