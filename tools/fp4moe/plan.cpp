// `fp4moe plan`: the planner's choices for presets and token counts as a fixed-width table, on any
// machine. The planner is a pure function of the problem and a device description; this command
// only picks the description: --device, else the current GPU, else the h200 preset.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdio>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "commands.h"
#include "fp4moe/moe.h"
#include "fp4moe/plan.h"
#include "fp4moe/presets.h"
#include "numbers.h"
#include "problem_flags.h"

namespace fp4moe::cli {
namespace {

struct PlanOptions {
  std::string presets;
  std::string tokens = "1,8,64,65,1024,4096,16384";
  std::string device;  // empty: the current GPU, else h200
  ProblemFlags flags;
};

std::vector<std::string> split_names(const std::string& s) {
  std::vector<std::string> out;
  size_t pos = 0;
  while (pos <= s.size()) {
    const size_t comma = std::min(s.find(',', pos), s.size());
    if (comma > pos) out.push_back(s.substr(pos, comma - pos));
    pos = comma + 1;
  }
  return out;
}

// The device description and a sentence saying where it came from.
std::pair<DeviceDesc, std::string> pick_device(const std::string& flag) {
  if (!flag.empty()) return {DeviceDesc::named(flag), "preset '" + flag + "' (--device)"};
  int n = 0;
  const cudaError_t err = cudaGetDeviceCount(&n);
  if (err == cudaSuccess && n > 0) {
    int dev = 0;
    cudaGetDevice(&dev);
    return {DeviceDesc::current(), "the current device (" + std::to_string(dev) +
                                       "); bandwidth and bf16 rate are the preset's estimates"};
  }
  cudaGetLastError();
  return {DeviceDesc::h200(), std::string("preset 'h200': no CUDA device here (") + cudaGetErrorString(err) +
                                  "); --device h100|h200 chooses"};
}

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

void print_plans(const PlanOptions& o) {
  const std::vector<std::string> names = split_names(o.presets);
  FP4MOE_CHECK(!names.empty(), "--preset is empty: give one or more presets (see `fp4moe presets`)");
  const std::vector<int64_t> tokens = parse_integer_list<int64_t>(o.tokens, "--tokens", 0, int64_t(1) << 40);
  // Every problem is built (and validated) before anything prints.
  std::vector<std::pair<std::string, MoeProblem>> problems;
  for (const std::string& n : names)
    for (const int64_t T : tokens) problems.emplace_back(n, preset_problem(n, T, o.flags));
  const auto [dev, where] = pick_device(o.device);

  std::printf("# device: %s, from %s\n", dev.to_string().c_str(), where.c_str());
  std::printf("# problem flags: format %s, input %s%s%s%s\n",
              o.flags.format.empty() ? "the preset's" : o.flags.format.c_str(), o.flags.input_mode.c_str(),
              o.flags.routing.empty() ? "" : (", routing " + o.flags.routing).c_str(),
              o.flags.experts_local.empty() ? "" : (", experts " + o.flags.experts_local).c_str(),
              o.flags.batch_invariant ? ", batch_invariant" : "");
  std::printf("%-16s %6s %-7s %-9s %6s %-9s %7s %6s %7s %13s %9s %10s %9s %9s %9s %4s\n", "preset", "T", "tactic",
              "tile", "stages", "grid", "chunk", "passes", "smem_KB", "workspace_B", "est_MB", "GFLOP", "bytes_us",
              "flops_us", "floor_us", "why");
  std::map<std::string, int> reasons;  // reason -> footnote number
  std::vector<std::string> order;
  for (const auto& [name, p] : problems) {
    const Plan plan = make_plan(p, dev);
    auto [it, fresh] = reasons.try_emplace(plan.reason, int(reasons.size()) + 1);
    if (fresh) order.push_back(plan.reason);
    std::string tile, stages = "-", grid, chunk, passes;
    size_t smem = 0;
    if (plan.tactic == Tactic::decode) {
      const DecodeTactic& t = plan.decode;
      tile = "k" + std::to_string(t.team_warps1) + "/" + std::to_string(t.team_warps2);
      grid = std::to_string(t.blocks) + "x" + std::to_string(t.threads);
      chunk = std::to_string(kTokenChunk);
      passes = std::to_string(t.chunks);
      smem = t.smem_bytes;
    } else {
      const PrefillTactic& t = plan.prefill;
      tile = std::to_string(t.block_m) + "x" + std::to_string(t.block_n);
      stages = std::to_string(t.stages);
      grid = std::to_string(t.blocks) + "x" + std::to_string(t.threads);
      chunk = std::to_string(t.token_chunk);
      passes = std::to_string(t.passes);
      smem = t.smem_bytes;
    }
    const std::string tactic(to_string(plan.tactic));
    std::printf("%-16s %6lld %-7s %-9s %6s %-9s %7s %6s %7s %13zu %9s %10s %9s %9s %9s %4s\n", name.c_str(),
                (long long)p.tokens, tactic.c_str(), tile.c_str(), stages.c_str(), grid.c_str(), chunk.c_str(),
                passes.c_str(), fmt("%.1f", smem / 1024.0).c_str(), workspace_size(p),
                fmt("%.1f", plan.weight_bytes / 1e6).c_str(), fmt("%.1f", plan.flops / 1e9).c_str(),
                fmt("%.1f", plan.byte_floor_us).c_str(), fmt("%.1f", plan.compute_floor_us).c_str(),
                fmt("%.1f", std::max(plan.byte_floor_us, plan.compute_floor_us)).c_str(),
                ("[" + std::to_string(it->second) + "]").c_str());
  }
  std::printf("\n");
  for (size_t i = 0; i < order.size(); ++i) std::printf("[%zu] %s\n", i + 1, order[i].c_str());
  std::printf(
      "\ntile: prefill weight rows x the widest token tile (each tile runs at the narrowest wgmma width that holds\n"
      "its rows); decode kA/B = warps splitting K in GEMM1 / GEMM2.\n"
      "grid: blocks x threads. chunk: tokens per launch (decode) or per pass (prefill). workspace_B: workspace_size().\n"
      "est_MB, GFLOP: weights touched and routed FLOPs under uniform routing; bytes_us, flops_us: those over the\n"
      "description's bandwidth and bf16 rate; floor_us: their max. Estimates, not measurements (fp4moe bench).\n");
}

}  // namespace

void add_plan_command(CLI::App& app) {
  auto o = std::make_shared<PlanOptions>();
  auto* cmd = app.add_subcommand("plan", "Print the planner's choice (tactic, tiles, grid, workspace) per preset and T");
  cmd->add_option("--preset", o->presets, "Comma-separated presets (see `fp4moe presets`)")->required();
  cmd->add_option("--tokens,-T", o->tokens, "Comma-separated token counts")->capture_default_str();
  cmd->add_option("--device", o->device,
                  "Device description: h100 or h200 (default: the current GPU, else the h200 preset)");
  cmd->add_flag("--batch-invariant", o->flags.batch_invariant,
                "One summation order for every T (the problem's batch_invariant setting)");
  cmd->add_option("--routing", o->flags.routing, "Routing method instead of the preset's");
  cmd->add_option("--format", o->flags.format, "Weight format instead of the preset's: nvfp4, mxfp4");
  cmd->add_option("--input-mode", o->flags.input_mode, "Activation input: w4a16 (default) or w4a4");
  cmd->add_option("--experts-local", o->flags.experts_local, "Expert parallelism: this rank holds experts OFFSET:COUNT");
  cmd->callback([o] { print_plans(*o); });
}

}  // namespace fp4moe::cli
