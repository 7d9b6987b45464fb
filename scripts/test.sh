#!/usr/bin/env bash
# Sets up dependencies, builds, and runs every test. GPU tests report SKIPPED where no CUDA device
# exists; on a Hopper machine they run for real (`ctest -L gpu` runs only them).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
cd "${BUILD_DIR:-$root/build}"
ctest --output-on-failure -j "${JOBS:-$(nproc)}" "$@"
