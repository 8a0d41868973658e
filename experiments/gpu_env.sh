# Sourced by the gpu_check_*.sh scripts (from the repository root): where results go and the environment every
# GPU check runs in. Sets OUTDIR (the device tool's $OUT, else experiments/results/), PY and GIT_COMMIT (the
# device machine's copy of the tree has no git history: pass GIT_COMMIT so the JSONs name the code).
OUTDIR="${OUT:-experiments/results}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export GIT_COMMIT="${GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"
PY="${PYTHON:-python3}"

# The device tool may run a call on another card than the kind the caller names (session 15: a call for
# nvidia-h100-x1 ran on an H200): KIND becomes the kind of the GPUs this machine has, so the results' names and
# device_kind say which card measured them.
if command -v nvidia-smi > /dev/null 2>&1; then
  _gpus="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null)"
  _count=$(grep -c . <<< "$_gpus")
  case "$(head -1 <<< "$_gpus")" in
    *H200*) _kind=nvidia-h200 ;;
    *H100*) _kind=nvidia-h100 ;;
    *) _kind="" ;;
  esac
  if [[ -n "$_kind" ]]; then
    [[ $_kind == nvidia-h100 || $_count != 1 ]] && _kind="$_kind-x$_count"  # nvidia-h200 alone has no -x1
    [[ -n "${KIND:-}" && "$KIND" != "$_kind" ]] && echo "device kind: $KIND was named, this machine is $_kind"
    KIND="$_kind"
  fi
fi

# A pass/fail step of a GPU check script:
#   step PREFIX NAME TIMEOUT_S COMMAND...
# runs COMMAND with a time-out, logs it to $OUTDIR/PREFIX-NAME.log, records pass / FAIL(rc=N) / TIMEOUT(Ns) in
# STATUS[NAME] (declare -A STATUS; ORDER=() first; ORDER keeps the steps in order) and prints the log's tail
# (absl's I/W lines left out).
step() {
  local prefix=$1 name=$2 limit=$3; shift 3
  ORDER+=("$name")
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUTDIR/$prefix-$name.log" 2>&1
  local rc=$?
  STATUS[$name]=$([[ $rc == 0 ]] && echo pass || ([[ $rc == 124 ]] && echo "TIMEOUT(${limit}s)" || echo "FAIL(rc=$rc)"))
  echo "== $name: ${STATUS[$name]} in $((SECONDS - t0)) s"
  grep -v '^\s*$' "$OUTDIR/$prefix-$name.log" | grep -v '^[IW][0-9]\{4\} ' | tail -24
}
