"""The command line: argument errors exit non-zero with a readable message."""

from __future__ import annotations

import json

import pytest

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


def test_run_reports_a_format_mismatch(tmp_path, capsys):
    (tmp_path / "layout.json").write_text(json.dumps({"programs": {"pt2": ["p.pt2", "d.pt2"], "aoti": []}}))
    assert main(["run", str(tmp_path), "--prompt", "hi", "--format", "onnx"]) == 2
    assert "holds no onnx programs (format mismatch); it holds: ['pt2']" in capsys.readouterr().err
