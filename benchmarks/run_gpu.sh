#!/usr/bin/env bash
# One call on a lent GPU machine (no package registry; torch, triton, nvcc, ninja, timm preinstalled):
# install this checkout without dependencies (building vpt_fast._C), print versions and ext_info,
# run the GPU tests, then the benchmark suite, one pytest process per benchmark file, each writing
# its own results JSON and summary as soon as it ends, so a call cut short keeps what finished.
# Results land in $RESULTS_DIR: $OUT/results/<device> when $OUT is set (the lent machine's return
# folder), else benchmarks/results/<device>.
#
#   bash benchmarks/run_gpu.sh                 # everything
#   SKIP_TESTS=1 bash benchmarks/run_gpu.sh    # benchmarks only
#   SKIP_BENCH=1 bash benchmarks/run_gpu.sh    # build + tests only
#   BENCH_FILES="bench_swin bench_attention" SKIP_TESTS=1 bash benchmarks/run_gpu.sh
#   TESTS=tests/test_attention.py TEST_K="bf16" BENCH_K="attention" bash benchmarks/run_gpu.sh
#   SKIP_EXT=1 ...                             # extension tests already run in an earlier call
# Env: TESTS (test paths, default tests/), TEST_K / BENCH_K (pytest -k expressions), BENCH_FILES
# (benchmark files in priority order, default "bench_model bench_swin bench_attention bench_windows"),
# BENCH_BUDGET_S (start no further benchmark file after this many seconds of the script, default 540),
# RESULTS_DIR, TORCH_CUDA_ARCH_LIST (default: setup.py's "8.0;9.0a"), MAX_JOBS (default: nproc), PYTHON.
# The C++/CUDA extension's GPU tests run first, in their own process: if they fail (a kernel fault
# poisons the CUDA context of the whole process), the cuda backend is left out of the remaining
# tests and benchmarks (-k "not cuda") so that one call still measures everything else.
# Exit status: the first failure among build, extension tests, tests, benchmarks (all run anyway).
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
script_start=$(date +%s)

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
         | tr -c 'A-Za-z0-9._\n-' '_' | sed 's/__*/_/g; s/_$//')
if [[ -n "${OUT:-}" ]]; then
  RESULTS_DIR=${RESULTS_DIR:-$OUT/results/$device}
else
  RESULTS_DIR=${RESULTS_DIR:-benchmarks/results/$device}
fi
mkdir -p "$RESULTS_DIR"
log() { printf '\n=== %s ===\n' "$*"; }
both() { if [[ -n "$1" && -n "$2" ]]; then echo "($1) and ($2)"; else echo "$1$2"; fi; }

log "install (pip install --no-deps --no-build-isolation -e .)"
start=$(date +%s)
build_status=0
$PYTHON -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 25 || build_status=$?
build_s=$(( $(date +%s) - start ))
echo "build status: $build_status, build time: ${build_s}s"

log "versions"
$PYTHON - <<'PY' 2>&1 | tee "$RESULTS_DIR/versions.txt" || true
import json, platform, subprocess
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
try:
    import triton; info["triton"] = triton.__version__
except ImportError as e:
    info["triton"] = f"missing: {e}"
try:
    import timm; info["timm"] = timm.__version__
except ImportError as e:
    info["timm"] = f"missing: {e}"
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = torch.cuda.get_device_capability()
try:
    info["nvcc"] = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
except Exception as e:  # noqa: BLE001
    info["nvcc"] = f"missing: {e}"
print(json.dumps(info, indent=1))
from vpt_fast.backends import cuda_impl
print("ext_info:", json.dumps(cuda_impl.ext_info(), indent=1))
PY

ext_status=0
if [[ "${SKIP_EXT:-0}" != "1" ]]; then
  log "C++/CUDA extension GPU tests (own process)"
  $PYTHON -m pytest tests/test_ext.py -m gpu -q -x 2>&1 | tee "$RESULTS_DIR/tests_ext.log" | tail -n 25 || ext_status=$?
  echo "extension tests status: $ext_status"
fi
without_cuda=""
if (( ext_status != 0 )); then
  without_cuda="not cuda"
  echo "the cuda backend is left out of the remaining tests and benchmarks"
fi

test_status=0
if [[ "${SKIP_TESTS:-0}" != "1" ]]; then
  test_k=$(both "${TEST_K:-}" "$without_cuda")
  log "GPU tests (pytest ${TESTS:-tests/} -m gpu --ignore=tests/test_ext.py --maxfail=25 -q -k '$test_k')"
  # shellcheck disable=SC2086
  $PYTHON -m pytest ${TESTS:-tests/} -m gpu --ignore=tests/test_ext.py --maxfail=25 -q -k "$test_k" 2>&1 \
    | tee "$RESULTS_DIR/tests.log" | tail -n 40 || test_status=$?
  echo "tests status: $test_status"
fi

bench_status=0
if [[ "${SKIP_BENCH:-0}" != "1" ]]; then
  bench_k=$(both "${BENCH_K:-}" "$without_cuda")
  for name in ${BENCH_FILES:-bench_model bench_swin bench_attention bench_windows}; do
    elapsed=$(( $(date +%s) - script_start ))
    if (( elapsed > ${BENCH_BUDGET_S:-540} )); then
      echo "skipping $name: ${elapsed}s into the call (BENCH_BUDGET_S=${BENCH_BUDGET_S:-540})"
      continue
    fi
    log "benchmarks/$name.py (pytest --benchmark-only -k '$bench_k')"
    status=0
    $PYTHON -m pytest "benchmarks/$name.py" --benchmark-only --benchmark-json="$RESULTS_DIR/$name.json" -q \
      -k "$bench_k" 2>&1 | tee "$RESULTS_DIR/$name.log" | tail -n 20 || status=$?
    echo "$name status: $status"
    (( bench_status == 0 )) && bench_status=$status
    if [[ -s "$RESULTS_DIR/$name.json" ]]; then
      $PYTHON benchmarks/summarize.py "$RESULTS_DIR/$name.json" --markdown "$RESULTS_DIR/$name.md" || true
    else
      rm -f "$RESULTS_DIR/$name.json"  # pytest-benchmark leaves an empty file when nothing ran
    fi
  done
fi

printf '{"device": "%s", "build_status": %d, "build_seconds": %d, "ext_tests_status": %d, "tests_status": %d, "bench_status": %d, "seconds": %d}\n' \
  "$device" "$build_status" "$build_s" "$ext_status" "$test_status" "$bench_status" $(( $(date +%s) - script_start )) \
  | tee "$RESULTS_DIR/status.json"

for status in "$build_status" "$ext_status" "$test_status"; do
  if (( status != 0 )); then exit "$status"; fi
done
exit "$bench_status"
