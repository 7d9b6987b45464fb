#!/usr/bin/env bash
# Installs every build and test dependency of fp4moe from Debian packages and PyPI.
# Idempotent: safe to run again. The CUDA toolkit (nvcc) is expected to be installed already.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != "0" ] && command -v sudo >/dev/null; then SUDO=sudo; fi
need_apt=()
for pkg in cmake g++ ninja-build libgtest-dev libcli11-dev nlohmann-json3-dev python3-pip \
    clang libclang-rt-14-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ] && command -v apt-get >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}"
fi
PY=${PYTHON:-python3}
$PY -m pip install -q -r "$(dirname "$0")/../requirements-dev.txt"
