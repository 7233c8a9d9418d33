#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in stages that each fit one 10-minute call:
#
#   bash bench/gpu_session.sh test       build, CUDA tests, gradcheck/opcheck/compile
#   bash bench/gpu_session.sh sanitize   compute-sanitizer memcheck and racecheck
#   bash bench/gpu_session.sh bench [float32|bfloat16]
#                                        fused / eager / compile / roofline, one dtype
#   bash bench/gpu_session.sh autotune   torch.compile max-autotune at a few sizes
#   bash bench/gpu_session.sh no-tensor-core-build
#                                        a TORCH_CUDA_ARCH_LIST="7.5+PTX" build (no 8.x/9.x
#                                        code) in a scratch copy: fp16/bf16 must run on the
#                                        CUDA cores, not reach the tensor-core trap
#
# Logs and results go to $OUT (default ./gpu-out): name them with the device, driver,
# torch version and date, then commit them under bench/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./gpu-out}"
mkdir -p "$OUT"
# The lent machines' Python with PyTorch is python3 (no plain `python` there).
PY="${PYTHON:-$(command -v python3 || command -v python)}"
STAMP="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1 | tr ' ,' '_' | tr -s _)-torch$($PY -c 'import torch; print(torch.__version__)')-$(date -u +%F)"

build() {
  if ! $PY -c "import icd_fast, sys; sys.exit(not icd_fast.build_info()['cuda_kernel'])" 2>/dev/null; then
    MAX_JOBS=16 ICD_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="9.0" \
      $PY -m pip install -q --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1 \
      || { tail -40 "$OUT/build.log"; exit 1; }
  fi
  $PY -c "import icd_fast, json; print(json.dumps(icd_fast.build_info()))" | tee "$OUT/build_info.json"
}

case "${1:-test}" in
  test)
    build
    nvidia-smi >"$OUT/nvidia-smi.txt"
    $PY -m pytest -q tests/test_cuda.py tests/test_cpu_kernel.py -x 2>&1 | tee "$OUT/test_cuda-$STAMP.log" | tail -15
    ;;
  sanitize)
    build
    for tool in memcheck racecheck; do
      compute-sanitizer --tool "$tool" --error-exitcode 3 $PY bench/sanitize_workload.py \
        2>&1 | tee "$OUT/sanitizer-$tool-$STAMP.log" | tail -5
    done
    ;;
  bench)
    build
    dtype="${2:-float32}"
    $PY bench/bench_icd_loss.py --device cuda --dtype "$dtype" \
      --impls eager fused compile roofline --sizes 64 256 1024 4096 16384 65536 262144 \
      --max-reference-n 16384 --reference-memory-gb 40 --out "$OUT/cuda-$dtype-$STAMP.json"
    $PY bench/bench_icd_loss.py --table "$OUT/cuda-$dtype-$STAMP.json"
    ;;
  autotune)
    build
    $PY bench/bench_icd_loss.py --device cuda --impls eager fused autotune --sizes 64 16384 \
      --dims 128 --out "$OUT/cuda-float32-autotune-$STAMP.json"
    $PY bench/bench_icd_loss.py --table "$OUT/cuda-float32-autotune-$STAMP.json"
    ;;
  no-tensor-core-build)
    scratch="$(mktemp -d)"
    git ls-files -z | xargs -0 cp --parents -t "$scratch"
    (cd "$scratch" && MAX_JOBS=16 ICD_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST="7.5+PTX" \
      $PY setup.py -q build_ext --inplace >"$OUT/build-7.5+PTX.log" 2>&1) \
      || { tail -40 "$OUT/build-7.5+PTX.log"; exit 1; }
    (cd "$scratch" && PYTHONPATH=. $PY -m pytest -q tests/test_cuda.py -x \
      -k "half or tf32 or compiled_arch" 2>&1) | tee "$OUT/test_cuda-7.5+PTX-$STAMP.log" | tail -15
    rm -rf "$scratch"
    ;;
  *) echo "unknown stage $1 (test, sanitize, bench, autotune, no-tensor-core-build)"; exit 2 ;;
esac
