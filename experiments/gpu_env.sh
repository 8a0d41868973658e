# Sourced by the gpu_check_*.sh scripts (from the repository root): where results go and the environment every
# GPU check runs in. Sets OUTDIR (the device tool's $OUT, else experiments/results/), PY and GIT_COMMIT (the
# device machine's copy of the tree has no git history: pass GIT_COMMIT so the JSONs name the code).
OUTDIR="${OUT:-experiments/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
PY="${PYTHON:-python3}"
