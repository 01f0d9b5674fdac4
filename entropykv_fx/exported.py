"""Run programs written by `entropykv_fx.export` (needs torch only: no transformers, no model code).

    gen = ExportedGenerator("out/", kind="aoti", trust_code=True)   # or kind="pt2" (needs `import entropykv_fx.ops`)
    tokens = gen.generate(input_ids, max_new_tokens=32)             # greedy

Loading is safe by default. `ExportLayout.from_json` (`read_layout`) is the one reader of `layout.json` for every
runner and the CLI: it checks the format, the fields, kinds, names and capacities every runner relies on;
`program_files` then checks that every program file lies inside the directory (no `..`, no absolute path, no
symbolic link leading out) and that each file's SHA-256 matches the one recorded at export. Formats that can carry code run only with `trust_code=True`: a `torch.export` archive (`.pt2`) may
hold pickled objects, and AOTInductor packages and TensorRT engines are compiled code that loading executes.
ONNX files hold no code and load without it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from .errors import ExportError, InputError, short_repr

LAYOUT_FORMAT = "entropykv-export/1"
PROGRAM_KINDS = ("pt2", "aoti", "onnx", "tensorrt")
CODE_FORMATS = ("pt2", "aoti", "tensorrt")  # program kinds whose loading can run code from the file
_DTYPES = ("float32", "float16", "bfloat16")
_COUNTS = ("num_layers", "batch", "prompt_length", "max_new_tokens", "kv_heads", "head_dim", "vocab_size")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _plain_name(name: object) -> bool:
    return isinstance(name, str) and name not in ("", ".", "..") and Path(name).name == name and "\\" not in name


@dataclass(frozen=True)
class ExportLayout:
    """The cache layout and program files of an export directory: `layout.json`, typed and validated.

    Programs (L = prompt_length, C_i = capacities[i] = budgets[i] + max_new_tokens) are described in `aot`.
    programs maps a kind (PROGRAM_KINDS) to its (prefill, decode) file names, checksums a file name to its
    SHA-256; onnx / tensorrt hold the ONNX I/O names and the TensorRT build settings of those kinds; tokenizer
    names the model (hub id) whose tokenizer the programs expect, when known (older files lack it)."""

    num_layers: int
    batch: int
    prompt_length: int
    max_new_tokens: int
    budgets: tuple[int, ...]
    capacities: tuple[int, ...]
    kv_heads: int
    head_dim: int
    dtype: str
    device: str
    vocab_size: int
    programs: dict[str, tuple[str, ...]] = field(default_factory=dict)
    checksums: dict[str, str] = field(default_factory=dict)
    model: str | None = None
    tokenizer: str | None = None
    policy: str | None = None
    window: int | None = None
    sink_tokens: int | None = None
    calibration_file: str | None = None
    onnx: dict | None = None
    tensorrt: dict | None = None
    format: str = LAYOUT_FORMAT

    @classmethod
    def from_json(cls, path: str | Path) -> ExportLayout:
        """Read and validate a `layout.json`; ExportError names the file, the field and what is accepted,
        FileNotFoundError a missing file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: not a directory written by an entropykv_fx exporter")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ExportError(f"{path} is not valid JSON ({err}); re-export the model") from None
        if not isinstance(data, dict):
            raise ExportError(f"{path}: expected a JSON object, got {type(data).__name__}")
        return cls.from_dict(data, path)

    @classmethod
    def from_dict(cls, data: dict, path: str | Path = "layout.json") -> ExportLayout:
        """Validate the fields of a parsed layout (see `from_json`); unknown keys are ignored."""
        def bad(key: str, accepted: str) -> ExportError:
            return ExportError(f"{path}: field {key!r} must be {accepted}, got {short_repr(data.get(key))}")

        def is_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if data.get("format") != LAYOUT_FORMAT:
            raise ExportError(f"{path}: format {short_repr(data.get('format'))} is not {LAYOUT_FORMAT!r} (written by "
                              "another version of entropykv_fx); re-export the model")
        for key in _COUNTS:
            if not is_int(data.get(key)) or data[key] < 1:
                raise bad(key, "an int >= 1")
        n, new = data["num_layers"], data["max_new_tokens"]
        budgets, capacities = data.get("budgets"), data.get("capacities")
        if not isinstance(budgets, list) or len(budgets) != n or not all(
                is_int(b) and 1 <= b <= data["prompt_length"] for b in budgets):
            raise bad("budgets", f"{n} ints in 1..prompt_length={data['prompt_length']} (one per layer)")
        if not isinstance(capacities, list) or len(capacities) != n or not all(is_int(c) for c in capacities) \
                or [c - b for c, b in zip(capacities, budgets)] != [new] * n:
            raise bad("capacities", f"{n} ints, each its layer's budget + max_new_tokens={new} (one per layer)")
        if data.get("dtype") not in _DTYPES:
            raise ExportError(f"{path}: dtype {short_repr(data.get('dtype'))} is not one of {_DTYPES}")
        if not isinstance(data.get("device"), str):
            raise bad("device", "a torch device type such as 'cpu' or 'cuda'")
        programs = data.get("programs")
        if not isinstance(programs, dict):
            raise bad("programs", f"an object mapping a kind in {PROGRAM_KINDS} to its (prefill, decode) file names")
        for kind, files in programs.items():
            if kind not in PROGRAM_KINDS:
                raise ExportError(f"{path}: programs names the kind {short_repr(kind)}; known kinds: {PROGRAM_KINDS}")
            if not isinstance(files, list) or files and (len(files) != 2 or not all(isinstance(f, str) for f in files)):
                raise ExportError(f"{path}: programs[{kind!r}] must list the prefill and decode file names, got "
                                  f"{short_repr(files)}")
            for name in files:
                if not _plain_name(name):
                    raise ExportError(f"{path}: layout.json names the program file {name!r}, which is not a file "
                                      f"directly inside {path.parent if isinstance(path, Path) else '.'}; refusing "
                                      "to load it")
        checksums = data.get("checksums", {})
        if not isinstance(checksums, dict) or not all(_plain_name(k) and isinstance(v, str)
                                                      for k, v in checksums.items()):
            raise bad("checksums", "an object mapping plain file names to SHA-256 hex digests")
        if programs.get("onnx") or programs.get("tensorrt"):
            onnx = data.get("onnx")
            if not (isinstance(onnx, dict) and all(
                    isinstance(onnx.get(g), dict) and all(isinstance(onnx[g].get(io), list) for io in ("inputs", "outputs"))
                    for g in ("prefill", "decode"))):
                raise bad("onnx", "the ONNX I/O names {'prefill'|'decode': {'inputs': [...], 'outputs': [...]}}")
        for key in ("model", "tokenizer", "policy", "calibration_file"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise bad(key, "a string or absent")
        for key in ("window", "sink_tokens"):
            if data.get(key) is not None and (not is_int(data[key]) or data[key] < 0):
                raise bad(key, "an int >= 0 or absent")
        if data.get("tensorrt") is not None and not isinstance(data["tensorrt"], dict):
            raise bad("tensorrt", "an object or absent")
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values.update(budgets=tuple(budgets), capacities=tuple(capacities),
                      programs={k: tuple(v) for k, v in programs.items()}, checksums=dict(checksums))
        return cls(**values)

    def to_json(self) -> str:
        """The JSON text of `layout.json` (the keys `from_json` reads; absent optional fields left out)."""
        data = {k: v for k, v in asdict(self).items() if v is not None}
        return json.dumps(data, indent=1)


def read_layout(directory: str | Path) -> ExportLayout:
    """The validated `layout.json` of an export directory (`ExportLayout.from_json`)."""
    return ExportLayout.from_json(Path(directory) / "layout.json")


def program_files(directory: str | Path, layout: ExportLayout, kind: str, runner: str,
                  trust_code: bool = False) -> list[Path]:
    """The verified paths of the `kind` programs of an export directory, before anything loads them."""
    directory = Path(directory)
    files = layout.programs.get(kind)
    if not files:
        raise ExportError(f"{runner}: no {kind} programs in {directory}; available: "
                          f"{[k for k, v in layout.programs.items() if v]}")
    if kind in CODE_FORMATS and not trust_code:
        raise ExportError(f"{runner}: {kind} programs can run code when loaded (pickled objects or compiled "
                          f"libraries); load {directory} with trust_code=True (CLI: --trust-code) only if you made it "
                          "or trust who did, or run its ONNX programs, which need no trust")
    root = directory.resolve()
    checksums = layout.checksums
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
    """`directory / name` for an export to write, refusing a symbolic link there (writing would go through it) and
    a directory (writing would fail only after tracing)."""
    path = directory / name
    if path.is_symlink():
        raise ExportError(f"export: {path} is a symbolic link; refusing to write through it (remove it or export "
                          "to another directory)")
    if path.is_dir():
        raise ExportError(f"export: {path} is a directory; expected a file name free to write (remove it or export "
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


def write_layout(directory: Path, layout: ExportLayout, companions: list[str] = ()) -> Path:
    """Write `layout.json` with the SHA-256 of every program file it lists and of `companions` (files the programs
    read, e.g. ONNX external weights `prefill.onnx.data`), without following symbolic links."""
    listed = {f for names in layout.programs.values() for f in names}
    files = sorted(listed | {f for f in companions if (directory / f).is_file()})
    layout = replace(layout, checksums={f: sha256(writable_path(directory, f)) for f in files})
    path = writable_path(directory, "layout.json")
    tmp = writable_path(directory, ".layout.json.tmp")
    tmp.write_text(layout.to_json())
    tmp.replace(path)  # replaces a file, never writes through a link
    return path


def check_new_tokens(runner: str, max_new_tokens: int, layout: ExportLayout) -> None:
    """InputError unless 1 <= max_new_tokens <= the exported maximum."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) \
            or not 1 <= max_new_tokens <= layout.max_new_tokens:
        raise InputError(f"{runner}: max_new_tokens must be in 1..{layout.max_new_tokens} (an int; the exported "
                         f"cache capacity), got {short_repr(max_new_tokens)}")


def left_pad_count(runner: str, shape: tuple[int, ...], layout: ExportLayout) -> int:
    """How many pad tokens an unpadded prompt batch of `shape` needs to fill the exported prompt length."""
    length, batch = layout.prompt_length, layout.batch
    if len(shape) != 2 or shape[0] != batch or not 1 <= shape[1] <= length:
        raise InputError(f"{runner}: input_ids must be [{batch}, <= {length}] (the exported batch and "
                         f"prompt length; at least one token), got {tuple(shape)}")
    return length - shape[1]


def left_padded(runner: str, input_ids, layout: ExportLayout, pad_token_id: int) -> tuple[Tensor, Tensor]:
    """An unpadded prompt batch (tensor or array) left-padded to the exported prompt length, and its positions
    (-1 on padding), both int64 on the CPU. InputError for a wrong shape or ids outside the vocabulary."""
    ids = torch.as_tensor(input_ids)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InputError(f"{runner}: input_ids must hold integer token ids, got dtype {ids.dtype}")
    ids = ids.to(torch.long).cpu()
    pad = left_pad_count(runner, tuple(ids.shape), layout)
    if not 0 <= int(ids.min()) <= int(ids.max()) < layout.vocab_size:
        raise InputError(f"{runner}: input_ids must be token ids in 0..{layout.vocab_size - 1} (the exported "
                         f"vocabulary), got values in {int(ids.min())}..{int(ids.max())}")
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
            raise InputError(f"ExportedGenerator: kind={short_repr(kind)} is invalid: expected 'aoti' or 'pt2'")
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
        """Greedy continuation of an unpadded prompt batch [B, n]; returns the new tokens [B, max_new_tokens].
        InputError, before the prefill runs, for a batch, length, dtype or token id the export cannot take, or
        max_new_tokens outside 1..the exported maximum."""
        check_new_tokens("ExportedGenerator", max_new_tokens, self.layout)
        device = torch.device(self.layout.device)
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
