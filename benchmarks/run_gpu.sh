#!/usr/bin/env bash
# GPU acceptance in one call on a lent GPU machine (benchmarks/NOTES.md): a fresh machine every call
# (torch, triton, nvcc, ninja, timm preinstalled; no package registry), at most 8 files come back
# from $OUT and none more than 2 folders down.
#
#   bash benchmarks/run_gpu.sh acceptance   # the call: kernel checks, ViT-B/16 headline, Swin-B, <= 8 min
#   VPT_GPU_DRY_RUN=1 OUT=/tmp/dry bash benchmarks/run_gpu.sh acceptance   # its CPU dry run (CI runs it)
#
# `acceptance`, in this order, each piece writing its JSON the moment it is measured:
#   0. install this checkout without dependencies and without the extension (seconds), then build
#      vpt_fast._C for this device's architecture only (TORCH_CUDA_ARCH_LIST from its compute
#      capability, e.g. "9.0a" on an H100; MAX_JOBS = nproc) in the background, moved into the
#      package in one rename when linked. Beside the build, where it costs no wall time:
#      smoke_triton.json (the triton backend's kernel checks, benchmarks/gpu_smoke.py) and
#      warm.json (torch.compile of eager and triton at the headline's shapes, filling the on-disk
#      compile caches the timed compiled methods then load; their cold compile times); once the
#      extension is built, warm_cuda.json (the same for cuda).
#   1. smoke_cuda.json: the C++/CUDA kernels' first run: FlashAttention's 2x rule, bitwise-equal
#      prompt gradients over reruns, a ViT-S/16 model against `reference`. A backend whose checks
#      raised or never passed an attention check is not timed (gpu_smoke.py --verdict).
#      smoke_time.json: attention time, the timed backends and SDPA (the GPU is quiet from here on).
#   2. headline.json: ViT-B/16 training step: eager, the timed backends, fastest with
#      recompute="block" (benchmarks/gpu_headline.py);
#   3. swin.json: Swin-B training step, eager and the headline's fastest backend, if >= 60 s are left;
#   4. headline.json again: eager and the fastest under torch.compile, appended (ratios within one call).
# Then call.log (this whole output) ends with the results README
# (`python benchmarks/gpu_headline.py --summarize DIR` makes it again from the files). 8 files.
#
# Other steps (a rerun's tools; each installs with the extension first, as the README says):
#   tests    the extension's GPU tests (own process), then all GPU tests
#   swin     Swin-B training step, attention and window-op microbenchmarks, ViT-B inference
#   profile  per-kernel time of a ViT-B and a Swin-B training step
#   ops      serving (PromptBank, cached prompt K/V), LayerNorm, add + LayerNorm, bias + GELU benchmarks
#   headline the ViT-B/16 headline alone, every method in one run (HEADLINE_ARGS: more arguments)
#
# Files under $RESULTS_DIR ($OUT when set, else benchmarks/results/<device>).
# Env: DEADLINE_S (nothing starts after this many seconds of the call and running pieces are cut
# there; default 450 for acceptance, 560 otherwise), VPT_GPU_DRY_RUN=1 (acceptance's dry run: tiny
# shapes on the CPU, TRITON_INTERPRET=1, the installed checkout, no build), PIECES (acceptance's
# pieces to run, default "smoke warm time headline swin"), VPT_REVISION (the commit,
# recorded: the device's copy of the checkout has no .git), SKIP_INSTALL=1 (use the installed
# checkout and, in acceptance, its extension: a rerun on a still-warm machine), VPT_FAST_NO_EXT=1 (no extension), TEST_K / BENCH_K (pytest -k; BENCH_K unset: "not
# torch"), BENCH_FILES (the swin step's pieces, default all: "bench_swin bench_attention
# bench_windows bench_inference"), HEADLINE_ARGS, TORCH_CUDA_ARCH_LIST, MAX_JOBS, PYTHON, RESULTS_DIR.
# Exit status: the first failure among install and the pieces (every piece runs anyway; a piece
# skipped for lack of time counts as 75).
set -uo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DRY_RUN=${VPT_GPU_DRY_RUN:-0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export PYTHONUNBUFFERED=1
script_start=$(date +%s)
steps=("$@")
(( ${#steps[@]} )) || steps=(acceptance)
for step in "${steps[@]}"; do
  case $step in
    acceptance) (( ${#steps[@]} == 1 )) || { echo "run_gpu.sh: acceptance is a call of its own" >&2; exit 2; } ;;
    headline | tests | swin | ops | profile) ;;
    *) echo "run_gpu.sh: unknown step '$step' (expected acceptance, headline, tests, swin, ops or profile)" >&2
       exit 2 ;;
  esac
done
if [[ "${steps[0]}" == acceptance ]]; then DEADLINE_S=${DEADLINE_S:-450}; else DEADLINE_S=${DEADLINE_S:-560}; fi
# torch.compile's AOTAutograd cache skips graphs with custom autograd.Functions (vpt_fast's ops) unless
# told their code cannot change between runs, which holds within one call: the warm-up then serves it
[[ "${steps[0]}" != acceptance ]] || export TORCHINDUCTOR_AUTOGRAD_CACHE_ALLOW_CUSTOM_AUTOGRAD=1
if [[ "$DRY_RUN" == 1 ]]; then
  [[ "${steps[0]}" == acceptance && -n "${OUT:-}" ]] || {
    echo "run_gpu.sh: VPT_GPU_DRY_RUN=1 runs 'acceptance' only, into \$OUT" >&2; exit 2; }
  export VPT_GPU_DRY_RUN=1 TRITON_INTERPRET=1 SKIP_INSTALL=1
fi

device=$($PYTHON -c "import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" \
         | tr -c 'A-Za-z0-9._\n-' '_' | sed 's/__*/_/g; s/_$//')
RESULTS_DIR=${RESULTS_DIR:-${OUT:-benchmarks/results/$device}}
mkdir -p "$RESULTS_DIR"
exec > >(tee -a "$RESULTS_DIR/call.log") 2>&1
tee_pid=$!

log() { printf '\n=== %s (%ds into the call) ===\n' "$*" $(( $(date +%s) - script_start )); }
left() { echo $(( DEADLINE_S - ($(date +%s) - script_start) )); }
both() { if [[ -n "$1" && -n "$2" ]]; then echo "($1) and ($2)"; else echo "$1$2"; fi; }
status=0
keep() { if (( status == 0 )); then status=$1; fi; }

# run_until NAME LOGFILE CMD...: runs CMD unless fewer than MIN_LEFT (default 20) seconds are left
# before the deadline, cut at the deadline or after MAX_S seconds if sooner, its output also into
# LOGFILE unless that is "-"; returns CMD's exit status (75 when skipped for lack of time).
run_until() {
  local name=$1 logfile=$2 budget rc=0
  shift 2
  budget=$(left)
  if (( budget < ${MIN_LEFT:-20} )); then
    echo "skipping $name: ${budget}s left before DEADLINE_S=$DEADLINE_S (exit status 75: not run)"
    keep 75  # a piece that did not run must not read as a pass
    return 75
  fi
  (( budget <= ${MAX_S:-$budget} )) || budget=$MAX_S
  log "$name (at most ${budget}s)"
  if [[ "$logfile" == "-" ]]; then
    timeout -k 10 "$budget" "$@" || rc=$?
  else
    timeout -k 10 "$budget" "$@" 2>&1 | tee "$logfile"
    rc=${PIPESTATUS[0]}
  fi
  if (( rc == 124 || rc == 137 )); then
    echo "$name: cut after ${budget}s (exit status $rc)"
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
if [[ "${SKIP_INSTALL:-0}" != "1" && "${steps[0]}" == acceptance ]]; then
  log "install without the extension: VPT_FAST_NO_EXT=1 pip install --no-deps --no-build-isolation -e . (it is built next, in the background)"
  start=$(date +%s)
  VPT_FAST_NO_EXT=1 PIP_BREAK_SYSTEM_PACKAGES=1 $PYTHON -m pip install --no-deps --no-build-isolation -e . 2>&1 \
    | tail -n 5
  rc=${PIPESTATUS[0]}
  echo "install: exit status $rc, $(( $(date +%s) - start ))s"
  keep "$rc"
  if ! (cd /tmp && $PYTHON -c "import vpt_fast.kernels, vpt_fast.backends"); then
    echo "run_gpu.sh: vpt_fast does not import after the install: nothing else can run; stopping" >&2
    exit 1
  fi
elif [[ "${SKIP_INSTALL:-0}" != "1" ]]; then
  log "install: pip install --no-deps --no-build-isolation -e . (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-the setup.py default}, MAX_JOBS=$MAX_JOBS)"
  start=$(date +%s)
  $PYTHON -m pip install --no-deps --no-build-isolation -e . 2>&1 | tail -n 25
  rc=${PIPESTATUS[0]}
  echo "install: exit status $rc, $(( $(date +%s) - start ))s"
  keep "$rc"
fi

log "versions"
echo "nvcc: $(nvcc --version 2>/dev/null | tail -n 1 || echo none); ninja: $(ninja --version 2>/dev/null || echo none); nproc: $(nproc)"
$PYTHON - <<'PY'
import json
import sys
sys.path.insert(0, "benchmarks")
from gpu_headline import full_environment
print(json.dumps(full_environment(), indent=1))
PY
keep $?

# build_extension DIR: vpt_fast._C built under DIR (TORCH_CUDA_ARCH_LIST, MAX_JOBS), then renamed into
# vpt_fast/ in one step: a process importing the package meanwhile sees no extension or all of it.
build_extension() {
  local dir=$1 so rc start budget
  start=$(date +%s)
  budget=$(left)
  (( budget <= 300 )) || budget=300  # ~1 minute with 16 cores; longer means something hangs
  timeout -k 10 "$budget" $PYTHON setup.py build_ext --build-lib "$dir/lib" --build-temp "$dir/tmp" \
    > "$dir/build.log" 2>&1
  rc=$?
  if (( rc == 0 )); then
    so=$(ls "$dir"/lib/vpt_fast/_C*.so) && cp "$so" "vpt_fast/.$(basename "$so").part" \
      && mv -f "vpt_fast/.$(basename "$so").part" "vpt_fast/$(basename "$so")" || rc=1
  fi
  if (( rc != 0 )); then  # the first compiler errors, which the tail's setuptools traceback scrolls away
    grep -n -m 20 -B 2 -A 8 -E "error|Error" "$dir/build.log" | head -n 150
  fi
  tail -n 25 "$dir/build.log"
  echo "build: exit status $rc, $(( $(date +%s) - start ))s"
  return "$rc"
}

# want PIECE: acceptance runs PIECE (PIECES, default all: "smoke warm time headline swin"; a rerun names fewer)
want() { [[ " ${PIECES:-smoke warm time headline swin} " == *" $1 "* ]]; }

# wait_for NAME PID: the background piece's exit status joins the call's (and is left in last_rc)
wait_for() {
  local rc=0
  wait "$2" || rc=$?
  echo "$1 (background): exit status $rc"
  keep "$rc"
  last_rc=$rc
}

# timed_ok BACKEND FILE: whether BACKEND's kernel checks in FILE allow timing it (gpu_smoke.py --verdict)
timed_ok() { $PYTHON benchmarks/gpu_smoke.py --verdict "$2" "$1"; }

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
    acceptance)
      build_pid="" smoke_pid="" warm_pid="" warm_cuda_pid=""
      if [[ "${SKIP_INSTALL:-0}" == 1 ]]; then
        log "no build: the installed checkout and its extension$([[ $DRY_RUN == 1 ]] && echo " (dry run: tiny shapes on the CPU)")"
      else
        log "build: vpt_fast._C (TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-the setup.py default}, MAX_JOBS=$MAX_JOBS) in the background"
        build_extension "$(mktemp -d)" &
        build_pid=$!
      fi
      if want smoke; then
        MAX_S=200 run_until "smoke_triton.json: triton kernel checks (beside the build)" - \
          $PYTHON benchmarks/gpu_smoke.py --backends triton --out "$RESULTS_DIR/smoke_triton.json" --deadline-s 90 &
        smoke_pid=$!
      fi
      if want warm; then
        MAX_S=240 TORCHINDUCTOR_COMPILE_THREADS=8 run_until \
          "warm.json: compile caches for the compiled methods (beside the build)" - \
          $PYTHON benchmarks/gpu_headline.py --warm --methods eager_compile,triton_compile \
          --out "$RESULTS_DIR/warm.json" --deadline-s 180 --min-method-s 20 &
        warm_pid=$!
      fi
      built=1
      [[ -z "$build_pid" ]] || { wait_for build "$build_pid"; (( last_rc == 0 )) || built=0; }
      if want warm && (( built )); then  # cuda's compiled graph differs only in its attention op
        MAX_S=200 TORCHINDUCTOR_COMPILE_THREADS=8 run_until "warm_cuda.json: compile cache for cuda_compile" - \
          $PYTHON benchmarks/gpu_headline.py --warm --methods cuda_compile --out "$RESULTS_DIR/warm_cuda.json" \
          --deadline-s 150 --min-method-s 20 &
        warm_cuda_pid=$!
      fi
      # a backend is timed when its attention ran right at least once and no check raised (one that
      # missed a bound is timed, and the README says it failed); none: the torch backend is timed
      timed=()
      if want smoke; then
        MAX_S=120 run_until "smoke_cuda.json: the C++/CUDA kernels' checks" - \
          $PYTHON benchmarks/gpu_smoke.py --backends cuda --out "$RESULTS_DIR/smoke_cuda.json" --deadline-s 60
        wait_for smoke_triton "$smoke_pid"
        ! timed_ok triton "$RESULTS_DIR/smoke_triton.json" || timed+=(triton)
        ! timed_ok cuda "$RESULTS_DIR/smoke_cuda.json" || timed+=(cuda)
      else
        timed=(triton cuda)
      fi
      [[ -z "$warm_pid" ]] || wait_for warm "$warm_pid"
      [[ -z "${warm_cuda_pid:-}" ]] || wait_for warm_cuda "$warm_cuda_pid"
      (( ${#timed[@]} )) || { timed=(torch); echo "no GPU backend passed its checks: timing the torch backend"; }
      backends=$(IFS=,; echo "${timed[*]}")
      deadline_at=$(( script_start + DEADLINE_S - 10 ))
      ! want time || MAX_S=90 run_until "smoke_time.json: attention time (the GPU is quiet from here on)" - \
        $PYTHON benchmarks/gpu_smoke.py --backends "$backends" --no-checks --time \
        --out "$RESULTS_DIR/smoke_time.json"
      # uncompiled ViT-B, then Swin-B, then the compiled ViT-B methods (the least predictable in time)
      # appended to the same headline.json: every ratio is within this call
      ! want headline || run_until "headline.json: ViT-B/16 training step (eager,$backends,fastest_block)" - \
        $PYTHON benchmarks/gpu_headline.py --methods "eager,$backends,fastest_block" --no-flops \
        --out "$RESULTS_DIR/headline.json" --deadline-at "$deadline_at"
      ! want swin || MIN_LEFT=60 MAX_S=120 run_until "swin.json: Swin-B training step (eager, the fastest)" - \
        $PYTHON benchmarks/gpu_headline.py --setting swin_b --methods "eager,fastest" --no-flops \
        --fastest-from "$RESULTS_DIR/headline.json" --out "$RESULTS_DIR/swin.json" --deadline-at "$deadline_at"
      ! want headline || run_until "headline.json: ViT-B/16 under torch.compile (eager, the fastest)" - \
        $PYTHON benchmarks/gpu_headline.py --methods "eager_compile,fastest_compile" --append \
        --out "$RESULTS_DIR/headline.json" --deadline-at "$deadline_at"
      rm -f "$RESULTS_DIR"/*.tmp  # a record cut mid-write: at most 8 files come back
      log "results README (python benchmarks/gpu_headline.py --summarize DIR)"
      $PYTHON benchmarks/gpu_headline.py --summarize "$RESULTS_DIR"
      ;;
    headline)
      run_until "headline: ViT-B/16 training step" - \
        $PYTHON benchmarks/gpu_headline.py --out "$RESULTS_DIR/headline.json" --deadline-s "$(( $(left) - 15 ))" \
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
ls -la "$RESULTS_DIR"
exec >&- 2>&-  # let tee write the last lines of call.log before the call ends
wait "$tee_pid" 2>/dev/null
exit "$status"
