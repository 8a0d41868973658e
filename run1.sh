set -x
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=6687f82d3e4e080a39d9b6c44331fe32b96045ce DWDP_COMMIT=6687f82d3e4e080a39d9b6c44331fe32b96045ce
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit --format=csv
timeout 330 python3 -m pallas_kernels.remote_dma --bench --device_kind nvidia-h200-x2 --out $OUT/kernels-20261123-nvidia-h200-x2-remote-dma.json 2>&1 | grep -v "^I11\|^W11" | tee $OUT/bench_remote_dma.log
