#!/usr/bin/env bash
# GPU check of the MLA attention kernels and the paged engine path: tests on the GPU backend, then the
# benchmark; pass/fail table last.
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_mla.sh [--quick] [device_kind]
# Logs and the results JSON go to $OUT (device tool) or experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; shift; fi
KIND="${1:-nvidia-h200}"
source experiments/gpu_env.sh
declare -A STATUS
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv,noheader

timeout 300 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_mla_decode.py tests/test_mla_prefill.py \
  tests/test_paged_attention.py 2>&1 | tee "$OUTDIR/test_mla.log" | tail -40
STATUS[tests]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

timeout 330 $PY experiments/bench_mla.py --device_kind "$KIND" $QUICK 2>&1 | tee "$OUTDIR/bench_mla.log" \
  | grep -v '^\s*$'
STATUS[bench_mla]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

for k in "${!STATUS[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
