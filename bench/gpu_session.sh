#!/usr/bin/env bash
# What a session with a lent GPU runs, in one device call (at most 10 minutes):
#
#   bash bench/gpu_session.sh [--no-quick] [STAGE ...]      STAGE: sanitize, bench-full,
#                                                           no-tensor-core-build, or all
#   bash bench/gpu_session.sh --list-stages                 each stage's expected seconds and
#                                                           the least it needs to start
#
#   quick (first, always, unless --no-quick), about 5.5 min:
#       build for the visible GPU's arch (only when the build lacks it), the CUDA tests
#       (tests/ops/test_cuda.py), ~30 s of bench/bench_gpu_quick.py (N = 64, 1024, 16384, D = 128,
#       fp32 and bf16: fused vs eager vs torch.compile) plus its compilations
#   sanitize, about 4 min: compute-sanitizer memcheck, racecheck, initcheck and synccheck, each
#       on bench/sanitize_workload.py with the caching allocator off, each reported on its own
#   bench-full, about 3 min: bench/bench_icd_loss.py in fp32 and bf16, N = 64 .. 65536,
#       D = 128 and 512, fused / eager / roofline (torch.compile is in quick)
#   no-tensor-core-build, about 4 min: a TORCH_CUDA_ARCH_LIST="7.5+PTX" build in a scratch
#       copy of the tree, whose fp16/bf16/TF32 tests must take the CUDA cores, not the trap
#
# A first session: `bash bench/gpu_session.sh sanitize` (quick, then sanitize: about 9.5 min)
# in one call; then, if device time is left, `--no-quick bench-full` at once, on the same
# warm machine (the build is kept between calls). docs/gpu_session.md says more.
#
# What comes back from $OUT (default ./gpu-out), within the device tool's rules (at most 8
# files, named in [A-Za-z0-9._-], at most two folders down):
#   summary.txt        a line per step, appended as each finishes (PASS / FAIL / TIMEOUT /
#                      SKIPPED), then the listing of $OUT checked against those rules
#   logs.tar.gz        every finished step's log, the test reports, the build info and
#                      nvidia-smi; rewritten after each step
#   running.log        the log of the step in progress (moved into the archive when it ends,
#                      so it is there only if the call was cut short)
#   quick-bench.json   bench-full-float32.json   bench-full-bfloat16.json
# A stage starts only when the minimum it needs (--list-stages) is left of
# GPU_SESSION_BUDGET_S (default 570 s, under the 600 s a call may run); every step runs under
# a timeout of what is left, so the summary and the archive are always written. A failed
# step or stage does not stop the later ones.
#
# GPU_SESSION_DRY_RUN=1 runs the stage logic without a GPU: commands are written to the logs
# instead of run, the result files are written as placeholders, and the listing is checked
# (tests/bench/test_gpu_session.py runs it in CI); it ends by naming every file it wrote under
# $OUT, those gone again included. There GPU_SESSION_DRY_RUN_FAIL="stage:step ..." fails the
# named steps, GPU_SESSION_DRY_RUN_CUT="stage:step" ends the session in that step as the
# device tool's time limit would, GPU_SESSION_DRY_RUN_ARCH (default 9.0) is the GPU's arch
# and GPU_SESSION_DRY_RUN_BUILT_ARCHS (default 8.0) the arch list of the existing build.
set -uo pipefail  # no -e: a failing step is reported and the next one runs
cd "$(dirname "$0")/.."

# The stages, in the order `all` runs them, their expected seconds on an H100, and the
# least time left for which one still starts (one sanitizer, one benchmark dtype, the whole
# scratch build with its tests): what does not fit then ends as TIMEOUT, step by step.
STAGE_ORDER=(quick sanitize bench-full no-tensor-core-build)
declare -A STAGE_EXPECTED_S=([quick]=330 [sanitize]=240 [bench-full]=180 [no-tensor-core-build]=240)
declare -A STAGE_MINIMUM_S=([quick]=0 [sanitize]=75 [bench-full]=100 [no-tensor-core-build]=200)
SANITIZER_TOOLS=(memcheck racecheck initcheck synccheck)
BENCH_FULL_DTYPES=(float32 bfloat16)

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }

stages=()
run_quick=1
for arg in "$@"; do
  case "$arg" in
    -h|--help) usage; exit 0 ;;
    --list-stages)
      for stage in "${STAGE_ORDER[@]}"; do
        echo "$stage ${STAGE_EXPECTED_S[$stage]} ${STAGE_MINIMUM_S[$stage]}"
      done
      exit 0 ;;
    --no-quick) run_quick=0 ;;
    all) stages+=("${STAGE_ORDER[@]:1}") ;;
    quick) ;;
    *)
      if [[ -z "${STAGE_EXPECTED_S[$arg]+set}" ]]; then
        echo "gpu_session.sh: unknown stage '$arg' (stages: ${STAGE_ORDER[*]}, all, --no-quick)" >&2
        exit 2
      fi
      stages+=("$arg") ;;
  esac
done
(( run_quick )) && stages=(quick "${stages[@]}")
if (( ${#stages[@]} == 0 )); then
  echo "gpu_session.sh: --no-quick leaves no stage to run; name one (${STAGE_ORDER[*]:1}, all)" >&2
  exit 2
fi
# Each stage once, in the order given.
declare -A seen=()
ordered=()
for stage in "${stages[@]}"; do
  [[ -n "${seen[$stage]+set}" ]] || ordered+=("$stage")
  seen[$stage]=1
done
stages=("${ordered[@]}")

OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
RUNNING_LOG="$OUT/running.log"
ARCHIVE="$OUT/logs.tar.gz"
rm -f "$SUMMARY" "$RUNNING_LOG" "$ARCHIVE" "$OUT"/quick-bench.json "$OUT"/bench-full-*.json
WORK="$(mktemp -d)"
LOGS="$WORK/logs"
mkdir -p "$LOGS"
trap 'rm -rf "$WORK"' EXIT

DRY_RUN="${GPU_SESSION_DRY_RUN:-0}"
DRY_RUN_FAIL=" ${GPU_SESSION_DRY_RUN_FAIL:-} "
DRY_RUN_CUT="${GPU_SESSION_DRY_RUN_CUT:-}"
BUDGET_S="${GPU_SESSION_BUDGET_S:-570}"
RESERVE_S=15  # kept for the archive and the listing at the end
START_S=$SECONDS
# The lent machines' Python with PyTorch is python3 (no plain `python` there).
PY="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

dry() { [[ "$DRY_RUN" == 1 ]]; }
remaining_s() { echo $(( BUDGET_S - (SECONDS - START_S) - RESERVE_S )); }
tool() { "$PY" bench/gpu_session_tools.py "$@"; }
note() { echo "$*" | tee -a "$SUMMARY"; }
# Every name written under $OUT, for the check at the end (files gone again count too).
declare -A WROTE=()
wrote() { local path; for path in "$@"; do WROTE[${path#"$OUT"/}]=1; done; }
placeholder() { dry && echo "dry run placeholder" >"$1"; }

archive_logs() {
  wrote "$ARCHIVE.tmp" "$ARCHIVE"
  tar -czf "$ARCHIVE.tmp" -C "$WORK" logs && mv "$ARCHIVE.tmp" "$ARCHIVE"
}

# run_step LIMIT_S COMMAND...: runs the command into running.log under a timeout of LIMIT_S
# or what is left of the budget, whichever is less; returns its status (124: timed out).
run_step() {
  local cap=$1 left limit
  shift
  left=$(remaining_s)
  limit=$(( cap < left ? cap : left ))
  echo "\$ $* (limit ${limit} s)" >>"$RUNNING_LOG"
  if (( limit <= 0 )); then
    echo "no time left in the budget" >>"$RUNNING_LOG"
    return 124
  fi
  if dry; then
    echo "dry run: not run" >>"$RUNNING_LOG"
    [[ "$DRY_RUN_CUT" == "$CURRENT_STEP" ]] && kill -KILL $$
    [[ "$DRY_RUN_FAIL" == *" $CURRENT_STEP "* ]] && return 1
    return 0
  fi
  timeout --kill-after=10 "$limit" "$@" >>"$RUNNING_LOG" 2>&1
}

# begin_step STAGE:STEP, then end_step STATUS DETAIL: a summary line with the time taken;
# the step's log goes into the archive.
begin_step() {
  CURRENT_STEP=$1
  STEP_START_S=$SECONDS
  wrote "$RUNNING_LOG"
  : >"$RUNNING_LOG"
  echo "-- $CURRENT_STEP"
}
end_step() {
  local status=$1 detail=$2 verdict
  case "$status" in
    0) verdict=PASS ;;
    124|137) verdict=TIMEOUT ;;
    *) verdict=FAIL ;;
  esac
  if [[ $verdict != PASS ]] && ! dry; then tail -n 25 "$RUNNING_LOG"; fi
  note "$CURRENT_STEP: $verdict ($(( SECONDS - STEP_START_S )) s) $detail"
  mv "$RUNNING_LOG" "$LOGS/${CURRENT_STEP//:/-}.log"
  archive_logs
  [[ $verdict == PASS ]]
}

# A stage starts when at least its minimum time is left in the budget (quick always starts).
begin_stage() {
  local stage=$1 expected=${STAGE_EXPECTED_S[$1]} minimum=${STAGE_MINIMUM_S[$1]} left
  left=$(remaining_s)
  echo "== $stage: expected about $(( (expected + 30) / 60 )) min ($expected s); $left s of the budget left"
  if [[ $stage != quick ]] && (( left < minimum )); then
    note "$stage: SKIPPED: expected $expected s, needs $minimum s to start, $left s left;" \
      "run it in a call of its own: bash bench/gpu_session.sh --no-quick $stage"
    return 1
  fi
}

# The extension built for the visible GPU's arch: rebuilt only when the build lacks it (or
# does not load, e.g. built against another torch). Once per call.
BUILD_STATE=""
ensure_build() {
  local arch status detail
  if [[ -n "$BUILD_STATE" ]]; then [[ "$BUILD_STATE" == ok ]]; return; fi
  begin_step "$1:build"
  if dry; then
    arch="${GPU_SESSION_DRY_RUN_ARCH:-9.0}"
    has_arch() { tool build-has-arch "$arch" --archs "${GPU_SESSION_DRY_RUN_BUILT_ARCHS:-8.0}"; }
  else
    nvidia-smi >"$LOGS/nvidia-smi.txt" 2>&1
    arch="$(tool visible-arch 2>>"$RUNNING_LOG")"
    has_arch() { tool build-has-arch "$arch"; }
  fi
  if [[ -z "$arch" ]]; then
    BUILD_STATE=failed
    end_step 1 "torch sees no GPU (no arch to build for)"
    return 1
  fi
  if detail="$(has_arch 2>>"$RUNNING_LOG")"; then
    status=0
    detail="kept: $detail"
  else
    echo "$detail: building for $arch" >>"$RUNNING_LOG"
    detail="before: $detail"
    run_step 420 env MAX_JOBS="$(nproc)" ICD_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" \
      "$PY" setup.py build_ext --inplace --force
    status=$?
    if (( status == 0 )) && ! dry; then
      detail="$(has_arch 2>>"$RUNNING_LOG")"
      status=$?
      # Registers, spills and shared memory per kernel: the table into the log, one line here.
      detail="$detail; $(tool ptxas-report "$RUNNING_LOG" 2>>"$RUNNING_LOG")"
    fi
    detail="built for $arch ($detail)"
  fi
  dry || "$PY" -c "import icd_fast, json; print(json.dumps(icd_fast.build_info()))" \
    >"$LOGS/build_info.json" 2>&1
  if end_step "$status" "$detail"; then BUILD_STATE=ok; else BUILD_STATE=failed; return 1; fi
}

# Ends the current step with the exit status of its command and the verdict a tool reads from
# its report (a failed verdict fails a step whose command exited 0).
end_step_with_verdict() {
  local status=$1 verdict=$2 report=$3 detail
  if dry; then
    detail="dry run"
  elif ! detail="$(tool "$verdict" "$report")" && (( status == 0 )); then
    status=1
  fi
  end_step "$status" "$detail"
}

# pytest on the GPU with its JUnit report: the verdict counts passed, failed and skipped
# tests (a skip fails it: every CUDA test must run there).
run_tests() {
  local step=$1 cap=$2 root=$3 report="$LOGS/${1//:/-}.xml"
  shift 3
  begin_step "$step"
  # -v: the log names each test as it ends, so a run cut short still shows how far it got;
  # a test hanging for 2 minutes gets its traceback dumped.
  run_step "$cap" env -C "$root" PYTHONPATH="$root" "$PY" -m pytest -v --tb=short \
    -p no:cacheprovider -o faulthandler_timeout=120 --junitxml="$report" "$@"
  end_step_with_verdict $? junit-verdict "$report"
}

stage_quick() {
  if ! ensure_build quick; then
    note "quick:tests: SKIPPED (no build)"
    note "quick:bench: SKIPPED (no build)"
    return 1
  fi
  run_tests quick:tests 240 "$PWD" tests/ops/test_cuda.py tests/ops/test_blockwise_cuda.py
  begin_step quick:bench
  wrote "$OUT/quick-bench.json"
  run_step 240 "$PY" bench/bench_gpu_quick.py --out "$OUT/quick-bench.json"
  local status=$?
  placeholder "$OUT/quick-bench.json"
  if [[ -s "$OUT/quick-bench.json" ]]; then
    end_step "$status" "quick-bench.json (rewritten after each config: partial if cut short)"
  else
    end_step "$status" "no quick-bench.json"
  fi
  if [[ -s "$OUT/quick-bench.json" ]] && ! dry; then
    tool bench-lines "$OUT/quick-bench.json" | sed 's/^/  /' | tee -a "$SUMMARY"
  fi
}

stage_sanitize() {
  ensure_build sanitize || { note "sanitize: SKIPPED (no build)"; return 1; }
  local sanitizer tool_name
  sanitizer="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
  if ! dry && [[ ! -x "$sanitizer" ]]; then
    note "sanitize: FAIL (0 s) compute-sanitizer is neither on PATH nor at $sanitizer"
    return 1
  fi
  for tool_name in "${SANITIZER_TOOLS[@]}"; do
    begin_step "sanitize:$tool_name"
    # API errors off: torch's own probing calls (cuGetProcAddress and the like) fail by
    # design and would count; an error of ours raises in the workload, which then never
    # prints its last line, and the verdict fails.
    run_step 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$sanitizer" --tool "$tool_name" \
      --report-api-errors no --error-exitcode 3 "$PY" bench/sanitize_workload.py
    end_step_with_verdict $? sanitizer-verdict "$RUNNING_LOG"
  done
}

stage_bench_full() {
  ensure_build bench-full || { note "bench-full: SKIPPED (no build)"; return 1; }
  local dtype status
  for dtype in "${BENCH_FULL_DTYPES[@]}"; do
    begin_step "bench-full:$dtype"
    wrote "$OUT/bench-full-$dtype.json"
    run_step 150 "$PY" bench/bench_icd_loss.py --device cuda --dtype "$dtype" \
      --impls eager fused roofline --sizes 64 256 1024 4096 16384 65536 --dims 128 512 \
      --max-reference-n 16384 --reference-memory-gb 40 --module-sizes 64 1024 \
      --out "$WORK/bench-full-$dtype.json"
    status=$?
    if dry; then
      placeholder "$OUT/bench-full-$dtype.json"
    elif (( status == 0 )); then
      cp "$WORK/bench-full-$dtype.json" "$OUT/"
      cp "$WORK/bench-full-$dtype.png" "$LOGS/" 2>/dev/null
      "$PY" bench/bench_icd_loss.py --table "$OUT/bench-full-$dtype.json" >>"$RUNNING_LOG" 2>&1
    fi
    if [[ -s "$OUT/bench-full-$dtype.json" ]]; then
      end_step "$status" "bench-full-$dtype.json (its table is in the log)"
    else
      end_step "$status" "no bench-full-$dtype.json (the benchmark writes it at its end)"
    fi
  done
}

stage_no_tensor_core_build() {
  # A scratch copy of the tree as it is here (the device's copy may have no .git).
  local scratch="$WORK/no-tensor-core-tree" out_in_tree status
  out_in_tree="$(realpath --relative-to=. "$OUT")"
  begin_step no-tensor-core-build:build
  mkdir -p "$scratch"
  dry || tar -cf - --exclude=./.git --exclude=./build --exclude='*.so' --exclude=__pycache__ \
    --exclude="./$out_in_tree" . | tar -xf - -C "$scratch"
  run_step 420 env -C "$scratch" MAX_JOBS="$(nproc)" ICD_FAST_BUILD_CUDA=1 \
    TORCH_CUDA_ARCH_LIST="7.5+PTX" "$PY" setup.py build_ext --inplace --force
  status=$?
  if ! end_step "$status" "TORCH_CUDA_ARCH_LIST=7.5+PTX in a scratch copy"; then
    note "no-tensor-core-build:tests: SKIPPED (no build)"
    return 1
  fi
  run_tests no-tensor-core-build:tests 180 "$scratch" tests/ops/test_cuda.py \
    -k "half or tf32 or compiled_arch"
}

{
  echo "gpu_session $(date -u +%FT%TZ): stages ${stages[*]}; budget $BUDGET_S s"
  if dry; then
    echo "dry run: no GPU used, commands not run"
  else
    echo "device: $(nvidia-smi --query-gpu=name,compute_cap,driver_version --format=csv,noheader 2>&1 | head -1)"
    echo "python: $PY; torch $("$PY" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -1)"
  fi
} | tee "$SUMMARY"
wrote "$SUMMARY"

failed=0
for stage in "${stages[@]}"; do
  begin_stage "$stage" || continue
  "stage_${stage//-/_}" || failed=1
done
# A failure inside a stage shows in its step lines; the status counts them all.
grep -qE ': (FAIL|TIMEOUT) ' "$SUMMARY" && failed=1

archive_logs
echo "time used: $(( SECONDS - START_S )) s of the $BUDGET_S s budget" | tee -a "$SUMMARY"
tool check-returned "$OUT" --written "${!WROTE[@]}" >>"$SUMMARY" || failed=1
echo "--- summary.txt"
cat "$SUMMARY"
exit "$failed"
