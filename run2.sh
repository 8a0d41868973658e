export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2
timeout 240 python3 experiments/diag/remote_dma_profile.py 2>&1 | grep -v "^I11\|^W11" | tee $OUT/remote_dma_profile.log
