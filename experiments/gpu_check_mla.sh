#!/usr/bin/env bash
# GPU check of the MLA attention kernels and the paged engine path: tests on the GPU backend, then the
# benchmark; pass/fail table last.
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_mla.sh [--quick | --cluster | --combine | --overlap | --deep] [device_kind]
# --cluster: only the decode kernel's clustered variant (DecodeConfig.cluster): its R1-shape tests, then
# bench_mla's decode cases with and without it, each step under a short timeout (a synchronization mistake
# would hang, not fail)                                                                              ~4 min
# --combine: the split-KV merge kernel (`mla_combine`, default for uniform splits since session 13) and the
# in-kernel uniform schedule: the decode and combine tests, then B=1 / 8 cases merged by the kernel and by
# XLA's five-kernel combine in the same run                                                           ~3 min
# --overlap: the decode kernel with the next page's Q K^T in flight during the softmax (DecodeConfig.
# overlap_qk) and the 32-slot combine ring: the decode and combine tests (R1 shapes with and without it),
# then B=64 / 128 at 4K, B=1 at 32K / 64K and two MTP queries with and without it, and B=1 at 32K merged by
# the kernel and by XLA, each step under a timeout (a synchronization mistake would hang)            ~4 min
# --deep: 32-token key tiles, four in flight (DecodeConfig.deep_ring), with and without overlap_qk, beside the
# two-page ring, and the split combine with the weights first (session 15) beside XLA's: the decode tests with
# half-page tiles and the combine tests (R1 shapes) first, then B=64 / 128 at 4K, B=1 at 32K / 64K / 4K and two
# MTP queries, each step under a timeout; and the seesaw order of the compute warpgroups on the same ring
# (DecodeConfig.seesaw: `_ss` cases, tests/test_mla_decode_seesaw.py)                               ~6 min
# Logs and the results JSON go to $OUT (device tool) or experiments/results/.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=""
case "${1:-}" in
  --quick|--cluster|--combine|--overlap|--deep) MODE="${1#--}"; shift ;;
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
  deep) focused deep 240 240 \
    b64_4k_cl,b64_4k_cl_t32,b64_4k_cl_t32_ov,b64_4k_cl_t32_ss,b128_4k_cl,b128_4k_cl_t32,b128_4k_cl_t32_ov,b128_4k_cl_t32_ss,b1_32k_cl,b1_32k_cl_t32,b1_32k_cl_t32_ov,b1_32k_cl_t32_ss,b64_4k_mtp2_cl,b64_4k_mtp2_cl_t32,b64_4k_mtp2_cl_t32_ss,b1_32k_cl_xla,b1_64k_s66_cl,b1_64k_s66_cl_xla,b1_4k,b1_4k_xla \
    tests/test_mla_combine.py tests/test_mla_decode.py tests/test_mla_decode_seesaw.py \
    -k "half_page or key_tile or seesaw or (r1_shapes and not overlapped) or combine or splits or r1_b1" ;;
  overlap) focused overlap 240 240 \
    b64_4k_cl,b64_4k_cl_ov,b128_4k_cl,b128_4k_cl_ov,b1_32k_cl,b1_32k_cl_ov,b1_32k_cl_xla,b1_64k_s66_cl,b1_64k_s66_cl_ov,b64_4k_mtp2_cl,b64_4k_mtp2_cl_ov \
    tests/test_mla_combine.py tests/test_mla_decode.py ;;
  combine) focused combine 200 200 \
    b1_32k_cl,b1_32k_cl_xla,b1_8k_s66_cl,b1_8k_s66_cl_xla,b1_64k_s66_cl,b1_64k_s66_cl_xla,b1_4k,b1_4k_xla,b8_4k,b8_4k_xla,b64_4k_cl \
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
