export PYTHONPATH=. PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false TF_CPP_MIN_LOG_LEVEL=2 GIT_COMMIT=6cfdfd42842adae180ab82c669a45b675413b8aa
timeout 200 python3 experiments/diag/peer_alias.py 2>&1 | grep -v "^I11\|^W11" | tail -30 | tee $OUT/peer_alias.log
