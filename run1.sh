set -x
export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=8c96c7a6133c85a4fe5a6783ef49a72fda16f97d DWDP_COMMIT=8c96c7a6133c85a4fe5a6783ef49a72fda16f97d
nvidia-smi --query-gpu=index,name,clocks.sm,clocks.max.sm,power.limit --format=csv
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_remote_dma.py 2>&1 | tail -15 | tee $OUT/test_remote_dma.log
timeout 330 python3 -m pallas_kernels.remote_dma --bench --device_kind nvidia-h200-x2 --out $OUT/kernels-20261123-nvidia-h200-x2-remote-dma.json 2>&1 | grep -v "^I11\|^W11" | tee $OUT/bench_remote_dma.log
