#!/usr/bin/env bash
# The bundled example, end to end on a fresh machine: set up .venv, merge the bundled fine-tunes
# (task arithmetic and Model Breadcrumbs), and print the accuracy of base, fine-tunes and merges.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.numba_cache}"
F=examples/family
OUT=${OUT:-examples/out}
mkdir -p "$OUT"
# The base is found from the fine-tunes' model cards (base_model: ../base).
surgery merge $F/ft_add $F/ft_reverse $F/ft_sort --task-arithmetic --overwrite -q -o "$OUT/task_arithmetic"
surgery merge $F/ft_add $F/ft_reverse $F/ft_sort --breadcrumbs --overwrite -q -o "$OUT/breadcrumbs"
surgery merge $F/ft_add $F/ft_reverse $F/ft_sort --breadcrumbs --density 0.5 --overwrite -q -o "$OUT/breadcrumbs_d0.5"
surgery merge $F/ft_add $F/ft_reverse $F/ft_sort --ties --overwrite -q -o "$OUT/ties"
python examples/evaluate.py $F/base $F/ft_add $F/ft_reverse $F/ft_sort \
  "$OUT/task_arithmetic" "$OUT/breadcrumbs" "$OUT/breadcrumbs_d0.5" "$OUT/ties"
