#!/usr/bin/env bash
# All the GPU work in one command, in steps that can also run one by one:
#
#   bash benchmarks/device.sh               every step: env build check test bench
#   bash benchmarks/device.sh check test    only those steps (e.g. after a fix)
#   bash benchmarks/device.sh --dry-run     print every step's commands; run the CPU-able ones (CI does this)
#
# env    the GPU, driver, torch / triton / nvcc versions               (seconds)
# build  pip install --no-build-isolation -e . with nvcc for the GPU    (~2 min)
# check  lazyhasty check --device cuda: every op x backend vs reference  (~1 min)
# test   pytest -m gpu: every CUDA / Triton path vs torch on the device  (~3 min)
# bench  pytest benchmarks -m gpu -> benchmarks/results/<gpu>-<commit>.json and .md  (~15 min)
#
# Each step runs under `timeout` (STEP_TIMEOUT, default 540 s: one device command may take 10 minutes), so
# every step fits in one call of the device tool; the whole fits in 30 minutes of device time. On a failure
# it prints the step that stopped and how to rerun from there. Results go to benchmarks/results/ and, when
# $OUT is set (the device tool), are copied there too.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY=0
STEPS=()
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    env|build|check|test|bench) STEPS+=("$a") ;;
    *) echo "device.sh: unknown argument '$a' (steps: env build check test bench; --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#STEPS[@]} -eq 0 ] && STEPS=(env build check test bench)
STEP_TIMEOUT=${STEP_TIMEOUT:-540}
PY=${PYTHON:-python3}
RESULTS=benchmarks/results
COMMIT=$(git rev-parse --short=10 HEAD 2>/dev/null || echo unknown)
# a tree that differs from HEAD is labelled so (on the first GPU run the copy's git metadata lagged the files)
[ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && COMMIT="$COMMIT-dirty"
# a per-case limit where pytest-timeout is installed: one stuck case fails alone instead of taking the step
# (and every other case's record) with it
PER_CASE=$($PY -c 'import pytest_timeout' 2>/dev/null && echo "--timeout 300" || true)
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1

gpu_name() {
  $PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-') if torch.cuda.is_available() else 'cpu')" 2>/dev/null || echo unknown
}

step_cmd() {  # the command of each step, printed by --dry-run and run otherwise
  case "$1" in
    env) echo "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -2; $PY -c \"import torch, triton, lazyhasty; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__); print(lazyhasty._backend.summary())\"" ;;
    build) echo "CC=\$(\$PY -c 'import torch; c = torch.cuda.get_device_capability(); print(f\"{c[0]}{c[1]}\")'); LAZYHASTY_CUDA=ON LAZYHASTY_CUDA_ARCH=\$CC $PY -m pip install -q --no-build-isolation --no-deps -e ." ;;
    check) echo "$PY -m lazyhasty check --device cuda --json $RESULTS/check-\$(gpu_name)-$COMMIT.json" ;;
    test) echo "$PY -m pytest -m gpu tests -q -p no:cacheprovider -rfE $PER_CASE" ;;
    bench) echo "$PY -m pytest benchmarks -m gpu -q -p no:cacheprovider -rfE $PER_CASE --benchmark-json $RESULTS/\$(gpu_name)-$COMMIT.json && $PY benchmarks/summarize.py $RESULTS/\$(gpu_name)-$COMMIT.json --markdown > $RESULTS/\$(gpu_name)-$COMMIT.md" ;;
  esac
}

copy_out() {  # after every step, so that what a later failing step leaves behind still comes back
  [ -n "${OUT:-}" ] && cp "$RESULTS"/*"$COMMIT"* "$OUT"/ 2>/dev/null
  return 0
}

run_step() {
  local name=$1 cmd t0 rc
  cmd=$(step_cmd "$name")
  echo "=== device.sh: $name"
  echo "+ $cmd"
  t0=$(date +%s)
  timeout "$STEP_TIMEOUT" bash -o pipefail -c "$(declare -f gpu_name); PY=$PY; $cmd"
  rc=$?
  echo "=== device.sh: $name took $(( $(date +%s) - t0 )) s (exit $rc)"
  if [ $rc -ne 0 ]; then
    local rest=() seen=0
    for s in "${STEPS[@]}"; do [ "$s" = "$name" ] && seen=1; [ $seen -eq 1 ] && rest+=("$s"); done
    echo "device.sh: stopped at step '$name' (exit $rc$([ $rc -eq 124 ] && echo ', timed out after '"$STEP_TIMEOUT"' s'))." >&2
    echo "device.sh: after a fix, continue with: bash benchmarks/device.sh ${rest[*]}" >&2
    copy_out
    exit $rc
  fi
}

if [ $DRY -eq 1 ]; then
  for s in "${STEPS[@]}"; do echo "=== device.sh (dry run): $s"; echo "+ $(step_cmd "$s")"; done
  # the CPU-able part of each step: the checker on CPU, and the GPU tests and benchmarks collect
  echo "=== device.sh (dry run): CPU steps"
  $PY -m lazyhasty check --device cpu --quick --failures-only || { echo "device.sh: dry run: check failed" >&2; exit 1; }
  $PY -m pytest -m gpu tests --collect-only -q -p no:cacheprovider | tail -1
  $PY -m pytest benchmarks -m gpu --collect-only -q -p no:cacheprovider | tail -1
  echo "device.sh: dry run ok"
  exit 0
fi

if [ "${DEVICE_SH_SKIP_GPU_TEST:-0}" != 1 ] && ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "device.sh: torch sees no CUDA device here; use --dry-run on a machine without a GPU" >&2
  exit 3
fi
mkdir -p "$RESULTS"
for s in "${STEPS[@]}"; do run_step "$s"; copy_out; done
echo "device.sh: all steps done (${STEPS[*]})"
