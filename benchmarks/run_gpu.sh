#!/usr/bin/env bash
# One call on a lent GPU machine: a fresh machine every call (torch, triton, nvcc, ninja, timm
# preinstalled; no package registry), 10 minutes per call, at most 8 files come back from $OUT and
# none more than 2 folders down. Every call installs this checkout without dependencies, building
# vpt_fast._C for this device's architecture only (TORCH_CUDA_ARCH_LIST from the device's compute
# capability, e.g. "9.0a" on an H100; MAX_JOBS = nproc), prints the versions, then runs the named
# steps in order. The calls of a GPU session, in priority order (benchmarks/NOTES.md):
#
#   bash benchmarks/run_gpu.sh headline  # 1: ViT-B/16 training step, one JSON per method as measured
#   bash benchmarks/run_gpu.sh tests     # 2: the extension's GPU tests (own process), then all GPU tests
#   bash benchmarks/run_gpu.sh swin      # 3: Swin-B training step, attention and window-op
#                                        #    microbenchmarks, ViT-B inference (pytest-benchmark JSONs)
#   bash benchmarks/run_gpu.sh profile   # 4: per-kernel time of a ViT-B and a Swin-B training step
#   bash benchmarks/run_gpu.sh ops       # 5: serving (PromptBank, cached prompt K/V), LayerNorm,
#                                        #    residual add + LayerNorm and bias+GELU microbenchmarks
#                                        #    (pytest-benchmark JSONs)
#
# Files, written as each piece ends, under $RESULTS_DIR ($OUT when set, else
# benchmarks/results/<device>): call.log (this whole output), headline/<method>.json,
# tests_ext.log, tests.log, bench_{swin,attention,windows,inference}.json, profile_{vit,swin}.txt,
# bench_{serving,layer_norm,add_layer_norm,bias_gelu}.json.
# `python benchmarks/gpu_headline.py --summarize DIR` and `python benchmarks/summarize.py FILE.json`
# turn them into tables.
#
# Env: DEADLINE_S (nothing starts after this many seconds of the call and running pieces are cut
# there; default 560), SKIP_INSTALL=1 (use the installed checkout: dry runs), VPT_FAST_NO_EXT=1 (no
# extension), TEST_K / BENCH_K (pytest -k; BENCH_K unset: "not torch", as the pure-PyTorch backend is
# the portable reference, not a fast path), BENCH_FILES (the swin step's pieces to run, default all:
# "bench_swin bench_attention bench_windows bench_inference"), HEADLINE_ARGS (extra gpu_headline.py
# arguments, e.g. --methods eager_compile,triton_compile),
# TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON, RESULTS_DIR.
# If the extension's GPU tests fail (a kernel fault poisons the whole process's CUDA context), the
# cuda backend is left out of the remaining tests of that call (-k "not cuda").
# Exit status: the first failure among install and the steps (every step runs anyway).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-560}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
script_start=$(date +%s)
steps=("$@")
(( ${#steps[@]} )) || steps=(headline)
for step in "${steps[@]}"; do
  case $step in
    headline | tests | swin | ops | profile) ;;
    *) echo "run_gpu.sh: unknown step '$step' (expected headline, tests, swin, ops or profile)" >&2; exit 2 ;;
  esac
done

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
         | tr -c 'A-Za-z0-9._\n-' '_' | sed 's/__*/_/g; s/_$//')
RESULTS_DIR=${RESULTS_DIR:-${OUT:-benchmarks/results/$device}}
mkdir -p "$RESULTS_DIR"
exec > >(tee -a "$RESULTS_DIR/call.log") 2>&1

log() { printf '\n=== %s (%ds into the call) ===\n' "$*" $(( $(date +%s) - script_start )); }
left() { echo $(( DEADLINE_S - ($(date +%s) - script_start) )); }
both() { if [[ -n "$1" && -n "$2" ]]; then echo "($1) and ($2)"; else echo "$1$2"; fi; }
status=0
keep() { if (( status == 0 )); then status=$1; fi; }

# run_until NAME LOGFILE CMD...: runs CMD unless the deadline has passed, cut at the deadline, its
# output also into LOGFILE unless that is "-"; returns CMD's exit status (75 when skipped for lack of time).
run_until() {
  local name=$1 logfile=$2 budget rc=0
  shift 2
  budget=$(left)
  if (( budget < 20 )); then
    echo "skipping $name: ${budget}s left before DEADLINE_S=$DEADLINE_S (exit status 75: not run)"
    keep 75  # a piece that did not run must not read as a pass
    return 75
  fi
  log "$name (at most ${budget}s)"
  if [[ "$logfile" == "-" ]]; then
    timeout -k 10 "$budget" "$@" || rc=$?
  else
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$logfile"
    rc=${PIPESTATUS[0]}
  fi
  if (( rc == 124 || rc == 137 )); then
    echo "$name: cut at the deadline (exit status $rc)"
  else
    echo "$name: exit status $rc"
  fi
  keep "$rc"
  return "$rc"
}

if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
  arch=$($PYTHON -c "import torch; M, m = torch.cuda.get_device_capability(); print(f'{M}.{m}' + ('a' if M == 9 else ''))" \
         2>/dev/null) && export TORCH_CUDA_ARCH_LIST=$arch
fi
if [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  log "install: pip install --no-deps --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-the setup.py default}, MAX_JOBS=$MAX_JOBS)"
  start=$(date +%s)
  $PYTHON -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 25
  rc=${PIPESTATUS[0]}
  echo "install: exit status $rc, $(( $(date +%s) - start ))s"
  keep "$rc"
fi

log "versions"
$PYTHON - <<'PY'
import json
import sys
sys.path.insert(0, "benchmarks")
from gpu_headline import full_environment
print(json.dumps(full_environment(), indent=1))
PY
keep $?

# run_benches NAME:FILE[:K]...: each benchmarks/FILE.py into NAME.json (skipped when BENCH_FILES omits NAME)
run_benches() {
  local spec name file only
  for spec in "$@"; do
    IFS=: read -r name file only <<< "$spec"
    if [[ -n "${BENCH_FILES:-}" && " $BENCH_FILES " != *" $name "* ]]; then continue; fi
    run_until "benchmarks/$file.py -> $name.json" - \
      $PYTHON -m pytest "benchmarks/$file.py" --benchmark-only --benchmark-json="$RESULTS_DIR/$name.json" -q \
      -p no:cacheprovider -k "$(both "${BENCH_K-not torch}" "${only:-}")"
    if [[ -s "$RESULTS_DIR/$name.json" ]]; then
      $PYTHON benchmarks/summarize.py "$RESULTS_DIR/$name.json" || true
    else
      rm -f "$RESULTS_DIR/$name.json"  # pytest-benchmark leaves an empty file when nothing ran
    fi
  done
}

for step in "${steps[@]}"; do
  case $step in
    headline)
      run_until "headline: ViT-B/16 training step" - \
        $PYTHON benchmarks/gpu_headline.py --out "$RESULTS_DIR/headline" --deadline-s "$(( $(left) - 15 ))" \
        ${HEADLINE_ARGS:-}
      ;;
    tests)
      without_cuda=""
      if ! run_until "tests: C++/CUDA extension GPU tests (own process)" "$RESULTS_DIR/tests_ext.log" \
          $PYTHON -m pytest tests/test_ext.py -m gpu -q -rfE --maxfail=10 -p no:cacheprovider -k "${TEST_K:-}"; then
        without_cuda="not cuda"
        echo "the cuda backend is left out of the remaining tests"
      fi
      run_until "tests: GPU tests -k '$(both "${TEST_K:-}" "$without_cuda")'" "$RESULTS_DIR/tests.log" \
        $PYTHON -m pytest tests/ -m gpu --ignore=tests/test_ext.py -q -rfE --maxfail=25 -p no:cacheprovider \
        -k "$(both "${TEST_K:-}" "$without_cuda")"
      ;;
    swin)
      run_benches bench_swin:bench_swin bench_attention:bench_attention bench_windows:bench_windows \
                  bench_inference:bench_model:inference
      ;;
    ops)
      run_benches bench_serving:bench_serving bench_layer_norm:bench_layer_norm \
                  bench_add_layer_norm:bench_add_layer_norm bench_bias_gelu:bench_bias_gelu
      ;;
    profile)
      run_until "profile: ViT-B/16 batch 128" "$RESULTS_DIR/profile_vit.txt" \
        $PYTHON benchmarks/profile_step.py --batch 128 --backends triton,cuda
      run_until "profile: Swin-B batch 64" "$RESULTS_DIR/profile_swin.txt" \
        $PYTHON benchmarks/profile_step.py --model swin_base_patch4_window7_224 --batch 64 --backends triton,cuda
      ;;
  esac
done

log "done: exit status $status; files in $RESULTS_DIR"
ls -la "$RESULTS_DIR" "$RESULTS_DIR/headline" 2>/dev/null
exit "$status"
