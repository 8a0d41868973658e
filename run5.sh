export PYTHONPATH=. PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=73544d9c16547a9f335fdf703a2bbe3f996110d9
which ncu ptxas nvdisasm; ls /usr/local/cuda*/bin 2>/dev/null | head
mkdir -p $OUT/dump
for v in bf16 fp8_128x128_msplit fp8_128x128_msplit_overlap fp8_64x256_nsplit; do
  mkdir -p $OUT/dump/$v
  MOSAIC_GPU_DUMP_PTXAS=1 MOSAIC_GPU_DUMP_SASS=1 MOSAIC_GPU_DUMP_TO=$OUT/dump/$v timeout 120 python3 experiments/diag/fp8_profile.py --variant=$v --proj=gate_up > $OUT/dump/$v/stdout.log 2>&1
  grep -v "^I11\|^W11" $OUT/dump/$v/stdout.log | grep -i "TFLOP\|regist\|spill\|serializ\|warn\|error" | head -20
  ls $OUT/dump/$v | head
done
NCU="ncu --clock-control none --target-processes all --kernel-name regex:mosaic --launch-skip 1 --launch-count 1"
for v in bf16 fp8_128x128_msplit fp8_128x128_msplit_overlap; do
  timeout 150 $NCU --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats python3 experiments/diag/fp8_profile.py --variant=$v --proj=gate_up --reps=2 > $OUT/ncu_$v.txt 2>&1
  grep -i "TFLOP\|Throughput\|Duration\|Registers Per\|SM Frequency\|Issue Slots\|Executed Ipc\|Achieved Occ\|==ERROR\|==WARNING" $OUT/ncu_$v.txt | head -24
done
timeout 100 $NCU --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__cycles_elapsed.avg.per_second,smsp__warp_issue_stalled_barrier_per_warp_active.pct python3 experiments/diag/fp8_profile.py --variant=fp8_128x128_msplit --proj=gate_up --reps=2 2>&1 | grep -v "^I11\|^W11" | tail -15
