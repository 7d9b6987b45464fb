#!/usr/bin/env bash
# The measurements behind BENCHMARKS.md, in one run on a Hopper machine, from an existing build
# (scripts/build.sh), everything written under the out dir:
#   torch.csv/.log          PyTorch bf16 torch._grouped_mm baseline, T = 1..64 and 128..16384 (one run)
#   bench.txt, fp4moe.csv   the decode table (uniform routing, T = 1..64) beside it
#   bench_{balanced,skewed,precomputed,mxfp4,w4a4}.txt   spot rows of the decode table
#   prepack.txt             host and GPU prepack rates of one layer
#   timeline.txt            per-phase timeline of one decode call
#   prefill.txt/.csv        the prefill table (T = 128..16384, roofline columns, torch beside it)
#   batch_invariant.txt/.csv  batch_invariant mode at a few T (its cost: against the rows above)
#   crossover.txt/.csv      both tactics at T = 16..256 per preset, the winner and the planner's choice
#   plan.txt                `fp4moe plan` for the same presets and T on this card
#   steps.txt, summary.txt  seconds per step; the short summary printed last
# Usage: bench/device_suite.sh [build-dir] [out-dir]. Budget: about 5 minutes on an H200; a step that
# runs past STEP_TIMEOUT seconds (default 300) is stopped and recorded as failed (exit 124).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${1:-$root/build}
out=${2:-${OUT:-$build/bench-out}}
mkdir -p "$out"
presets=qwen3-30b-a3b,gpt-oss-120b,qwen3-235b-a22b,deepseek-v3
decode_tokens=1,2,4,8,16,32,64
prefill_tokens=128,256,512,1024,2048,4096,8192,16384
bi_presets=qwen3-30b-a3b,deepseek-v3
bi_tokens=1,64,128,1024,4096
fp4moe=$build/fp4moe
step_timeout=${STEP_TIMEOUT:-300}
: > "$out/steps.txt"
: > "$out/bench.err"
suite_t0=$(date +%s)
failed=0
# step NAME CMD...: runs CMD, records its seconds and status in steps.txt, never stops the suite.
step() {
  local name=$1 t0 rc
  shift
  t0=$(date +%s)
  echo "== $name" >&2
  "$@"
  rc=$?
  printf '%-22s %5d s  exit %d\n' "$name" $(($(date +%s) - t0)) "$rc" >> "$out/steps.txt"
  [ "$rc" = 0 ] || { echo "step $name failed (exit $rc): see $out" >&2; failed=1; }
  return 0
}

nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | tee "$out/card.txt"
plan_to() { timeout "$step_timeout" "$fp4moe" plan "$@" > "$out/plan.txt" 2>&1; }
step plan plan_to --preset "$presets" --tokens "$decode_tokens,65,$prefill_tokens"

# The baseline once for every T (one weight setup per preset), then each fp4moe table beside it.
step torch timeout "$step_timeout" env PYTHONUNBUFFERED=1 python3 "$root/bench/torch_grouped_mm.py" --preset "$presets" \
  --tokens "$decode_tokens,$prefill_tokens" --csv "$out/torch.csv" > "$out/torch.log" 2>&1
[ -s "$out/torch.csv" ] || echo "torch baseline failed: see torch.log" >&2
torch_csv=()
[ -s "$out/torch.csv" ] && torch_csv=(--torch-csv "$out/torch.csv")

# bench_to FILE ARGS...: one `fp4moe bench` run, the table to FILE (and the terminal), stderr to bench.err.
bench_to() {
  local file=$1
  shift
  timeout "$step_timeout" "$fp4moe" bench "$@" 2>>"$out/bench.err" | tee "$out/$file"
}
timeline_to() {
  local file=$1
  shift
  timeout "$step_timeout" "$fp4moe" bench "$@" --timeline 2>&1 >/dev/null | grep timeline | tee "$out/$file"
}

step decode bench_to bench.txt --preset "$presets" --tokens "$decode_tokens" "${torch_csv[@]}" --csv "$out/fp4moe.csv"
for r in balanced skewed; do
  step "decode_$r" bench_to "bench_$r.txt" --preset "$presets" --tokens 1,8,64 --routing "$r"
done
step decode_precomputed bench_to bench_precomputed.txt --preset "$presets" --tokens 1,8,64 --precomputed
step decode_mxfp4 bench_to bench_mxfp4.txt --preset gpt-oss-120b --format mxfp4 --tokens 1,8,64
step decode_w4a4 bench_to bench_w4a4.txt --preset "$presets" --input-mode w4a4 --tokens 1,8,64
step timeline timeline_to timeline.txt --preset "$presets" --tokens 1,64 --reps 20

step prefill bench_to prefill.txt --preset "$presets" --tokens "$prefill_tokens" --reps 50 "${torch_csv[@]}" \
  --csv "$out/prefill.csv"
step batch_invariant bench_to batch_invariant.txt --preset "$bi_presets" --tokens "$bi_tokens" --reps 50 \
  --batch-invariant --csv "$out/batch_invariant.csv"
step crossover bench_to crossover.txt --preset "$presets" --crossover --reps 50 --csv "$out/crossover.csv"

prepack_to() { timeout "$step_timeout" "$fp4moe" prepack "$@" 2>&1 | tee "$out/prepack.txt"; }
step prepack prepack_to --preset deepseek-v3,qwen3-235b-a22b

printf '%-22s %5d s\n' total $(($(date +%s) - suite_t0)) >> "$out/steps.txt"
python3 "$root/bench/suite_summary.py" "$out" | tee "$out/summary.txt"
exit "$failed"  # 1 when a step failed (steps.txt names it)
