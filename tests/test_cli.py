"""The command line: argument errors exit non-zero with a readable message."""

from __future__ import annotations

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
