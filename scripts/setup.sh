#!/usr/bin/env bash
# Create .venv with model-surgery and its test/example dependencies (CPU torch).
# Idempotent: a second run only checks that everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# The CPU wheel first: an open torch range with no torch installed would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
# ray: the Ray backend's tests (a local Ray cluster) run in scripts/test.sh (wheel ~80 MB, ~20 s).
python -m pip install -q -e ".[test,ray]"
