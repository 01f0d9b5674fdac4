"""Loading an export directory never runs code it brought unless trusted, never reads outside the directory, and
detects tampering; exporting never writes through a symbolic link (issue 19, first part)."""

from __future__ import annotations

import hashlib
import json
import pickle
import zipfile

import pytest
from tiny_models import calibrated, random_prompt

import entropykv_fx
from entropykv_fx import ExportError
from entropykv_fx.exported import ExportedGenerator, read_layout
from entropykv_fx.exporters.onnx import OrtGenerator


class _Payload:
    """Unpickling this creates the marker file: proof that code from the directory ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A real pt2 export of a tiny calibrated Llama (no AOTInductor: fast)."""
    root = tmp_path_factory.mktemp("export")
    model = calibrated(root, "llama", [0.5, 0.5, 0.5])
    entropykv_fx.export(model, root / "out", prompt_length=32, max_new_tokens=3, aoti=False)
    return root / "out"


def _copy(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_pickle_payload_does_not_run_without_trust_code(tmp_path, exported):
    """An attacker controls the whole directory, layout and checksums included: without trust_code the archive
    is never opened."""
    bad = _copy(exported, tmp_path / "bad")
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(bad / "prefill.pt2", "w") as archive:
        archive.writestr("prefill/data.pkl", pickle.dumps(_Payload(str(marker))))
    layout = json.loads((bad / "layout.json").read_text())
    layout["checksums"]["prefill.pt2"] = _sha(bad / "prefill.pt2")
    (bad / "layout.json").write_text(json.dumps(layout))
    assert read_layout(bad).checksums["prefill.pt2"] == _sha(bad / "prefill.pt2")  # a consistent forgery
    with pytest.raises(ExportError, match="can run code when loaded.*trust_code=True"):
        ExportedGenerator(bad, kind="pt2")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../prefill.pt2", "/etc/passwd", "sub/prefill.pt2", ".."])
def test_program_paths_outside_the_directory_are_refused(tmp_path, exported, name):
    bad = _copy(exported, tmp_path / "bad")
    (tmp_path / "prefill.pt2").write_bytes((exported / "prefill.pt2").read_bytes())
    layout = json.loads((bad / "layout.json").read_text())
    layout["programs"]["pt2"][0] = name
    (bad / "layout.json").write_text(json.dumps(layout))
    with pytest.raises(ExportError, match="not a file directly inside"):
        ExportedGenerator(bad, kind="pt2", trust_code=True)


def test_a_program_symlink_leading_out_of_the_directory_is_refused(tmp_path, exported):
    bad = _copy(exported, tmp_path / "bad")
    outside = tmp_path / "elsewhere.pt2"
    outside.write_bytes((bad / "prefill.pt2").read_bytes())
    (bad / "prefill.pt2").unlink()
    (bad / "prefill.pt2").symlink_to(outside)
    with pytest.raises(ExportError, match="not a file directly inside"):
        ExportedGenerator(bad, kind="pt2", trust_code=True)


def test_a_tampered_program_file_is_detected_by_its_checksum(tmp_path, exported):
    bad = _copy(exported, tmp_path / "bad")
    data = bytearray((bad / "decode.pt2").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "decode.pt2").write_bytes(bytes(data))
    with pytest.raises(ExportError, match="decode.pt2 does not match the SHA-256 recorded at export"):
        ExportedGenerator(bad, kind="pt2", trust_code=True)
    assert ExportedGenerator(exported, kind="pt2", trust_code=True).generate(random_prompt(20), 2).shape == (1, 2)


@pytest.mark.parametrize("damage, match", [
    (lambda t: "{not json", "is not valid JSON"),
    (lambda t: json.dumps([1, 2]), "expected a JSON object"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "programs"}), "field 'programs'"),
    (lambda t: json.dumps({**json.loads(t), "dtype": "bogus"}), "dtype 'bogus' is not one of"),
    (lambda t: json.dumps({**json.loads(t), "format": "entropykv-export/0"}), "format 'entropykv-export/0'"),
    (lambda t: json.dumps({**json.loads(t), "capacities": [4]}), "'capacities' must be 3 ints, each its layer's budget"),
    (lambda t: json.dumps({**json.loads(t), "batch": 0}), "'batch' must be an int >= 1"),
    (lambda t: json.dumps({**json.loads(t), "checksums": {}}), "records no SHA-256 for prefill.pt2"),
])
def test_a_damaged_layout_gets_an_error_naming_the_file_and_field(tmp_path, exported, damage, match):
    bad = _copy(exported, tmp_path / "bad")
    (bad / "layout.json").write_text(damage((bad / "layout.json").read_text()))
    with pytest.raises(ExportError, match=match):
        ExportedGenerator(bad, kind="pt2", trust_code=True)


def test_onnx_needs_no_trust_but_is_checked_too(tmp_path):
    pytest.importorskip("onnxruntime")
    from entropykv_fx.exporters.onnx import export_onnx

    model = calibrated(tmp_path, "llama", [0.5, 0.5, 0.5])
    export_onnx(model, tmp_path / "onnx", prompt_length=16, max_new_tokens=2)
    assert OrtGenerator(tmp_path / "onnx").generate(random_prompt(10).cpu().numpy(), 2).shape == (1, 2)
    data = tmp_path / "onnx" / "prefill.onnx.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExportError, match="prefill.onnx.data does not match the SHA-256"):
        OrtGenerator(tmp_path / "onnx")


def test_export_never_writes_through_a_symlink_and_checks_before_tracing(tmp_path, monkeypatch):
    model = calibrated(tmp_path, "llama", [0.5, 0.5, 0.5])
    traced = []
    monkeypatch.setattr(entropykv_fx.aot, "build_programs", lambda *a, **k: traced.append(1))
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / "layout.json").symlink_to(victim)
    with pytest.raises(ExportError, match="layout.json is a symbolic link; refusing to write through it"):
        entropykv_fx.export(model, out, prompt_length=16, max_new_tokens=2, aoti=False)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(ExportError, match="exists and is not a directory"):
        entropykv_fx.export(model, tmp_path / "a_file", prompt_length=16, max_new_tokens=2, aoti=False)
    assert victim.read_text() == "keep me" and traced == []
