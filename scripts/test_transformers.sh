#!/usr/bin/env bash
# Run the fast test suite (everything but the real-model tests) against one transformers release, in the current
# Python environment (set up by scripts/setup.sh first): `bash scripts/test_transformers.sh 5.17.0`, or `latest`
# for the newest release on PyPI. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VERSION=${1:?usage: test_transformers.sh VERSION|latest [pytest args]}
shift
if [ "$VERSION" = latest ]; then
    $PY -m pip install -q --upgrade transformers
else
    $PY -m pip install -q "transformers==$VERSION"
fi
echo "== fast suite on transformers $($PY -c 'import transformers; print(transformers.__version__)')"
$PY -m pytest -q -m "not slow" -p no:cacheprovider "$@"
