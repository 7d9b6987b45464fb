// The planner (include/fp4moe/plan.h): tactic, tile shapes, stages and grid from the problem and a
// description of the device. Pure: no CUDA call happens here except in DeviceDesc::current().
#include "fp4moe/plan.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>
#include <utility>

#include "common/cuda_check.h"
#include "fp4moe/error.h"
#include "fp4moe/layout.h"
#include "kernels/decode/params.h"
#include "kernels/prefill/params.h"

namespace fp4moe {

std::string_view to_string(Tactic t) { return t == Tactic::decode ? "decode" : "prefill"; }

// ---- device descriptions --------------------------------------------------------------------------
DeviceDesc DeviceDesc::h100() {
  DeviceDesc d;
  d.name = "NVIDIA H100 80GB HBM3";
  d.sms = 132;
  d.cc_major = 9;
  d.smem_per_block = 232448;
  d.smem_per_sm = 233472;
  d.l2_bytes = 52428800;
  d.hbm_bytes_per_s = 3.0e12;  // read kernel, 1-6 GB (BENCH.md, H100 figures)
  d.bf16_flops = 7.6e14;       // lead only: not measured on that card in the same run
  return d;
}

DeviceDesc DeviceDesc::h200() {
  DeviceDesc d = h100();
  d.name = "NVIDIA H200";
  d.l2_bytes = 62914560;
  d.hbm_bytes_per_s = 4.3e12;  // device-to-device copy, read + write (BENCH.md, H200)
  d.bf16_flops = 7.8e14;       // bf16 8192^3 GEMM through PyTorch, 769-798 TFLOP/s (BENCH.md)
  return d;
}

DeviceDesc DeviceDesc::named(const std::string& name) {
  std::string n;
  for (char c : name) n += char(std::tolower(static_cast<unsigned char>(c)));
  if (n == "h100") return h100();
  if (n == "h200") return h200();
  FP4MOE_FAIL("unknown device '" << name << "': expected h100 or h200");
}

DeviceDesc DeviceDesc::current() {
  static std::mutex mu;
  static std::map<int, DeviceDesc> cache;
  int dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  cudaDeviceProp prop;
  FP4MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, dev));
  DeviceDesc d = std::string(prop.name).find("H200") != std::string::npos ? h200() : h100();
  d.name = prop.name;
  d.sms = prop.multiProcessorCount;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  d.smem_per_block = prop.sharedMemPerBlockOptin;
  d.smem_per_sm = prop.sharedMemPerMultiprocessor;
  d.l2_bytes = prop.l2CacheSize;
  cache[dev] = d;
  return d;
}

std::string DeviceDesc::to_string() const {
  ::fp4moe::detail::Message o;
  o << name << " (sm_" << cc_major << cc_minor << ", " << sms << " SMs, " << smem_per_block / 1024
    << " KB shared/block, L2 " << l2_bytes / (1024 * 1024) << " MB, ~" << hbm_bytes_per_s / 1e12 << " TB/s, ~"
    << bf16_flops / 1e12 << " bf16 TFLOP/s)";
  return o.str();
}

// ---- the crossover --------------------------------------------------------------------------------
namespace {

// Tokens from which the prefill kernels run instead of the decode kernel, per card. Each entry names
// the measurement that chose it; the first entry whose key is part of the device name applies.
struct CrossoverEntry {
  const char* device_key;
  int64_t prefill_from_tokens;
  const char* source;
};
constexpr CrossoverEntry kCrossover[] = {
    {"H200", 129,
     "measured on an H200, 2026-12-04 (BENCHMARKS.md, crossover): decode 1.07-1.33x faster at T = 96 and 128 "
     "(two launches) on all four headline presets, prefill faster from T = 192; T = 129..191 not measured"},
    {"H100", 65,
     "not measured on an H100: the H200's switch point before the 8-op decode loop (2026-12-02: decode 1.5-2.0x "
     "faster at T <= 64, prefill from T = 96)"},
};

}  // namespace

Crossover crossover(const MoeProblem&, const DeviceDesc& d) {
  for (const CrossoverEntry& e : kCrossover)
    if (d.name.find(e.device_key) != std::string::npos) return {e.prefill_from_tokens, e.source};
  return {kCrossover[0].prefill_from_tokens, "no entry for this card: the first entry's value"};
}

// ---- tactic details -------------------------------------------------------------------------------
namespace {

// Warps that split K of one decode task. The K split fixes the order of the fp32 sums, so it depends
// on the layer's shape only, never on T: a token's output must not depend on the rest of the batch.
// Estimated phase time = rounds of tasks over the teams times (k-tiles per warp + a fixed per-task cost
// of about eight k-tiles: the first loads' latency, the team reduction and the epilogue), taken at
// T = 1 plus a fifth of it at T = 64 (uniform routing), so that a long K range per warp, which
// streams best once there are many tasks, is not given up for the last microsecond at T = 1.
// NOTES: fitted on the H200 (2026-12-04, PERFLOG.md v13): with the 8-op loop the best splits were
// 2/1 (qwen3-30b-a3b, qwen3-235b-a22b, deepseek-v3) and 2/2 (gpt-oss-120b) by the sum of the T = 1, 8
// and 64 ratios; the earlier model (fixed cost 3, T = 1 only) picked 4/4, 8/2 and 2/4 for the first three.
int pick_team(int64_t tasks1, int64_t tasks64, int64_t tiles_per_task, int blocks) {
  int best = 8;
  double best_cost = 1e30;
  for (int tw : {8, 4, 2, 1}) {
    const int64_t teams = int64_t(blocks) * (kernels::kDecodeWarps / tw);
    const double per_task = double(tiles_per_task) / tw + 8.0;
    const double cost = (double(ceil_div(tasks1, teams)) + 0.2 * double(ceil_div(tasks64, teams))) * per_task;
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = tw;
    }
  }
  return best;
}

DecodeTactic plan_decode(const MoeProblem& p, const DeviceDesc& d, const PackedLayout& L) {
  DecodeTactic t;
  t.threads = kernels::kDecodeThreads;
  t.chunks = ceil_div(p.tokens, kTokenChunk);
  // Half of L2 for GEMM2's weights: the rest keeps the activations and the GEMM1 stream.
  t.l2_prefetch_bytes = d.l2_bytes / 2;
  const int slots = int(std::min<int64_t>(std::max<int64_t>(p.tokens, 1), kTokenChunk)) * p.top_k;
  t.smem_bytes = size_t(kernels::SmemLayout::make(p.local_experts(), slots, p.num_experts).total);
  FP4MOE_CHECK(t.smem_bytes <= d.smem_per_block,
               "the decode kernel needs " << t.smem_bytes << " bytes of shared memory per block for this problem, "
                                          << d.name << " allows " << d.smem_per_block << " (too many local experts?)");
  // Blocks per SM: the kernel's launch bounds (2 at 128 registers, every variant), then shared memory
  // (1 KB per block is reserved by the hardware).
  const int by_regs = 2;
  const int by_smem = int(d.smem_per_sm / (t.smem_bytes + 1024));
  t.blocks = std::max(1, std::min(by_regs, by_smem)) * d.sms;
  // Experts a single token touches on this rank: the tasks of each phase at T = 1.
  const int64_t local_k = std::max<int64_t>(1, ceil_div(int64_t(p.top_k) * p.local_experts(), p.num_experts));
  // ... and at T = 64 under uniform routing.
  const double untouched = std::pow(1.0 - double(p.top_k) / double(p.num_experts), double(kTokenChunk));
  const int64_t local_64 = std::max<int64_t>(local_k, int64_t(double(p.local_experts()) * (1.0 - untouched)));
  const int64_t tasks2 = L.m_tiles2 / kernels::kTask2Tiles;
  t.team_warps1 = pick_team(local_k * L.i_blocks, local_64 * L.i_blocks, L.k_tiles13, t.blocks);
  t.team_warps2 = pick_team(local_k * tasks2, local_64 * tasks2, L.k_tiles2, t.blocks);
  return t;
}

}  // namespace

int64_t prefill_token_chunk(const MoeProblem& p) {
  // Workspace per token, then the largest power of two in [1024, 16384] tokens whose workspace stays
  // within 2 GiB (deepseek-v3: 4096 tokens, about 1.5 GB).
  const int64_t per_token = kernels::PrefillWorkspace::make(1024, p.top_k, p.local_experts(), p.hidden,
                                                            p.intermediate, kernels::kPrefillTileBase)
                                .total /
                            1024;
  int64_t c = 16384;
  while (c > 1024 && c * per_token > (int64_t(2) << 30)) c /= 2;
  return c;
}

namespace {

PrefillTactic plan_prefill(const MoeProblem& p, const DeviceDesc& d) {
  PrefillTactic t;
  t.block_m = kernels::kPrefillBlockM;
  t.threads = kernels::kPrefillThreads;
  t.token_chunk = std::min<int64_t>(std::max<int64_t>(p.tokens, 1), prefill_token_chunk(p));
  t.passes = ceil_div(std::max<int64_t>(p.tokens, 1), t.token_chunk);
  // Token tiles of up to kPrefillTileMax rows, each run at the narrowest wgmma width that holds it
  // (params.h): the same for every T, so batch-invariant mode needs no other choice.
  t.block_n = kernels::kPrefillTileMax;
  const size_t stage = kernels::prefill_stage_bytes(t.block_m, t.block_n, p.format);
  const size_t avail = d.smem_per_block - kernels::kPrefillSmemReserve;
  t.stages = int(std::min<size_t>(kernels::kPrefillMaxStages, avail / stage));
  FP4MOE_CHECK(t.stages >= 2, "the prefill kernels need two pipeline stages of " << stage << " bytes; " << d.name
                                                                                 << " allows " << d.smem_per_block);
  t.smem_bytes = size_t(t.stages) * stage + kernels::kPrefillSmemReserve;
  t.blocks = d.sms;
  return t;
}

}  // namespace

namespace {

// The tactic the crossover rule picks, and why.
std::pair<Tactic, std::string> choose_tactic(const MoeProblem& p, const DeviceDesc& d) {
  const Crossover c = crossover(p, d);
  if (p.batch_invariant)
    return {Tactic::prefill, "batch_invariant: one kernel family (prefill) and one tile width for every T"};
  if (p.tokens >= c.prefill_from_tokens)
    return {Tactic::prefill, "T >= " + std::to_string(c.prefill_from_tokens) + " (" + c.source + ")"};
  return {Tactic::decode, "T < " + std::to_string(c.prefill_from_tokens) + " (" + c.source + ")"};
}

Plan build_plan(const MoeProblem& p, const DeviceDesc& d, Tactic tactic, std::string reason) {
  p.validate();
  FP4MOE_CHECK(d.sms > 0 && d.smem_per_block > 0 && d.smem_per_sm > 0,
               "device description '" << d.name << "' lacks SM count or shared memory sizes");
  const PackedLayout L =
      PackedLayout::make(p.hidden, p.intermediate, p.local_experts(), p.format, p.gated(), p.has_bias);
  Plan plan;
  plan.problem = p;
  plan.sms = d.sms;
  plan.device = d.name;
  plan.tactic = tactic;
  plan.reason = std::move(reason);
  if (plan.tactic == Tactic::decode)
    plan.decode = plan_decode(p, d, L);
  else
    plan.prefill = plan_prefill(p, d);

  // Estimates under uniform routing: distinct local experts touched, their bytes, the routed FLOPs.
  const double T = double(p.tokens), E = p.num_experts, local = p.local_experts();
  const double touched = local * (1.0 - std::pow(1.0 - double(p.top_k) / E, T));
  plan.weight_bytes = int64_t(touched * double(L.checkpoint_bytes_per_expert()));
  const double local_slots = T * p.top_k * local / E;
  plan.flops = 2.0 * local_slots * (double(p.w13_rows()) * p.hidden + double(p.hidden) * p.intermediate);
  if (d.hbm_bytes_per_s > 0) plan.byte_floor_us = double(plan.weight_bytes) / d.hbm_bytes_per_s * 1e6;
  if (d.bf16_flops > 0) plan.compute_floor_us = plan.flops / d.bf16_flops * 1e6;
  return plan;
}

}  // namespace

Plan make_plan(const MoeProblem& p, const DeviceDesc& d) {
  auto [tactic, reason] = choose_tactic(p, d);
  return build_plan(p, d, tactic, std::move(reason));
}

Plan make_plan(const MoeProblem& p, const DeviceDesc& d, Tactic tactic) {
  FP4MOE_CHECK(!p.batch_invariant || tactic == Tactic::prefill,
               "a batch_invariant problem runs the prefill tactic only (one summation order for every T), "
               "tactic " << to_string(tactic) << " was requested");
  const auto [chosen, why] = choose_tactic(p, d);
  std::string reason = chosen == tactic ? why : std::string("tactic ") + std::string(to_string(tactic)) +
                                                    " requested; the planner picks " +
                                                    std::string(to_string(chosen)) + ": " + why;
  return build_plan(p, d, tactic, std::move(reason));
}

Plan make_plan(const MoeProblem& p) {
  static std::mutex mu;
  static std::set<std::string> logged;
  static const bool log_plans = [] {
    const char* env = std::getenv("FP4MOE_LOG_PLAN");
    return env != nullptr && env[0] == '1';
  }();
  const Plan plan = make_plan(p, DeviceDesc::current());
  if (log_plans) {
    std::lock_guard<std::mutex> lock(mu);
    std::string key = p.to_string() + plan.to_string();
    if (logged.insert(key).second) std::fprintf(stderr, "fp4moe: %s -> %s\n", p.to_string().c_str(), plan.to_string().c_str());
  }
  return plan;
}

std::string Plan::to_string() const {
  ::fp4moe::detail::Message o;
  o << "plan{" << fp4moe::to_string(tactic) << " sms=" << sms;
  if (tactic == Tactic::decode) {
    o << " blocks=" << decode.blocks << " threads=" << decode.threads << " team1=" << decode.team_warps1
      << " team2=" << decode.team_warps2 << " chunks=" << decode.chunks << " smem=" << decode.smem_bytes
      << " l2_prefetch=" << decode.l2_prefetch_bytes;
  } else {
    o << " tile=" << prefill.block_m << "x" << prefill.block_n << " stages=" << prefill.stages
      << " blocks=" << prefill.blocks << " threads=" << prefill.threads << " smem=" << prefill.smem_bytes
      << " token_chunk=" << prefill.token_chunk << " passes=" << prefill.passes;
  }
  o << " est_bytes=" << weight_bytes << " est_floor_us=" << std::max(byte_floor_us, compute_floor_us) << "}";
  return o.str();
}

}  // namespace fp4moe
