#!/usr/bin/env bash
# Sets up dependencies, builds, and runs every test. GPU tests report SKIPPED where no CUDA device
# exists; on a Hopper machine they run for real (`ctest -L gpu` runs only them).
# The CMake build also builds the Python extension into <build>/python (ctest's python_tests use
# it); afterwards the wheel is built from the same library (FP4MOE_PREBUILT_LIBRARY, no second CUDA
# compile), installed into a throwaway virtual environment and its CPU tests run against it.
# FP4MOE_SKIP_WHEEL=1 skips that last step.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
(cd "$build" && ctest --output-on-failure -j "${JOBS:-$(nproc)}" "$@")

if [ "${FP4MOE_SKIP_WHEEL:-0}" != "1" ]; then
  PY=${PYTHON:-python3}
  venv="$build/wheel-venv"
  rm -rf "$venv" "$build/wheel-dist"
  FP4MOE_PREBUILT_LIBRARY="$build/libfp4moe.a" CMAKE_BUILD_PARALLEL_LEVEL="${JOBS:-$(nproc)}" \
    $PY -m pip wheel "$root" --no-build-isolation --no-deps -q -w "$build/wheel-dist"
  $PY -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --no-deps "$build"/wheel-dist/fp4moe-*.whl
  # Run from outside the tree with FP4MOE_BUILD_DIR unset, so the installed package is the one tested.
  (cd "$venv" && env -u FP4MOE_BUILD_DIR FP4MOE_REQUIRE_PACKAGE=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
     "$root/tests/python/test_package_cpu.py" "$root/tests/python/test_torch_cpu.py" \
     "$root/tests/python/test_transformers.py")
fi
