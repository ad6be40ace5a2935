#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run lint + the default test suite (slow tests, the Ray backend's among
# them: add `-m slow`; the Ray tests need `pip install -e '.[ray]'`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"
ruff check surgery cli tests examples benchmarks
ruff format --check surgery cli tests examples benchmarks
python -m pytest -q "$@"
