#!/usr/bin/env bash
# One prepared run on a CUDA machine: the torch kernels' twin tests on the GPU, then 1B-shaped merges
# with --device cpu and --device cuda (wall time, peak RSS) and a byte comparison of their outputs.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh     (writes logs and bench JSON under $OUT)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DATA=${DATA:-/tmp/bench-data}
mkdir -p "$OUT" "$DATA"
export NUMBA_CACHE_DIR=/tmp/numba-cache PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
nproc | tee -a "$OUT/gpu.txt"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_torch_twin.py 2>&1 | tail -4 | tee "$OUT/twin-tests.txt"
python3 benchmarks/make_synthetic.py --shape 1b --out "$DATA/1b" --no-fsync 2>&1 | tail -1
for dev in cpu cuda; do
  python3 benchmarks/bench_merge.py --shape 1b --data "$DATA" --parts io,surgery --no-check \
    --surgery-args "--device $dev" --json "$OUT/bench-$dev.json" 2>&1 | tee "$OUT/bench-$dev.txt" | grep -E "^\|"
done
# byte identity of CPU and CUDA outputs
for m in task-arithmetic breadcrumbs; do
  for dev in cpu cuda; do
    rm -rf "$DATA/o_$dev"
    surgery merge "$DATA/1b/ft1" "$DATA/1b/ft2" --base "$DATA/1b/base" --$m --device $dev -o "$DATA/o_$dev" -q >/dev/null
  done
  same=yes
  for f in "$DATA"/o_cpu/*.safetensors; do cmp -s "$f" "$DATA/o_cuda/$(basename "$f")" || same=no; done
  echo "$m: cpu and cuda outputs byte-identical: $same" | tee -a "$OUT/identity.txt"
done
