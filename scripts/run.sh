#!/usr/bin/env bash
# The main job. On a Hopper GPU: the benchmark of the decode path (BENCH.md rules) for the headline
# presets. Without one: the CPU reference on a small preset, checked against an independent loop.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
"$root/scripts/setup.sh"
"$root/scripts/build.sh"
bin="${BUILD_DIR:-$root/build}/fp4moe"
if "$bin" device >/dev/null 2>&1; then
  "$bin" bench --preset qwen3-30b-a3b,gpt-oss-120b,qwen3-235b-a22b,deepseek-v3 --tokens 1,2,4,8,16,32,64 "$@"
else
  echo "no Hopper GPU here: running the CPU reference on a small preset"
  "$bin" check --preset qwen3-30b-a3b --tokens 4 "$@"
fi
