#!/usr/bin/env bash
# Create a separate environment for NVIDIA kvpress 0.5.5, the peer library of the quality benchmark.
# kvpress 0.5.5 requires transformers < 5.3 while entropykv_fx needs >= 5.17, so the two never share an
# environment: entropykv_fx/bench/kvpress_runner.py runs inside this one and imports nothing from entropykv_fx.
#
#   bash benchmarks/kvpress_env.sh [DIR]          # default /tmp/kvpress-venv; run DIR/bin/python
#
# Environment:
#   PYTHON=python3.11          interpreter (default python3)
#   KVPRESS_TORCH=system       reuse the interpreter's own torch (GPU machine: torch 2.11+cu130) instead of
#                              installing torch==2.13.0 (the CPU build here): the packages go to DIR/site, which
#                              DIR/bin/python puts first on the path, so kvpress's transformers 5.2.0 shadows the
#                              interpreter's while its torch is used (a venv's --system-site-packages would not see
#                              packages of an interpreter that is itself in a venv, as on the GPU machine)
#   WHEELS=DIR                 install offline from the wheels in DIR (kvpress 0.5.5, transformers 5.2.0 and the
#                              dependencies the interpreter lacks), fetched on a connected machine with `pip download`
#                              for the target's Python and platform (--python-version, --platform,
#                              --only-binary=:all:); with KVPRESS_TORCH=system every file in DIR is installed with
#                              --no-deps (the GPU machine has no index to resolve against)
set -euo pipefail
VENV=${1:-/tmp/kvpress-venv}
PY=${PYTHON:-python3}
OFFLINE=()
if [[ -n ${WHEELS:-} ]]; then
    OFFLINE=(--no-index --find-links "$WHEELS")
fi
if [[ ${KVPRESS_TORCH:-} == system ]]; then
    mkdir -p "$VENV/bin" "$VENV/site"
    if [[ -n ${WHEELS:-} ]]; then
        $PY -m pip install --quiet --no-deps --no-build-isolation --target "$VENV/site" "${OFFLINE[@]}" "$WHEELS"/*
    else
        $PY -m pip install --quiet --target "$VENV/site" kvpress==0.5.5 "transformers==5.2.0"
    fi
    printf '#!/usr/bin/env bash\nPYTHONPATH=%q${PYTHONPATH:+:$PYTHONPATH} exec %q "$@"\n' "$VENV/site" "$(command -v "$PY")" \
        >"$VENV/bin/python"
    chmod +x "$VENV/bin/python"
else
    $PY -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "${OFFLINE[@]}" torch==2.13.0 kvpress==0.5.5 "transformers==5.2.0"
fi
"$VENV/bin/python" -c "import kvpress, torch, transformers; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5', '| torch', torch.__version__, '| transformers', transformers.__version__)"
echo "kvpress environment ready: $VENV/bin/python"
