#!/usr/bin/env bash
# GPU check of the Pallas kernels: tests on the GPU backend, then the benchmark; pass/fail table last.
#   GIT_COMMIT=$(git rev-parse HEAD) bash experiments/gpu_check_kernels.sh [--quick] [device_kind]
# Writes logs and the results JSONs to $OUT (device tool) or experiments/results/. The device
# machine's copy of the tree has no git history: pass GIT_COMMIT so the JSONs name the code.
set -uo pipefail
cd "$(dirname "$0")/.."
QUICK=""
if [[ "${1:-}" == "--quick" ]]; then QUICK="--quick"; shift; fi
KIND="${1:-nvidia-h200}"
source experiments/gpu_env.sh
NGPU=$($PY -c "import jax; print(sum(d.platform == 'gpu' for d in jax.devices()))" 2>/dev/null || echo 0)
echo "GPUs: $NGPU"
declare -A STATUS

$PY -m pytest -q -p no:cacheprovider tests/test_grouped_gemm.py 2>&1 | tee "$OUTDIR/test_grouped_gemm.log"
STATUS[test_grouped_gemm]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

if [[ "$NGPU" -ge 2 ]]; then
  $PY -m pytest -q -p no:cacheprovider tests/test_remote_dma.py 2>&1 | tee "$OUTDIR/test_remote_dma.log"
  STATUS[test_remote_dma]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)
  $PY -m pallas_kernels.remote_dma --bench --device_kind "$KIND" \
    --out "$OUTDIR/kernels-$(date -u +%Y%m%d)-$KIND-remote-dma.json" \
    2>&1 | tee "$OUTDIR/bench_remote_dma.log"
  STATUS[bench_remote_dma]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)
else
  STATUS[test_remote_dma]="skipped (needs >= 2 GPUs)"
fi

JSON="$OUTDIR/kernels-$(date -u +%Y%m%d)-$KIND${QUICK:+-quick}.json"
$PY experiments/bench_kernels.py --device_kind "$KIND" $QUICK --out "$JSON" 2>&1 | tee "$OUTDIR/bench_kernels.log"
STATUS[bench_kernels]=$([[ ${PIPESTATUS[0]} == 0 ]] && echo pass || echo FAIL)

# FP8 vs bf16 in the compute-bound regime: every FP8 variant's time (ms) and the best checked one.
if [[ -f "$JSON" ]]; then
  $PY - "$JSON" <<'PYEOF' 2>&1 | tee "$OUTDIR/fp8_summary.log"
import json, sys
res = json.load(open(sys.argv[1]))
m = res["metrics"]
print("\n== FP8 (checked against reference_fp8, rel err <= %g) ==" % res["config"]["fp8_max_rel_err"])
for r in res["rows"]:
  if r["regime"] != "prefill":
    continue
  t = r["time_s"]
  fp8 = "  ".join("%s=%s" % (k, "-" if t.get(k) is None else "%.3f" % (t[k] * 1e3))
                  for k in res["config"]["fp8_configs"])
  print("%-8s G=%d T=%d bf16 best %s=%.3f ms | %s | best fp8 %s, fp8/bf16 %.2f" % (
      r["shape"], r["groups"], r["tokens_per_group"], r.get("best_variant"),
      t[r["best_variant"]] * 1e3 if r.get("best_variant") else float("nan"), fp8,
      r.get("fp8_best_variant"), r.get("fp8_over_bf16", 0.0)))
print("grouped_gemm_fp8_over_bf16 =", m.get("grouped_gemm_fp8_over_bf16"))
print("by variant:", json.dumps(m.get("grouped_gemm_fp8_over_bf16_by_variant")))
print("max_rel_err_fp8 =", m.get("max_rel_err_fp8"), " failing check:", m.get("fp8_variants_failing_check"))
PYEOF
fi

echo
echo "== kernels GPU check =="
for k in "${!STATUS[@]}"; do printf '%-20s %s\n' "$k" "${STATUS[$k]}"; done
