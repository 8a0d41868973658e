export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=bd749f16b2b2ab45c9b508a50a6c94c5b23098b8
for proj in gate_up down; do
  timeout 100 python3 experiments/diag/fp8_profile.py --variant=fp8_128x128_msplit --proj=$proj --cupti 2>&1 | grep -v "^I11\|^W11\|loop_add\|loop_select\|iota\|broadcast_fusion\|UserWarning\|warnings.warn" | tee -a $OUT/cupti_barrier.log
done
