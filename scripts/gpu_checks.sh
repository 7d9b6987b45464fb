#!/usr/bin/env bash
# GPU checks on a Hopper machine, from an existing build (scripts/build.sh): the GPU tests, the
# compute-sanitizer memcheck / racecheck runs on small cases, and the Python GPU tests.
# Usage: scripts/gpu_checks.sh [build-dir]; logs go to $LOG_DIR (default: the build dir).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-${BUILD_DIR:-$root/build}}
logs=${LOG_DIR:-$build}
export PATH=$PATH:/usr/local/cuda/bin
status=0
step() { echo "== $1"; shift; "$@" || { echo "FAILED: $*"; status=1; }; }

step "GPU tests (ctest -L gpu equivalent)" "$build/fp4moe_gpu_tests" --gtest_brief=1
small='Cases/DecodeVsReference.MatchesReference/nvfp4_swiglu_T17:Cases/DecodeVsReference.MatchesReference/mxfp4_oai_bias_topk_softmax:Cases/DecodeVsReference.MatchesReference/nvfp4_w4a4:Decode.OutOfRangeDeviceIdsAreIgnored'
step "compute-sanitizer memcheck" compute-sanitizer --tool memcheck --error-exitcode 3 \
  "$build/fp4moe_gpu_tests" --gtest_filter="$small" --gtest_brief=1
step "compute-sanitizer racecheck" compute-sanitizer --tool racecheck --error-exitcode 3 \
  "$build/fp4moe_gpu_tests" --gtest_filter='Cases/DecodeVsReference.MatchesReference/nvfp4_swiglu_T17' --gtest_brief=1
prefill_small='Cases/PrefillVsReference.MatchesReference/nvfp4_swiglu_T65:Cases/PrefillVsReference.MatchesReference/mxfp4_oai_bias_T65:Cases/PrefillVsReference.MatchesReference/nvfp4_w4a4_T300:Prefill.OutOfRangeDeviceIdsAreIgnored'
step "compute-sanitizer memcheck (prefill)" compute-sanitizer --tool memcheck --error-exitcode 3 \
  "$build/fp4moe_gpu_tests" --gtest_filter="$prefill_small" --gtest_brief=1
step "compute-sanitizer racecheck (prefill)" compute-sanitizer --tool racecheck --error-exitcode 3 \
  "$build/fp4moe_gpu_tests" --gtest_filter='Cases/PrefillVsReference.MatchesReference/nvfp4_swiglu_T65' --gtest_brief=1
step "compute-sanitizer synccheck" compute-sanitizer --tool synccheck --error-exitcode 3 \
  "$build/fp4moe_gpu_tests" --gtest_filter='Cases/DecodeVsReference.MatchesReference/nvfp4_swiglu_T17' --gtest_brief=1

# The Python extension is built here against the existing static library (no second CUDA compile).
if python3 -c "import torch, nanobind" 2>/dev/null; then
  pybuild=$build/python-gpu
  step "configure the Python extension" cmake -S "$root" -B "$pybuild" -DCMAKE_BUILD_TYPE=Release \
    -DFP4MOE_PREBUILT_LIBRARY="$build/libfp4moe.a" -DFP4MOE_BUILD_TESTS=OFF -DFP4MOE_BUILD_CLI=OFF \
    -DFP4MOE_BUILD_FUZZERS=OFF -DFP4MOE_BUILD_PYTHON=ON -DPython_EXECUTABLE="$(command -v python3)" >"$logs/python_cmake.log" 2>&1
  step "build the Python extension" cmake --build "$pybuild" -j >"$logs/python_build.log" 2>&1
  step "Python GPU tests" env PYTHONPATH="$pybuild/python" FP4MOE_BUILD_DIR="$pybuild" \
    python3 -m pytest -q -rs "$root/tests/python/test_package_gpu.py" "$root/tests/python/test_torch_cpu.py" \
    "$root/tests/python/test_transformers.py" "$root/tests/python/test_prepack_device_gpu.py"
else
  echo "== Python GPU tests SKIPPED: torch or nanobind not importable"
fi
exit $status
