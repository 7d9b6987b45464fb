// The planner (include/fp4moe/plan.h) without a GPU: the tactic against the crossover table, the
// batch-invariant setting, tile shapes, pipeline stages against shared memory, grids, token chunks,
// workspace sizes, estimates, determinism, device descriptions, and validate_plan (what
// run(..., plan) checks before it launches).
#include <gtest/gtest.h>

#include <cmath>
#include <set>
#include <string>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/moe.h"
#include "fp4moe/plan.h"
#include "fp4moe/presets.h"
#include "kernels/decode/params.h"
#include "kernels/prefill/params.h"
#include "kernels/prefill/workspace.h"

namespace fp4moe {
namespace {

template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an fp4moe::Error";
  return "";
}

#define EXPECT_ERROR_HAS(stmt, text)                           \
  do {                                                         \
    const std::string msg_ = error_of([&] { stmt; });          \
    EXPECT_NE(msg_.find(text), std::string::npos) << msg_;     \
  } while (0)

std::vector<DeviceDesc> devices() { return {DeviceDesc::h100(), DeviceDesc::h200()}; }

// A card unlike the presets: fewer SMs, less shared memory.
DeviceDesc small_device() {
  DeviceDesc d = DeviceDesc::h100();
  d.name = "test device";
  d.sms = 100;
  d.smem_per_block = 100 * 1024;
  d.smem_per_sm = 128 * 1024;
  d.l2_bytes = 40 << 20;
  return d;
}

MoeProblem at(MoeProblem p, int64_t T) {
  p.tokens = T;
  return p;
}

// Every preset as shipped, plus variants that change the plan's inputs: the other format, W4A4,
// an expert-parallel range.
std::vector<std::pair<std::string, MoeProblem>> problems() {
  std::vector<std::pair<std::string, MoeProblem>> out;
  for (const Preset& pr : presets()) {
    const MoeProblem p = pr.problem(1);
    out.emplace_back(std::string(pr.name), p);
    MoeProblem q = p;
    q.format = p.format == Format::nvfp4 ? Format::mxfp4 : Format::nvfp4;
    if (q.hidden % 32 == 0 && q.intermediate % 32 == 0) out.emplace_back(std::string(pr.name) + "/other-format", q);
    if (p.format == Format::nvfp4) {
      MoeProblem w = p;
      w.input_mode = InputMode::w4a4;
      out.emplace_back(std::string(pr.name) + "/w4a4", w);
    }
    if (p.num_experts >= 8) {
      MoeProblem e = p;
      e.local_expert_offset = p.num_experts / 4;
      e.num_local_experts = p.num_experts / 2;
      out.emplace_back(std::string(pr.name) + "/ep", e);
    }
  }
  return out;
}

// Token counts around every boundary the planner knows: each value up to 300, powers of two, the
// decode chunk, the crossover of `c`.
std::vector<int64_t> token_sweep(int64_t c) {
  std::set<int64_t> s;
  for (int64_t T = 0; T <= 300; ++T) s.insert(T);
  for (int64_t T = 256; T <= (int64_t(1) << 17); T *= 2) {
    s.insert(T - 1);
    s.insert(T);
    s.insert(T + 1);
  }
  for (int64_t d = -2; d <= 2; ++d)
    if (c + d >= 0 && c + d < (int64_t(1) << 40)) s.insert(c + d);
  return {s.begin(), s.end()};
}

// The plans' fields, compared one by one (Plan has no operator==).
void expect_same_plan(const Plan& a, const Plan& b, const std::string& what) {
  EXPECT_EQ(a.tactic, b.tactic) << what;
  EXPECT_EQ(a.sms, b.sms) << what;
  EXPECT_EQ(a.device, b.device) << what;
  EXPECT_EQ(a.reason, b.reason) << what;
  EXPECT_EQ(a.problem.to_string(), b.problem.to_string()) << what;
  EXPECT_EQ(a.decode.blocks, b.decode.blocks) << what;
  EXPECT_EQ(a.decode.threads, b.decode.threads) << what;
  EXPECT_EQ(a.decode.team_warps1, b.decode.team_warps1) << what;
  EXPECT_EQ(a.decode.team_warps2, b.decode.team_warps2) << what;
  EXPECT_EQ(a.decode.chunks, b.decode.chunks) << what;
  EXPECT_EQ(a.decode.smem_bytes, b.decode.smem_bytes) << what;
  EXPECT_EQ(a.decode.l2_prefetch_bytes, b.decode.l2_prefetch_bytes) << what;
  EXPECT_EQ(a.prefill.block_m, b.prefill.block_m) << what;
  EXPECT_EQ(a.prefill.block_n, b.prefill.block_n) << what;
  EXPECT_EQ(a.prefill.stages, b.prefill.stages) << what;
  EXPECT_EQ(a.prefill.blocks, b.prefill.blocks) << what;
  EXPECT_EQ(a.prefill.threads, b.prefill.threads) << what;
  EXPECT_EQ(a.prefill.smem_bytes, b.prefill.smem_bytes) << what;
  EXPECT_EQ(a.prefill.token_chunk, b.prefill.token_chunk) << what;
  EXPECT_EQ(a.prefill.passes, b.prefill.passes) << what;
  EXPECT_EQ(a.weight_bytes, b.weight_bytes) << what;
  EXPECT_EQ(a.flops, b.flops) << what;
  EXPECT_EQ(a.byte_floor_us, b.byte_floor_us) << what;
  EXPECT_EQ(a.compute_floor_us, b.compute_floor_us) << what;
  EXPECT_EQ(a.to_string(), b.to_string()) << what;
}

// ---- the tactic ------------------------------------------------------------------------------------

// The rule for the table: decode at T = 8, prefill at T = 4096, on both cards.
TEST(PlanCrossover, TableSwitchesBetween8And4096) {
  for (const DeviceDesc& d : devices())
    for (const auto& [name, p] : problems()) {
      const Crossover c = crossover(p, d);
      EXPECT_GT(c.prefill_from_tokens, 8) << name << " on " << d.name << ": " << c.source;
      EXPECT_LE(c.prefill_from_tokens, 4096) << name << " on " << d.name << ": " << c.source;
      EXPECT_NE(std::string(c.source), "") << name << " on " << d.name;
      EXPECT_EQ(make_plan(at(p, 8), d).tactic, Tactic::decode) << name << " on " << d.name;
      EXPECT_EQ(make_plan(at(p, 4096), d).tactic, Tactic::prefill) << name << " on " << d.name;
    }
}

// Every T below the crossover is decode, every T at or above it prefill; the reason names the rule.
TEST(PlanCrossover, EveryTokenCountFollowsTheTable) {
  for (const DeviceDesc& d : {DeviceDesc::h100(), DeviceDesc::h200(), small_device()})
    for (const auto& [name, p] : problems()) {
      const Crossover c = crossover(p, d);
      for (const int64_t T : token_sweep(c.prefill_from_tokens)) {
        const Plan plan = make_plan(at(p, T), d);
        const Tactic want = T >= c.prefill_from_tokens ? Tactic::prefill : Tactic::decode;
        ASSERT_EQ(plan.tactic, want) << name << " T=" << T << " on " << d.name << ": crossover "
                                     << c.prefill_from_tokens << ", " << plan.to_string();
        EXPECT_NE(plan.reason.find(std::to_string(c.prefill_from_tokens)), std::string::npos)
            << name << " T=" << T << ": " << plan.reason;
        EXPECT_NE(plan.reason.find(c.source), std::string::npos) << name << " T=" << T << ": " << plan.reason;
      }
    }
}

// batch_invariant: the prefill tactic and one tile shape for every T, across the crossover.
TEST(PlanBatchInvariant, PrefillWithOneTileWidthForEveryT) {
  for (const DeviceDesc& d : devices())
    for (auto [name, p] : problems()) {
      p.batch_invariant = true;
      const Plan first = make_plan(at(p, 1), d);
      for (const int64_t T : token_sweep(crossover(p, d).prefill_from_tokens)) {
        const Plan plan = make_plan(at(p, T), d);
        ASSERT_EQ(plan.tactic, Tactic::prefill) << name << " T=" << T << ": " << plan.to_string();
        ASSERT_EQ(plan.prefill.block_n, first.prefill.block_n) << name << " T=" << T << " vs T=1";
        ASSERT_EQ(plan.prefill.block_m, first.prefill.block_m) << name << " T=" << T << " vs T=1";
        EXPECT_NE(plan.reason.find("batch_invariant"), std::string::npos) << plan.reason;
      }
      EXPECT_ERROR_HAS(make_plan(at(p, 8), d, Tactic::decode), "batch_invariant");
    }
}

// A requested tactic is planned whatever the crossover says; the reason says it was requested and
// what the planner would have picked. The chosen tactic, requested, gives make_plan's own plan.
TEST(PlanForcedTactic, EitherTacticAtAnyT) {
  const DeviceDesc d = DeviceDesc::h200();
  for (const auto& [name, p] : problems())
    for (const int64_t T : {1, 8, 16, 64, 65, 256, 4096}) {
      const MoeProblem q = at(p, T);
      const Plan chosen = make_plan(q, d);
      for (const Tactic t : {Tactic::decode, Tactic::prefill}) {
        const Plan plan = make_plan(q, d, t);
        ASSERT_EQ(plan.tactic, t) << name << " T=" << T;
        EXPECT_NO_THROW(validate_plan(q, plan)) << name << " T=" << T << " " << plan.to_string();
        if (t == chosen.tactic) {
          expect_same_plan(plan, chosen, name + " T=" + std::to_string(T));
        } else {
          EXPECT_NE(plan.reason.find("requested"), std::string::npos) << plan.reason;
          EXPECT_NE(plan.reason.find(chosen.reason), std::string::npos) << plan.reason;
        }
        if (t == Tactic::decode) EXPECT_EQ(plan.decode.chunks, ceil_div(T, kTokenChunk)) << name << " T=" << T;
      }
    }
}

// ---- tactic details --------------------------------------------------------------------------------

// Token tiles are cut at run time (up to kPrefillTileMax rows, each at the narrowest compiled wgmma
// width that holds it); the plan's block_n is that widest tile, for every T and every problem.
TEST(PlanShapes, PrefillTilesAreTheKernelsShapes) {
  const std::set<int> widths(std::begin(kernels::kPrefillWidths), std::end(kernels::kPrefillWidths));
  ASSERT_EQ(*widths.rbegin(), kernels::kPrefillTileMax) << "the widest compiled width holds the largest tile";
  ASSERT_LE(kernels::kPrefillTileBase, kernels::kPrefillTileMax);
  for (const int n : widths) ASSERT_TRUE(n % 16 == 0 && n >= 8 && n <= 256) << "not a wgmma N: " << n;
  for (const DeviceDesc& d : devices())
    for (const auto& [name, p] : problems()) {
      for (const int64_t T : token_sweep(crossover(p, d).prefill_from_tokens)) {
        const Plan plan = make_plan(at(p, T), d, Tactic::prefill);
        const PrefillTactic& t = plan.prefill;
        ASSERT_EQ(t.block_m, kernels::kPrefillBlockM) << name << " T=" << T;
        // One producer warpgroup and the consumer warpgroups, each owning whole m64 wgmma rows.
        ASSERT_EQ(t.threads, 128 * (1 + kernels::kPrefillConsumers)) << name << " T=" << T;
        ASSERT_EQ(t.block_m % (64 * kernels::kPrefillConsumers), 0) << name << ": block_m " << t.block_m;
        ASSERT_EQ(t.block_n, kernels::kPrefillTileMax) << name << " T=" << T;
      }
    }
}

// The decode K split fixes the summation order: it may depend on the shape, never on T.
TEST(PlanShapes, DecodeSplitDependsOnTheShapeOnly) {
  for (const DeviceDesc& d : {DeviceDesc::h100(), DeviceDesc::h200(), small_device()})
    for (const auto& [name, p] : problems()) {
      const Plan first = make_plan(at(p, 1), d, Tactic::decode);
      for (const int64_t T : {1, 2, 7, 8, 33, 64, 65, 200, 1000, 5000}) {
        const DecodeTactic t = make_plan(at(p, T), d, Tactic::decode).decode;
        ASSERT_EQ(t.team_warps1, first.decode.team_warps1) << name << " T=" << T;
        ASSERT_EQ(t.team_warps2, first.decode.team_warps2) << name << " T=" << T;
        ASSERT_EQ(t.threads, kernels::kDecodeThreads) << name;
        for (const int tw : {t.team_warps1, t.team_warps2})
          ASSERT_TRUE(tw == 1 || tw == 2 || tw == 4 || tw == 8) << name << ": team " << tw;
        ASSERT_EQ(t.chunks, ceil_div(T, kTokenChunk)) << name << " T=" << T;
        // A cooperative grid: whole SMs, every block resident (1 KB per block reserved by the hardware).
        ASSERT_EQ(t.blocks % d.sms, 0) << name << " T=" << T;
        const int per_sm = t.blocks / d.sms;
        ASSERT_GE(per_sm, 1);
        ASSERT_LE(size_t(per_sm) * (t.smem_bytes + 1024), d.smem_per_sm) << name << " T=" << T;
        ASSERT_LE(t.smem_bytes, d.smem_per_block) << name << " T=" << T;
        // Every variant runs two blocks per SM (128 registers) unless shared memory allows only one.
        const int by_smem = int(d.smem_per_sm / (t.smem_bytes + 1024));
        ASSERT_EQ(per_sm, std::min(2, by_smem)) << name << " T=" << T;
      }
    }
}

// The deepest pipeline that fits: stages * stage bytes + the reserve within the block's shared
// memory, one more stage would not fit (or the cap is reached).
TEST(PlanShapes, PrefillStagesFitSharedMemory) {
  std::set<int> seen_stages;
  for (const DeviceDesc& d : {DeviceDesc::h100(), DeviceDesc::h200(), small_device()})
    for (const auto& [name, p] : problems())
      for (const int64_t T : {65, 1024, 16384}) {
        const PrefillTactic t = make_plan(at(p, T), d, Tactic::prefill).prefill;
        const size_t stage = kernels::prefill_stage_bytes(t.block_m, t.block_n, p.format);
        ASSERT_GE(t.stages, 2) << name;
        ASSERT_LE(t.stages, kernels::kPrefillMaxStages) << name;
        ASSERT_EQ(t.smem_bytes, size_t(t.stages) * stage + kernels::kPrefillSmemReserve) << name;
        ASSERT_LE(t.smem_bytes, d.smem_per_block) << name << " on " << d.name;
        if (t.stages < kernels::kPrefillMaxStages)
          ASSERT_GT(t.smem_bytes + stage, d.smem_per_block) << name << " on " << d.name << ": room for another stage";
        seen_stages.insert(t.stages);
      }
  EXPECT_GE(seen_stages.size(), 2u) << "the small device should get a shallower pipeline";
  DeviceDesc tiny = small_device();
  tiny.smem_per_block = 24 * 1024;
  const MoeProblem p = find_preset("deepseek-v3").problem(4096);
  EXPECT_ERROR_HAS(make_plan(p, tiny, Tactic::prefill), "two pipeline stages");
}

TEST(PlanShapes, GridFollowsTheDevice) {
  for (const DeviceDesc& d : {DeviceDesc::h200(), small_device()}) {
    const MoeProblem p = find_preset("qwen3-235b-a22b").problem(2048);
    const Plan pre = make_plan(p, d, Tactic::prefill), dec = make_plan(p, d, Tactic::decode);
    EXPECT_EQ(pre.prefill.blocks, d.sms) << d.name;
    EXPECT_EQ(pre.sms, d.sms);
    EXPECT_EQ(pre.device, d.name);
    EXPECT_EQ(dec.decode.blocks % d.sms, 0) << d.name;
    EXPECT_EQ(dec.decode.l2_prefetch_bytes, d.l2_bytes / 2) << d.name;
  }
}

// Passes of token_chunk tokens cover T exactly; the chunk stops growing at the planner's bound, and
// that bound keeps one pass's workspace within 2 GiB unless it is already the smallest chunk.
TEST(PlanShapes, PrefillTokenChunksCoverT) {
  const DeviceDesc d = DeviceDesc::h200();
  for (const auto& [name, p] : problems()) {
    const int64_t cap = make_plan(at(p, int64_t(1) << 24), d, Tactic::prefill).prefill.token_chunk;
    const auto W = kernels::PrefillWorkspace::make(cap, p.top_k, p.local_experts(), p.hidden, p.intermediate,
                                                   kernels::kPrefillTileBase);
    EXPECT_TRUE(W.total <= (int64_t(2) << 30) || cap == 1024) << name << ": chunk " << cap << ", " << W.total;
    for (const int64_t T : token_sweep(0)) {
      if (T == 0) continue;
      const PrefillTactic t = make_plan(at(p, T), d, Tactic::prefill).prefill;
      ASSERT_EQ(t.token_chunk, std::min(T, cap)) << name << " T=" << T;
      ASSERT_GE(t.passes * t.token_chunk, T) << name << " T=" << T;
      ASSERT_LT((t.passes - 1) * t.token_chunk, T) << name << " T=" << T;
    }
  }
}

// ---- workspace -------------------------------------------------------------------------------------

TEST(PlanWorkspace, MonotoneInTAndConstantAboveTheChunk) {
  for (const auto& [name, p] : problems()) {
    const int64_t cap = make_plan(at(p, int64_t(1) << 24), DeviceDesc::h200(), Tactic::prefill).prefill.token_chunk;
    const size_t at_cap = workspace_size(at(p, cap));
    EXPECT_EQ(workspace_size(at(p, 0)), 0u) << name;
    size_t last = 0;
    for (const int64_t T : token_sweep(cap)) {
      const size_t ws = workspace_size(at(p, T));
      ASSERT_GE(ws, last) << name << ": workspace_size shrank at T=" << T;
      if (T >= cap) ASSERT_EQ(ws, at_cap) << name << ": T=" << T << " above the chunk " << cap;
      if (T > 0) ASSERT_GT(ws, 0u) << name << " T=" << T;
      last = ws;
    }
  }
}

// workspace_size(p) covers the plan of either tactic on either card (the caller sizes once, the
// planner may pick either); a plan with a longer chunk than the planner's needs more.
TEST(PlanWorkspace, CoversEveryPlan) {
  for (const DeviceDesc& d : {DeviceDesc::h100(), DeviceDesc::h200(), small_device()})
    for (const auto& [name, p] : problems())
      for (const int64_t T : {1, 64, 65, 100, 1000, 4096, 20000}) {
        const MoeProblem q = at(p, T);
        for (const Tactic t : {Tactic::decode, Tactic::prefill}) {
          const Plan plan = make_plan(q, d, t);
          ASSERT_LE(workspace_size(q, plan), workspace_size(q)) << name << " T=" << T << " " << plan.to_string();
          ASSERT_GT(workspace_size(q, plan), 0u) << name << " T=" << T;
        }
      }
  const MoeProblem p = find_preset("deepseek-v3").problem(16384);
  Plan plan = make_plan(p, DeviceDesc::h200());
  ASSERT_EQ(plan.tactic, Tactic::prefill);
  ASSERT_LT(plan.prefill.token_chunk, p.tokens) << "deepseek-v3 at T=16384 should take several passes";
  plan.prefill.token_chunk *= 2;
  plan.prefill.passes = ceil_div(p.tokens, plan.prefill.token_chunk);
  EXPECT_GT(workspace_size(p, plan), workspace_size(p));
}

// ---- estimates, determinism, device descriptions -------------------------------------------------

TEST(PlanEstimates, BytesAndFlopsOfTheRoutedSlots) {
  const DeviceDesc d = DeviceDesc::h200();
  for (const auto& [name, p] : problems()) {
    const PackedLayout L =
        PackedLayout::make(p.hidden, p.intermediate, p.local_experts(), p.format, p.gated(), p.has_bias);
    const double all = double(p.local_experts()) * double(L.checkpoint_bytes_per_expert());
    int64_t last = -1;
    for (const int64_t T : {0, 1, 2, 8, 64, 65, 1024, 16384}) {
      const Plan plan = make_plan(at(p, T), d);
      // BENCH.md: FLOPs = 2 * slots on local experts * (rows13 * H + H * I).
      const double rows13 = p.gated() ? 2.0 * p.intermediate : double(p.intermediate);
      const double slots = double(T) * p.top_k * p.local_experts() / p.num_experts;
      const double flops = 2.0 * slots * (rows13 * p.hidden + double(p.hidden) * p.intermediate);
      EXPECT_NEAR(plan.flops, flops, 1e-9 * flops + 1e-9) << name << " T=" << T;
      EXPECT_LE(double(plan.weight_bytes), all) << name << " T=" << T;
      EXPECT_GE(plan.weight_bytes, last) << name << " T=" << T;
      EXPECT_NEAR(plan.byte_floor_us, double(plan.weight_bytes) / d.hbm_bytes_per_s * 1e6, 1e-6) << name;
      EXPECT_NEAR(plan.compute_floor_us, plan.flops / d.bf16_flops * 1e6, 1e-6) << name;
      last = plan.weight_bytes;
    }
    EXPECT_EQ(make_plan(at(p, 0), d).weight_bytes, 0) << name;
  }
}

TEST(PlanDeterminism, SamePlanTwice) {
  for (const DeviceDesc& d : devices())
    for (auto [name, p] : problems())
      for (const bool bi : {false, true})
        for (const int64_t T : {1, 64, 65, 4096, 16384}) {
          p.batch_invariant = bi;
          const MoeProblem q = at(p, T);
          const DeviceDesc copy = d;
          expect_same_plan(make_plan(q, d), make_plan(q, copy), name + " T=" + std::to_string(T));
          EXPECT_EQ(make_plan(q, d).problem.to_string(), q.to_string());
        }
}

TEST(PlanDevice, NamedPresets) {
  EXPECT_EQ(DeviceDesc::named("h100").name, DeviceDesc::h100().name);
  EXPECT_EQ(DeviceDesc::named("H200").name, DeviceDesc::h200().name);
  EXPECT_EQ(DeviceDesc::named("h200").sms, DeviceDesc::h200().sms);
  for (const char* bad : {"h300", "", "a100", "h200 ", "nvidia-h200"}) {
    const std::string msg = error_of([&] { DeviceDesc::named(bad); });
    EXPECT_NE(msg.find("'" + std::string(bad) + "'"), std::string::npos) << msg;
    EXPECT_NE(msg.find("h100"), std::string::npos) << msg;
    EXPECT_NE(msg.find("h200"), std::string::npos) << msg;
  }
  // The presets differ where the cards do.
  EXPECT_GT(DeviceDesc::h200().l2_bytes, DeviceDesc::h100().l2_bytes);
  EXPECT_GT(DeviceDesc::h200().hbm_bytes_per_s, DeviceDesc::h100().hbm_bytes_per_s);
  EXPECT_NE(DeviceDesc::h200().to_string().find("132 SMs"), std::string::npos) << DeviceDesc::h200().to_string();
}

TEST(PlanDevice, IncompleteDescriptionIsRefused) {
  const MoeProblem p = find_preset("qwen3-30b-a3b").problem(8);
  DeviceDesc d;
  d.name = "empty";
  EXPECT_ERROR_HAS(make_plan(p, d), "lacks SM count");
  d = DeviceDesc::h200();
  d.smem_per_sm = 0;
  EXPECT_ERROR_HAS(make_plan(p, d), "lacks SM count");
}

// ---- validate_plan: what run(..., plan) checks -----------------------------------------------------

TEST(ValidatePlan, AcceptsThePlannersPlans) {
  for (const DeviceDesc& d : devices())
    for (auto [name, p] : problems())
      for (const int64_t T : {0, 1, 64, 65, 1000, 20000}) {
        const MoeProblem q = at(p, T);
        EXPECT_NO_THROW(validate_plan(q, make_plan(q, d))) << name << " T=" << T;
        p.batch_invariant = true;
        EXPECT_NO_THROW(validate_plan(at(p, T), make_plan(at(p, T), d))) << name << " T=" << T;
        p.batch_invariant = false;
      }
}

TEST(ValidatePlan, RefusesAnotherProblem) {
  const MoeProblem p = find_preset("qwen3-30b-a3b").problem(256);
  const Plan plan = make_plan(p, DeviceDesc::h200());
  EXPECT_ERROR_HAS(validate_plan(at(p, 255), plan), "the plan was made for the problem T=256");
  EXPECT_ERROR_HAS(validate_plan(at(p, 255), plan), "the call's problem is T=255");
  MoeProblem q = p;
  q.hidden = 4096;
  EXPECT_ERROR_HAS(validate_plan(q, plan), "H=4096");
  q = p;
  q.format = Format::mxfp4;
  EXPECT_ERROR_HAS(validate_plan(q, plan), "the plan was made for");
  q = p;
  q.input_mode = InputMode::w4a4;
  EXPECT_ERROR_HAS(validate_plan(q, plan), "the plan was made for");
  q = p;
  q.num_local_experts = 64;
  EXPECT_ERROR_HAS(validate_plan(q, plan), "the plan was made for");
  q = p;
  q.batch_invariant = true;
  EXPECT_ERROR_HAS(validate_plan(q, plan), "batch_invariant");
  // Routing is not part of the shape: a plan serves the precomputed entry point too.
  q = p;
  q.routing.method = RoutingMethod::precomputed;
  EXPECT_NO_THROW(validate_plan(q, plan));
  // A batch-invariant problem with a decode plan (made for it by hand).
  Plan dec = make_plan(at(p, 8), DeviceDesc::h200(), Tactic::decode);
  q = at(p, 8);
  q.batch_invariant = true;
  dec.problem = q;
  EXPECT_ERROR_HAS(validate_plan(q, dec), "prefill tactic only");
}

TEST(ValidatePlan, RefusesInsaneDecodeFields) {
  const MoeProblem p = find_preset("deepseek-v3").problem(100);
  const Plan good = make_plan(p, DeviceDesc::h200(), Tactic::decode);
  ASSERT_NO_THROW(validate_plan(p, good));
  Plan b = good;
  b.decode.chunks = 1;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.decode.chunks = 1, T = 100 needs 2");
  b = good;
  b.decode.team_warps1 = 3;
  EXPECT_ERROR_HAS(validate_plan(p, b), "team_warps1/2 = 3");
  b = good;
  b.decode.team_warps2 = 16;
  EXPECT_ERROR_HAS(validate_plan(p, b), "team_warps1/2 = 16");
  b = good;
  b.decode.threads = 128;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.decode.threads = 128");
  b = good;
  b.decode.blocks = 0;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.decode.blocks = 0");
  b = good;
  b.decode.smem_bytes = 1024;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.decode.smem_bytes = 1024");
  b = good;
  b.tactic = static_cast<Tactic>(7);
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.tactic = 7");
}

TEST(ValidatePlan, RefusesInsanePrefillFields) {
  const MoeProblem p = find_preset("gpt-oss-120b").problem(20000);
  const Plan good = make_plan(p, DeviceDesc::h200(), Tactic::prefill);
  ASSERT_NO_THROW(validate_plan(p, good));
  Plan b = good;
  b.prefill.block_n = 64;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.block_n = 64");
  b = good;
  b.prefill.block_m = 64;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.block_m = 64");
  b = good;
  b.prefill.stages = 1;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.stages = 1");
  b = good;
  b.prefill.stages = kernels::kPrefillMaxStages + 1;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.stages = ");
  b = good;
  b.prefill.smem_bytes -= 1;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.smem_bytes");
  b = good;
  b.prefill.token_chunk = 0;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.token_chunk = 0");
  b = good;
  b.prefill.token_chunk = 20001;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.token_chunk = 20001");
  b = good;
  b.prefill.passes = 1;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.passes = 1");
  b = good;
  b.prefill.threads = 256;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.threads = 256");
  b = good;
  b.prefill.blocks = 0;
  EXPECT_ERROR_HAS(validate_plan(p, b), "plan.prefill.blocks = 0");
  // A shallower pipeline with its own shared memory is a valid plan.
  b = good;
  b.prefill.stages = 3;
  b.prefill.smem_bytes = 3 * kernels::prefill_stage_bytes(b.prefill.block_m, b.prefill.block_n, p.format) +
                         kernels::kPrefillSmemReserve;
  EXPECT_NO_THROW(validate_plan(p, b));
}

}  // namespace
}  // namespace fp4moe
