#!/usr/bin/env bash
# GPU checks for issue 12, on one GPU (H100/H200), in under 8 minutes including setup; downloads nothing.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        # results: OUT_DIR/gpu_check.jsonl (default $OUT or benchmarks/results)
#
# Assumes this repository with a virtual environment whose torch sees the GPU (PY=... to point at another
# interpreter). Each part is `python -m benchmarks.gpu_check --part ...` (CPU-tested in
# tests/benchmarks/test_gpu_check.py) and has its own time limit, so one slow part cannot eat the others':
#   1. mfu     ResNet-50 224x224 FIP and Fast FIP steps, bf16 autocast + channels-last: MFU vs the card's peak
#   2. fisher  per-sample Fisher samples/s (empirical; true, with labels drawn on the GPU)
#   3. loader  synthetic JPEG shards (written here) -> DataLoader workers vs what the FIP step consumes
#   4. ray     1 Ray Train worker on the GPU vs 2 sharing it (0.5 GPU each), same global batch
set -uo pipefail

cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
OUT_DIR="${1:-${OUT:-benchmarks/results}}"
BATCH="${BATCH:-64}"
mkdir -p "$OUT_DIR"
RESULTS="$OUT_DIR/gpu_check.jsonl"
: > "$RESULTS"
WORK="$(mktemp -d /tmp/fip-gpu-check.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

if [ ! -x "$PY" ]; then
  echo "gpu_check: no interpreter at $PY (make setup, or PY=/path/to/python)" >&2
  exit 2
fi
"$PY" - <<'EOF' || exit 2
import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA device")
print(f"gpu_check: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", flush=True)
EOF
nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true

export RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"  # a local, loopback-only cluster
export PYTHONUNBUFFERED=1
status=0
part() {  # part SECONDS NAME ARGS...
  local limit="$1" name="$2"
  shift 2
  local t0=$SECONDS
  echo "== $name (limit ${limit}s)"
  if timeout "$limit" "$PY" -m benchmarks.gpu_check --part "$name" --out "$RESULTS" "$@"; then
    echo "== $name done in $((SECONDS - t0))s"
  else
    echo "== $name FAILED or timed out after $((SECONDS - t0))s" >&2
    echo "{\"part\": \"$name\", \"failed\": true, \"seconds\": $((SECONDS - t0))}" >> "$RESULTS"
    status=1
  fi
}

part 120 mfu --batch "$BATCH" --steps 10
part 60 fisher --batch "$BATCH" --steps 5
part 150 loader --batch "$BATCH" --steps 20 --images 4000 --workers 1 4 8 12 --work-dir "$WORK"
part 150 ray --batch "$BATCH" --steps 10 --workers 1 2

echo "gpu_check: results in $RESULTS"
"$PY" - "$RESULTS" <<'EOF'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    if r.get("failed"):
        print(f"{r['part']:7s} FAILED after {r['seconds']}s")
    elif r["part"] == "mfu":
        for m in ("fip", "fast-fip"):
            row = r[m]
            print(f"mfu     {m:8s} {row['avg_s'] * 1e3:7.1f} ms/step  {row['tflops_per_s']:6.1f} TFLOP/s  "
                  f"MFU {100 * row.get('mfu_published', float('nan')):5.1f}% of {r['published_peak_tflops']} "
                  f"(matmul roof {r['matmul_tflops']:.0f}: {100 * row['mfu_matmul']:.1f}%)  {row['max_memory_gb']:.1f} GB")
    elif r["part"] == "fisher":
        print(f"fisher  empirical {r['empirical_samples_per_s']:.0f}/s, true {r['true_samples_per_s']:.0f}/s")
    elif r["part"] == "loader":
        rates = ", ".join(f"{x['workers']}w {x['samples_per_s']:.0f}/s" for x in r["loader"])
        print(f"loader  {rates}; FIP consumes {r['gpu_consumes_samples_per_s']:.0f}/s; fed "
              f"{r['fed_samples_per_s']:.0f}/s ({r['bound']}-bound)")
    elif r["part"] == "ray":
        for run in r["runs"]:
            print(f"ray     {run['workers']} worker(s): " + (f"{run['samples_per_s']:.0f} samples/s ({run['backend']})"
                                                       if "samples_per_s" in run else json.dumps(run)))
EOF
exit $status
