#!/usr/bin/env bash
# One prepared run on a CUDA machine (about 6 minutes on the H200 image; each step has a timeout and
# the optional ones are skipped late, but give the run 10 minutes): installs this repo
# only (no dependencies: the image's python3 has torch with CUDA, numba, safetensors, click, ...), then
#  1. the backend-equality tests with the GPU as a device: the torch twins kernel by kernel, the
#     device-resident pipeline (histograms, workspace, whole merges) against numba's bytes;
#  2. a generated 1B-shaped family (base + 2 fine-tunes, bf16), and the merge benchmark with
#     --device cpu (numba) and --device cuda (the device-resident torch path): wall time, peak RSS,
#     for task arithmetic, breadcrumbs and TIES, plus the I/O ceiling;
#  3. byte identity of the cpu and cuda outputs for breadcrumbs and TIES at 1B;
#  4. if time is left: device_traffic.py on the GPU (per-call vs resident path, 6.3M elements), and
#     breadcrumbs on cuda with 4 worker threads instead of one per core;
#  5. gpu-check.json: all of the above in one file.
# Usage: OUT=/some/dir bash benchmarks/gpu_check.sh     (SHAPE=0.5b for a smaller family)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
DATA=${DATA:-/tmp/bench-data}
SHAPE=${SHAPE:-1b}
BUDGET=${BUDGET:-2GiB}
mkdir -p "$OUT" "$DATA"
export NUMBA_CACHE_DIR=/tmp/numba-cache PYTHONUNBUFFERED=1
T0=$SECONDS
step() { echo "== [$((SECONDS - T0)) s] $*"; }

step install
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
rm -f "$OUT/install.log"  # $OUT brings back at most 8 files
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
} | tee "$OUT/gpu.txt"

step "equality tests on the GPU"
timeout 180 python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_torch_twin.py tests/kernels/test_resident.py \
  >"$OUT/tests.txt" 2>&1
echo "tests rc=$?" >>"$OUT/tests.txt"
tail -3 "$OUT/tests.txt"

step "generate $SHAPE"
timeout 200 python3 benchmarks/make_synthetic.py --shape "$SHAPE" --out "$DATA/$SHAPE" --no-fsync 2>&1 | tail -1

parts=io,surgery
for dev in cpu cuda; do
  step "bench --device $dev"
  timeout 240 python3 benchmarks/bench_merge.py --shape "$SHAPE" --data "$DATA" --parts $parts --no-check \
    --methods task_arithmetic,breadcrumbs,ties --max-memory "$BUDGET" --timeout 100 \
    --surgery-args "--device $dev" --json "$OUT/bench-$dev.json" 2>&1 | grep -E "^\||running|failed"
  parts=surgery  # the I/O ceiling once
done

: >"$OUT/identity.txt"
for m in breadcrumbs ties; do
  if (( SECONDS - T0 > 400 )); then echo "$m: skipped (time)" | tee -a "$OUT/identity.txt"; continue; fi
  step "identity $m"
  for dev in cpu cuda; do
    rm -rf "$DATA/o_$dev"
    timeout 90 surgery merge "$DATA/$SHAPE/ft1" "$DATA/$SHAPE/ft2" --base "$DATA/$SHAPE/base" --$m \
      --density 0.1 --max-memory "$BUDGET" --device $dev -o "$DATA/o_$dev" -q >/dev/null 2>>"$OUT/identity.txt"
  done
  same=yes
  for f in "$DATA"/o_cpu/*.safetensors; do cmp -s "$f" "$DATA/o_cuda/$(basename "$f")" || same=no; done
  echo "$m: cpu and cuda outputs byte-identical: $same" | tee -a "$OUT/identity.txt"
done

# per-call vs resident on the GPU at a small scale: bytes moved, wall time, same bytes as numba
if (( SECONDS - T0 < 400 )); then
  step "device_traffic --device cuda"
  timeout 120 python3 benchmarks/device_traffic.py --device cuda --json "$OUT/traffic-cuda.json" 2>&1 | tail -8
fi

# fewer worker threads on the GPU (16 threads share one device): one breadcrumbs run, if time is left
if (( SECONDS - T0 < 420 )); then
  step "bench --device cuda --threads 4 (breadcrumbs)"
  timeout 100 python3 benchmarks/bench_merge.py --shape "$SHAPE" --data "$DATA" --parts surgery --no-check \
    --methods breadcrumbs --max-memory "$BUDGET" --timeout 100 \
    --surgery-args "--device cuda --threads 4" --json "$OUT/bench-cuda-t4.json" 2>&1 | grep -E "^\||failed"
fi

step summary
python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
res = {"gpu": open(os.path.join(out, "gpu.txt")).read().splitlines(),
       "tests": open(os.path.join(out, "tests.txt")).read().splitlines()[-3:],
       "identity": open(os.path.join(out, "identity.txt")).read().splitlines(), "runs": []}
for dev, name in (("cpu", "cpu"), ("cuda", "cuda"), ("cuda --threads 4", "cuda-t4")):
    path = os.path.join(out, f"bench-{name}.json")
    if not os.path.exists(path):
        continue
    bench = json.load(open(path))
    res.setdefault("io_ceiling_s", (bench.get("io_ceiling") or {}).get("ceiling_s"))
    res.setdefault("shape", bench.get("shape"))
    res.setdefault("max_memory", bench.get("max_memory"))
    for row in bench["rows"]:
        res["runs"].append({"device": dev, "method": row.get("method"), "wall_s": row.get("wall_s"),
                            "total_s": row.get("total_s"), "peak_rss_gib": row.get("peak_rss_gib"),
                            "status": row.get("status", "ok")})
json.dump(res, open(os.path.join(out, "gpu-check.json"), "w"), indent=2)
print(json.dumps(res, indent=2))
PY
step done
