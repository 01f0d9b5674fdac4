#!/usr/bin/env bash
# Run the compatibility suite (the tests marked `compat`: where the library meets transformers: cache arguments,
# generate() and its decode layout, masks, graph capture, fused projections, StaticDecoder and export, on tiny
# random-weight models) against one transformers release, in the current
# Python environment (set up by scripts/setup.sh first): `bash scripts/test_transformers.sh 5.17.0`, or `latest`
# for the newest release on PyPI. Extra arguments go to pytest. SKIP_IF_UNCHANGED=1: nothing to do when the release
# asked for is the one already installed (CI: the newest release is often the locked one it just tested).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${1:?usage: test_transformers.sh VERSION|latest [pytest args]}
shift
before=$($PY -c 'import transformers; print(transformers.__version__)')
if [ "$VERSION" = latest ]; then
    $PY -m pip install -q --upgrade transformers
else
    $PY -m pip install -q "transformers==$VERSION"
fi
now=$($PY -c 'import transformers; print(transformers.__version__)')
if [ -n "${SKIP_IF_UNCHANGED:-}" ] && [ "$now" = "$before" ]; then
    echo "== transformers $now is the version just tested: compatibility suite not run again"
    exit 0
fi
echo "== compatibility suite on transformers $now"
$PY -m pytest -q -m "compat and not slow" -p no:cacheprovider "$@"
