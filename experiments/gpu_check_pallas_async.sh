#!/usr/bin/env bash
# GPU check of the asynchronous Pallas fetch (issue 20), one GPU, about 5 minutes: the GPU tests (the kernel
# launched on our own stream, the backend against the copy engine), the benchmark's three parts (overlap with a
# timeline and k = 4/8/16 fetch CTAs; XLA's stream-annotation route; planner subsets vs cudaMemcpyAsync), and DWDP
# with --fetch=pallas_async across two processes sharing the GPU. Each part has its own time-out and process (a
# failing launch outside XLA aborts its process only); a pass/fail table and the headline numbers come last.
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_pallas_async.sh [--rest | --xla_stream] [device_kind]
# --rest: only the parts not yet measured on 2026-12-06 (subsets, XLA's stream route, two processes), ~4.5 min
# --xla_stream: XLA's stream route alone, with and without command buffers and under the latency-hiding
#   scheduler, with XLA's async-thunk logs, ~2 min
# Logs, results JSONs and profiler traces go to $OUT (device tool) or experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
REST=""
if [[ "${1:-}" == "--rest" ]]; then REST=1; shift; fi
XLA_STREAM=""
if [[ "${1:-}" == "--xla_stream" ]]; then XLA_STREAM=1; shift; fi
KIND="${1:-nvidia-h100-x1}"
source experiments/gpu_env.sh
declare -A STATUS
ORDER=()
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv,noheader
$PY -c "import jax; print('jax', jax.__version__, jax.devices()[0].device_kind, jax.devices()[0].core_count, 'SMs')"

if [[ -n "$XLA_STREAM" ]]; then
  # XLA's stream-annotation route with and without command buffers, the schedule order and XLA's async-thunk
  # logs (which stream each async call ran on; Finding 32)
  TF_CPP_VMODULE=async_thunk=1,gpu_executable=2,command_buffer_conversion_pass=2 TF_CPP_MIN_LOG_LEVEL=0 \
    step pallas_async xla_stream 150 $PY experiments/bench_pallas_async.py --parts=xla_stream --device_kind="$KIND" \
    --out="$OUTDIR"
  for k in "${ORDER[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
  grep -h -i "additional compute streams\|stream borrower\|Execute async" "$OUTDIR"/pallas_async-xla_stream.log \
    | grep -v "Using 0 additional" | head -20
  exit 0
fi

if [[ -z "$REST" ]]; then
  step pallas_async tests 120 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_pallas_async.py \
    tests/test_remote_dma.py tests/test_stream_timeline.py
  step pallas_async overlap 180 $PY experiments/bench_pallas_async.py --parts=overlap --device_kind="$KIND" \
    --out="$OUTDIR"
fi
step pallas_async subset 70 $PY experiments/bench_pallas_async.py --parts=subset --device_kind="$KIND" --out="$OUTDIR"
step pallas_async xla_stream 90 $PY experiments/bench_pallas_async.py --parts=xla_stream --device_kind="$KIND" --out="$OUTDIR"
step pallas_async dwdp_2proc 100 $PY experiments/gpu_check_multiprocess.py --device_kind="$KIND" --variants=pallas_async \
  --out="$OUTDIR"

echo "== summary"
for k in "${ORDER[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
$PY - "$OUTDIR" <<'PYEOF' || true
import glob, json, sys
for path in sorted(glob.glob(f"{sys.argv[1]}/dwdp-*pallas-async-*.json")):
    m = json.load(open(path))["metrics"]
    print(path.split("/")[-1], {k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()})
PYEOF
