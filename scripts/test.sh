#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run lint + the default test suite, then (without arguments) the Ray
# backend's tests on a local Ray cluster (slow-marked: they start Ray, ~1 min). Other slow tests:
# `pytest -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"
ruff check surgery cli tests examples benchmarks
ruff format --check surgery cli tests examples benchmarks
python -m pytest -q "$@"
if [ $# -eq 0 ]; then
  python -c "import ray"  # installed by setup.sh: the Ray tests must run, not skip
  python -m pytest -q -m slow tests/test_ray.py
fi
