#!/usr/bin/env bash
# The measurements behind BENCHMARKS.md, in one run on a Hopper machine, from an existing build
# (scripts/build.sh): the PyTorch bf16 baseline, the fp4moe table beside it (uniform routing, T = 1..64),
# spot rows for balanced / skewed routing and the precomputed top-k entry point, the per-phase
# timeline, and the Python call overhead. Usage: bench/device_suite.sh [build-dir] [out-dir]
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
out=${2:-${OUT:-$build/bench-out}}
mkdir -p "$out"
presets=qwen3-30b-a3b,gpt-oss-120b,qwen3-235b-a22b,deepseek-v3
tokens=1,2,4,8,16,32,64
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv | tee "$out/card.txt"
PYTHONUNBUFFERED=1 python3 "$root/bench/torch_grouped_mm.py" --preset "$presets" --tokens "$tokens" \
  --csv "$out/torch.csv" > "$out/torch.log" 2>&1 || echo "torch baseline failed: see torch.log"
"$build/fp4moe" bench --preset "$presets" --tokens "$tokens" --torch-csv "$out/torch.csv" \
  --csv "$out/fp4moe.csv" 2> "$out/bench.err" | tee "$out/bench.txt"
for r in balanced skewed; do
  "$build/fp4moe" bench --preset "$presets" --tokens 1,8,64 --routing $r 2>>"$out/bench.err" | tee "$out/bench_$r.txt"
done
"$build/fp4moe" bench --preset "$presets" --tokens 1,8,64 --precomputed 2>>"$out/bench.err" | tee "$out/bench_precomputed.txt"
"$build/fp4moe" bench --preset gpt-oss-120b --format mxfp4 --tokens 1,8,64 2>>"$out/bench.err" | tee "$out/bench_mxfp4.txt"
"$build/fp4moe" bench --preset "$presets" --tokens 1,64 --reps 20 --timeline 2>&1 >/dev/null | grep timeline | tee "$out/timeline.txt"
