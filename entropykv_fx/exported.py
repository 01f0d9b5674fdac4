"""Run programs written by `entropykv_fx.export` (needs torch only: no transformers, no model code).

    gen = ExportedGenerator("out/", kind="aoti", trust_code=True)   # or kind="pt2" (needs `import entropykv_fx.ops`)
    tokens = gen.generate(input_ids, max_new_tokens=32)             # greedy

Loading is safe by default. `read_layout` is the one reader of `layout.json` for every runner and the CLI: it
checks the format, the fields every runner needs, that every program file it names lies inside the directory
(no `..`, no absolute path, no symbolic link leading out) and that each file's SHA-256 matches the one recorded
at export. Formats that can carry code run only with `trust_code=True`: a `torch.export` archive (`.pt2`) may
hold pickled objects, and AOTInductor packages and TensorRT engines are compiled code that loading executes.
ONNX files hold no code and load without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor

from .errors import ExportError

LAYOUT_FORMAT = "entropykv-export/1"
CODE_FORMATS = ("pt2", "aoti", "tensorrt")  # program kinds whose loading can run code from the file
_REQUIRED = {"format": str, "num_layers": int, "batch": int, "prompt_length": int, "max_new_tokens": int,
             "budgets": list, "capacities": list, "kv_heads": int, "head_dim": int, "dtype": str, "device": str,
             "vocab_size": int, "programs": dict}
_DTYPES = ("float32", "float16", "bfloat16")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_layout(directory: str | Path) -> dict:
    """The validated `layout.json` of an export directory (see the module docstring); ExportError names the file,
    the field and what is accepted, FileNotFoundError a missing file."""
    path = Path(directory) / "layout.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a directory written by an entropykv_fx exporter")
    try:
        layout = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ExportError(f"{path} is not valid JSON ({err}); re-export the model") from None
    if not isinstance(layout, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(layout).__name__}")
    for key, kind in _REQUIRED.items():
        if not isinstance(layout.get(key), kind) or isinstance(layout.get(key), bool):
            raise ExportError(f"{path}: field {key!r} must be a {kind.__name__}, got {layout.get(key)!r}")
    if layout["format"] != LAYOUT_FORMAT:
        raise ExportError(f"{path}: format {layout['format']!r} is not {LAYOUT_FORMAT!r} (written by another "
                          "version of entropykv_fx); re-export the model")
    n = layout["num_layers"]
    for key in ("budgets", "capacities"):
        if len(layout[key]) != n or not all(isinstance(v, int) and v > 0 for v in layout[key]):
            raise ExportError(f"{path}: {key!r} must hold {n} positive integers (one per layer), got {layout[key]!r}")
    for key in ("num_layers", "batch", "prompt_length", "max_new_tokens", "kv_heads", "head_dim", "vocab_size"):
        if layout[key] < 1:
            raise ExportError(f"{path}: {key!r} must be >= 1, got {layout[key]}")
    if layout["dtype"] not in _DTYPES:
        raise ExportError(f"{path}: dtype {layout['dtype']!r} is not one of {_DTYPES}")
    for kind, files in layout["programs"].items():
        if not isinstance(files, list) or files and (len(files) != 2 or not all(isinstance(f, str) for f in files)):
            raise ExportError(f"{path}: programs[{kind!r}] must list the prefill and decode file names, got {files!r}")
    return layout


def program_files(directory: str | Path, layout: dict, kind: str, runner: str, trust_code: bool = False) -> list[Path]:
    """The verified paths of the `kind` programs of an export directory, before anything loads them."""
    directory = Path(directory)
    files = layout["programs"].get(kind)
    if not files:
        raise ExportError(f"{runner}: no {kind} programs in {directory}; available: "
                          f"{[k for k, v in layout['programs'].items() if v]}")
    if kind in CODE_FORMATS and not trust_code:
        raise ExportError(f"{runner}: {kind} programs can run code when loaded (pickled objects or compiled "
                          f"libraries); load {directory} with trust_code=True (CLI: --trust-code) only if you made it "
                          "or trust who did, or run its ONNX programs, which need no trust")
    root = directory.resolve()
    checksums = layout.get("checksums", {})
    paths = []
    for name in files:
        path = directory / name
        if Path(name).name != name or name in (".", "..") or path.resolve().parent != root:
            raise ExportError(f"{runner}: layout.json names the program file {name!r}, which is not a file directly "
                              f"inside {directory}; refusing to load it")
        if not path.is_file():
            raise FileNotFoundError(f"{runner}: program file {path} (listed in layout.json) not found")
        if name not in checksums:
            raise ExportError(f"{runner}: layout.json records no SHA-256 for {name}; re-export the model")
        for checked in [name, *(f for f in checksums if f.startswith(name + "."))]:  # with its external data
            if not (directory / checked).is_file() or sha256(directory / checked) != checksums[checked]:
                raise ExportError(f"{runner}: {directory / checked} does not match the SHA-256 recorded at export: "
                                  "the file was changed, replaced or removed; refusing to load it")
        paths.append(path)
    return paths


def writable_path(directory: Path, name: str) -> Path:
    """`directory / name` for an export to write, refusing a symbolic link there (writing would go through it)."""
    path = directory / name
    if path.is_symlink():
        raise ExportError(f"export: {path} is a symbolic link; refusing to write through it (remove it or export "
                          "to another directory)")
    return path


def prepare_export_dir(out_dir: str | Path, names: list[str]) -> Path:
    """Check, before any tracing, that an export can write `names` and layout.json into `out_dir` (created if
    missing): not a file, writable, no symbolic link among the targets. Returns the directory."""
    import os

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ExportError(f"export: {out} exists and is not a directory; give a directory to write the programs into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ExportError(f"export: cannot create {out} ({err.strerror})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise ExportError(f"export: {out} is not writable")
    for name in (*names, "layout.json"):
        writable_path(out, name)
    return out


def write_layout(directory: Path, layout: dict, companions: list[str] = ()) -> Path:
    """Write `layout.json` with the SHA-256 of every program file it lists and of `companions` (files the programs
    read, e.g. ONNX external weights `prefill.onnx.data`), without following symbolic links."""
    listed = {f for names in layout["programs"].values() for f in names}
    files = sorted(listed | {f for f in companions if (directory / f).is_file()})
    layout = {**layout, "checksums": {f: sha256(writable_path(directory, f)) for f in files}}
    path = writable_path(directory, "layout.json")
    tmp = writable_path(directory, ".layout.json.tmp")
    tmp.write_text(json.dumps(layout, indent=1))
    tmp.replace(path)  # replaces a file, never writes through a link
    return path


def check_new_tokens(runner: str, max_new_tokens: int, layout: dict) -> None:
    if not 1 <= max_new_tokens <= layout["max_new_tokens"]:
        raise ValueError(f"{runner}: max_new_tokens must be in 1..{layout['max_new_tokens']} "
                         f"(the exported cache capacity), got {max_new_tokens}")


def left_pad_count(runner: str, shape: tuple[int, ...], layout: dict) -> int:
    """How many pad tokens an unpadded prompt batch of `shape` needs to fill the exported prompt length."""
    length, batch = layout["prompt_length"], layout["batch"]
    if len(shape) != 2 or shape[0] != batch or shape[1] > length:
        raise ValueError(f"{runner}: input_ids must be [{batch}, <= {length}] (the exported batch and "
                         f"prompt length), got {tuple(shape)}")
    return length - shape[1]


def left_padded(runner: str, input_ids, layout: dict, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """An unpadded prompt batch (tensor or array) left-padded to the exported prompt length, and its positions
    (-1 on padding), both int64 on the CPU."""
    ids = torch.as_tensor(input_ids, dtype=torch.long).cpu()
    pad = left_pad_count(runner, tuple(ids.shape), layout)
    ids = torch.nn.functional.pad(ids, (pad, 0), value=pad_token_id)
    positions = (torch.arange(ids.shape[1]) - pad).clamp(min=-1)
    return ids, positions.expand(ids.shape[0], -1).contiguous()


class ExportedGenerator:
    """Greedy generation with an exported prefill/decode pair and its compressed cache layout."""

    def __init__(self, directory: str | Path, kind: str = "aoti", pad_token_id: int = 0, *,
                 trust_code: bool = False) -> None:
        """trust_code: both kinds can run code from the directory when loaded (see the module docstring); without
        it they are refused (ExportError) before anything is read."""
        if kind not in ("aoti", "pt2"):
            raise ValueError(f"ExportedGenerator: kind must be 'aoti' or 'pt2', got {kind!r}")
        self.dir = Path(directory)
        self.layout = read_layout(self.dir)
        files = program_files(self.dir, self.layout, kind, "ExportedGenerator", trust_code)
        if kind == "aoti":
            self.prefill, self.decode = (torch._inductor.aoti_load_package(str(f)) for f in files)
        else:
            from . import ops  # noqa: F401  (the programs call the entropykv ops)

            self.prefill, self.decode = (torch.export.load(f).module() for f in files)
        self.pad_token_id = pad_token_id

    def generate(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """Greedy continuation of an unpadded prompt batch [B, n]; returns the new tokens [B, max_new_tokens]."""
        check_new_tokens("ExportedGenerator", max_new_tokens, self.layout)
        device = torch.device(self.layout["device"])
        ids, positions = (t.to(device) for t in left_padded("ExportedGenerator", input_ids, self.layout,
                                                             self.pad_token_id))
        with torch.no_grad():
            logits, *cache = self.prefill(ids, positions)
            token = logits.argmax(-1, keepdim=True)
            new, position = [token], positions[:, -1:] + 1
            for step in range(max_new_tokens - 1):
                logits, *cache = self.decode(token, position, torch.tensor(step, device=device), *cache)
                token = logits.argmax(-1, keepdim=True)
                new.append(token)
                position = position + 1
        return torch.cat(new, 1)
