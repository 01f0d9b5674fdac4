#!/usr/bin/env bash
# Create a separate virtual environment for NVIDIA kvpress 0.5.5, the peer library of the quality benchmark.
# kvpress 0.5.5 requires transformers < 5.3 while entropykv_fx needs >= 5.17, so the two never share an
# environment: entropykv_fx/bench/kvpress_runner.py runs inside this venv and imports nothing from entropykv_fx.
#
#   bash benchmarks/kvpress_env.sh [VENV_DIR]          # default /tmp/kvpress-venv
#
# Environment:
#   PYTHON=python3.11          interpreter for the venv
#   KVPRESS_TORCH=system       reuse the system torch (GPU machine: torch 2.11+cu130) through
#                              --system-site-packages instead of installing torch==2.13.0 (the CPU build here)
#   WHEELS=DIR                 install offline from the wheels in DIR (kvpress 0.5.5, transformers 5.2.0 and their
#                              dependencies), fetched on a connected machine with `pip download` for the target's
#                              Python and platform (--python-version, --platform, --only-binary=:all:); with
#                              KVPRESS_TORCH=system, every file in DIR is installed with --no-deps over the system's
#                              packages (the GPU machine has no index to resolve against)
set -euo pipefail
VENV=${1:-/tmp/kvpress-venv}
PY=${PYTHON:-python3}
if [[ ${KVPRESS_TORCH:-} == system ]]; then
    $PY -m venv --system-site-packages "$VENV"
    TORCH=()
else
    $PY -m venv "$VENV"
    TORCH=(torch==2.13.0)
fi
OFFLINE=()
if [[ -n ${WHEELS:-} ]]; then
    OFFLINE=(--no-index --find-links "$WHEELS")
fi
if [[ -n ${WHEELS:-} && ${KVPRESS_TORCH:-} == system ]]; then
    "$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation "${OFFLINE[@]}" "$WHEELS"/*
else
    "$VENV/bin/python" -m pip install --quiet "${OFFLINE[@]}" "${TORCH[@]}" kvpress==0.5.5 "transformers==5.2.0"
fi
"$VENV/bin/python" -c "import kvpress, torch, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "kvpress venv ready: $VENV/bin/python"
