export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=4fc78433c3f3d896eb7b67dabe2ffcd7996dcb2a
for proj in gate_up down; do for v in bf16 fp8_128x128_msplit fp8_128x128_msplit_overlap; do
  timeout 120 python3 experiments/diag/fp8_profile.py --variant=$v --proj=$proj --cupti 2>&1 | grep -v "^I11\|^W11" | tee -a $OUT/cupti.log
done; done
for v in fp8_128x128_msplit fp8_128x128_msplit_overlap fp8_64x256_nsplit; do
  rm -rf /tmp/d; mkdir -p /tmp/d
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_TO=/tmp/d timeout 120 python3 experiments/diag/fp8_profile.py --variant=$v --proj=gate_up --reps=1 > /dev/null 2>&1
  cat /tmp/d/*.ptxas > $OUT/ptxas_$v.txt; echo "== $v"; grep -v "^ptxas info    : Compile time" $OUT/ptxas_$v.txt | head -12
done
NCU="ncu --clock-control none --target-processes all --kernel-name regex:mosaic --launch-skip 1 --launch-count 1"
for v in bf16 fp8_128x128_msplit fp8_128x128_msplit_overlap; do
  timeout 150 $NCU --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active.ratio" python3 experiments/diag/fp8_profile.py --variant=$v --proj=gate_up --reps=2 > $OUT/ncu_stalls_$v.txt 2>&1
  echo "== $v"; grep "smsp__average" $OUT/ncu_stalls_$v.txt | awk '$NF+0 > 0.05' | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
done
