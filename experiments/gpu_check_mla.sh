#!/usr/bin/env bash
# GPU check of the MLA attention kernels and the paged engine path: tests on the GPU backend, then the
# benchmark; pass/fail table last.
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_mla.sh [--quick | --cluster | --combine | --profile] [device_kind]
# --cluster: only the decode kernel's clustered variant (DecodeConfig.cluster): its R1-shape tests, then
# bench_mla's decode cases with and without it, each step under a short timeout (a synchronization mistake
# would hang, not fail)                                                                              ~4 min
# --combine: the split-KV merge kernel (`mla_combine`, default for uniform splits since session 13) and the
# in-kernel uniform schedule: the decode and combine tests, then B=1 / 8 cases merged by the kernel (its CTAs
# owning 32, 16 or 64 columns) and by XLA's five-kernel combine in the same run                       ~3 min
# --profile: ptxas's register and spill report of the decode kernel clustered and not
# (experiments/diag/mla_decode_ptxas.py), an ncu profile of one launch each at B=64 / 4K (tensor pipe,
# stalls, local memory), and ncu's sections for the split combine at B=1 / 32K                       ~3 min
# (--overlap, --deep and --tiled ran the variants removed in sessions 16-17: KERNELS.md items 5, 7, 8, 9.)
# Logs and the results JSON go to $OUT (device tool) or experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=""
case "${1:-}" in
  --quick|--cluster|--combine|--profile) MODE="${1#--}"; shift ;;
esac
KIND="${1:-nvidia-h200}"
source experiments/gpu_env.sh
declare -A STATUS
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,power.limit --format=csv,noheader

# focused NAME TEST_TIMEOUT BENCH_TIMEOUT CASES PYTEST_ARGS...: the tests, then bench_mla's decode CASES, each
# under its timeout (a synchronization mistake hangs rather than fails), a pass/fail table, and exit
focused() {
  local name=$1 test_timeout=$2 bench_timeout=$3 cases=$4
  shift 4
  timeout "$test_timeout" $PY -m pytest -q -p no:cacheprovider --tb=short "$@" 2>&1 \
    | tee "$OUTDIR/test_mla_$name.log" | tail -20
  STATUS[tests]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo "FAIL/TIMEOUT")
  timeout "$bench_timeout" $PY experiments/bench_mla.py --device_kind "$KIND" --part decode --tag "mla-decode-$name" \
    --cases="$cases" 2>&1 | tee "$OUTDIR/bench_mla_$name.log" | grep -v '^\s*$'
  STATUS[bench_mla]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo "FAIL/TIMEOUT")
  for k in "${!STATUS[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
  exit 0
}

case "$MODE" in
  profile)
    MOSAIC_GPU_DUMP_PTXAS=1 timeout 120 $PY experiments/diag/mla_decode_ptxas.py --variants=plain,unclustered 2>&1 \
      | grep -iE "variant|registers|spill|stack frame" | tee "$OUTDIR/ptxas_mla_decode.log"
    timeout 150 ncu --kernel-name regex:mosaic --metrics launch__registers_per_thread,\
l1tex__data_pipe_lsu_wavefronts_mem_lmem.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,\
smsp__warp_issue_stalled_barrier_per_warp_active.pct,smsp__warp_issue_stalled_long_scoreboard_per_warp_active.pct,\
smsp__warp_issue_stalled_mio_throttle_per_warp_active.pct,gpu__time_duration.sum \
      $PY experiments/diag/mla_decode_ptxas.py --variants=plain,unclustered --batch=64 --pages=64 \
      > "$OUTDIR/ncu_mla_decode.log" 2>&1
    grep -E "mosaic|registers|lmem|hmma|stalled|duration" "$OUTDIR/ncu_mla_decode.log" | head -40
    # the split combine at B=1 / 32K (66 splits): the second Mosaic launch of a call; what limits its 8.6 us
    timeout 150 ncu --kernel-name regex:mosaic --launch-skip 1 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section WarpStateStats --section LaunchStats --section Occupancy \
      $PY experiments/diag/mla_decode_ptxas.py --variants=plain --batch=1 --pages=512 > "$OUTDIR/ncu_mla_combine.log" 2>&1
    grep -E "Duration|Throughput|Stall|Warp Cycles|Registers|Achieved|Grid Size|Block Size|L2 Hit" \
      "$OUTDIR/ncu_mla_combine.log" | head -40
    exit 0 ;;
  combine) focused combine 200 200 \
    b1_32k_cl,b1_32k_cl_c16,b1_32k_cl_c64,b1_32k_cl_xla,b1_8k_s66_cl,b1_8k_s66_cl_xla,b1_64k_s66_cl,b1_64k_s66_cl_c16,b1_64k_s66_cl_c64,b1_64k_s66_cl_xla,b1_4k,b8_4k,b64_4k_cl \
    tests/test_mla_combine.py tests/test_mla_decode.py ;;
  cluster) focused cluster 150 200 \
    b64_4k,b64_4k_cl,b128_4k,b128_4k_cl,b1_32k,b1_32k_cl,b256_1k,b256_1k_cl,b64_4k_mtp2,b64_4k_mtp2_cl \
    tests/test_mla_decode.py -k "r1_shapes and cluster" ;;
esac
QUICK=$([[ "$MODE" == quick ]] && echo --quick || true)

timeout 300 $PY -m pytest -q -p no:cacheprovider --tb=short tests/test_mla_decode.py tests/test_mla_prefill.py \
  tests/test_paged_attention.py 2>&1 | tee "$OUTDIR/test_mla.log" | tail -40
STATUS[tests]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

timeout 330 $PY experiments/bench_mla.py --device_kind "$KIND" $QUICK 2>&1 | tee "$OUTDIR/bench_mla.log" \
  | grep -v '^\s*$'
STATUS[bench_mla]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

for k in "${!STATUS[@]}"; do printf '%-12s %s\n' "$k" "${STATUS[$k]}"; done
