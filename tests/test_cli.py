"""The command line: argument errors exit non-zero with a readable message."""

from __future__ import annotations

import json
import sys

import pytest
from tiny_models import tiny_model

import entropykv_fx.models
from entropykv_fx.cli import main


def test_calibrate_missing_text_file(tmp_path, capsys):
    assert main(["calibrate", "--texts", str(tmp_path / "nope.txt"), "--out", str(tmp_path / "c.json")]) == 2
    assert "text files not found" in capsys.readouterr().err


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_export_without_calibration_file_fails_before_loading_the_model(tmp_path, capsys):
    argv = ["export", "--format", "onnx", "--calibration", str(tmp_path / "none.json"), "--out", str(tmp_path / "o"),
            "--prompt-length", "64", "--max-new-tokens", "8"]
    assert main(argv) == 2
    assert "calibration file" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_run_rejects_a_directory_without_layout(tmp_path, capsys):
    assert main(["run", str(tmp_path), "--prompt", "hi"]) == 2
    assert "layout.json not found" in capsys.readouterr().err


def fake_layout(directory, programs: dict) -> None:
    """A layout.json that passes validation, listing `programs` (the files need not exist)."""
    layout = {"format": "entropykv-export/1", "num_layers": 1, "batch": 1, "prompt_length": 8, "max_new_tokens": 2,
              "budgets": [4], "capacities": [6], "kv_heads": 1, "head_dim": 4, "dtype": "float32", "device": "cpu",
              "vocab_size": 49152, "programs": programs,  # SmolLM2's vocabulary: what `run` tokenizes with
              "onnx": {g: {"inputs": [], "outputs": []} for g in ("prefill", "decode")}}
    (directory / "layout.json").write_text(json.dumps(layout))


def test_run_reports_a_format_mismatch(tmp_path, capsys):
    fake_layout(tmp_path, {"pt2": ["p.pt2", "d.pt2"], "aoti": []})
    assert main(["run", str(tmp_path), "--prompt", "hi", "--format", "onnx"]) == 2
    assert "holds no onnx programs; it holds: ['pt2']" in capsys.readouterr().err


def test_run_refuses_code_carrying_programs_without_trust_code(tmp_path, capsys):
    fake_layout(tmp_path, {"pt2": ["p.pt2", "d.pt2"]})
    assert main(["run", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "can run code when loaded; pass --trust-code" in err and len(err.strip().splitlines()) == 1


def test_export_tensorrt_without_tensorrt_exits_2_and_keeps_the_checked_onnx(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as where TensorRT is not installed
    monkeypatch.setattr(entropykv_fx.models, "load_default_model", lambda: (tiny_model("llama"), None))
    calibration = tmp_path / "budgets.json"
    calibration.write_text(json.dumps({"layer_fractions": [0.5] * 3}))
    argv = ["export", "--format", "tensorrt", "--calibration", str(calibration), "--out", str(tmp_path / "o"),
            "--prompt-length", "32", "--max-new-tokens", "4"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "entropykv-fx export: error: TensorRT is not installed" in err and "trtexec --onnx=" in err
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"prefill.onnx", "decode.onnx", "layout.json"}


def test_run_with_tensorrt_programs_needs_tensorrt(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    fake_layout(tmp_path, {"tensorrt": ["prefill.engine", "decode.engine"]})
    assert main(["run", str(tmp_path), "--prompt", "hi", "--trust-code"]) == 2  # tensorrt is picked first when held
    assert "TensorRT is not installed" in capsys.readouterr().err


def test_help_imports_no_torch_and_documents_every_option():
    """`entropykv-fx --help` must not load torch (seconds), and every option says what it is."""
    import argparse
    import subprocess

    probe = ("import sys, entropykv_fx.cli as cli; cli.build_parser(); "
             "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
    from entropykv_fx.cli import build_parser

    parsers = [build_parser()]
    undocumented = []
    while parsers:
        parser = parsers.pop()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers.extend(action.choices.values())
            elif not isinstance(action, argparse._HelpAction) and not action.help:
                undocumented.append(f"{parser.prog} {action.dest}")
    assert undocumented == []
