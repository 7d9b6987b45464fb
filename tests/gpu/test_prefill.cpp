// The prefill path (wgmma grouped GEMMs, T >= the crossover) against the CPU reference: the decode
// tests' grid of routing methods, activations, formats, input modes, biases and EP ranges at large T,
// shapes whose H and I are not multiples of the tiles, skewed and empty experts, poisoned outputs,
// bitwise determinism, batch invariance within the prefill kernels and in batch_invariant mode.
#include <gtest/gtest.h>

#include "gpu/gpu_harness.h"

namespace fp4moe {
namespace {

using testing::Case;
using testing::compare;
using testing::first_mismatch;
using testing::make_problem;
using testing::random_inputs;
using testing::run_gpu;

// Tokens [t0, t0 + n) of `d` as their own call's inputs.
testing::HostData slice(const MoeProblem& p, const testing::HostData& d, int64_t t0, int64_t n) {
  testing::HostData s;
  s.x.assign(d.x.begin() + t0 * p.hidden, d.x.begin() + (t0 + n) * p.hidden);
  if (!d.logits.empty())
    s.logits.assign(d.logits.begin() + t0 * p.num_experts, d.logits.begin() + (t0 + n) * p.num_experts);
  s.bias = d.bias;
  if (!d.ids.empty()) {
    s.ids.assign(d.ids.begin() + t0 * p.top_k, d.ids.begin() + (t0 + n) * p.top_k);
    s.weights.assign(d.weights.begin() + t0 * p.top_k, d.weights.begin() + (t0 + n) * p.top_k);
  }
  return s;
}

std::vector<uint16_t> rows(const std::vector<uint16_t>& v, int64_t H, int64_t t0, int64_t n) {
  return std::vector<uint16_t>(v.begin() + t0 * H, v.begin() + (t0 + n) * H);
}

// The prefill tactic for p: what make_plan picks from the crossover on, and forced below it (the
// cases at T = 65..127 test the smallest prefill problems; on the H200 the planner gives them to the
// decode kernel since 2026-12-04).
Plan prefill_plan(const MoeProblem& p) {
  const Plan auto_plan = make_plan(p);
  if (p.tokens >= crossover(p, DeviceDesc::current()).prefill_from_tokens)
    EXPECT_EQ(auto_plan.tactic, Tactic::prefill) << auto_plan.to_string();
  return make_plan(p, DeviceDesc::current(), Tactic::prefill);
}

void check_against_reference(const MoeProblem& p, const MoeWeights& w, const testing::HostData& data,
                             const std::string& name) {
  const Plan plan = prefill_plan(p);
  ASSERT_EQ(plan.tactic, Tactic::prefill) << plan.to_string();
  const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
  DeviceWeights dw(prepack(p, w));
  std::vector<uint16_t> first;
  const std::vector<uint16_t> got = run_gpu(p, dw, data, 2, &first, &plan);
  const auto st = compare(got, ref.out);
  EXPECT_EQ(st.nan_count, 0) << name << ": unwritten or NaN outputs";
  EXPECT_LT(st.rel_l2, 1e-2) << name << ": rel L2 " << st.rel_l2 << ", max abs " << st.max_abs;
  EXPECT_EQ(first_mismatch(first, got, p.hidden), "") << name << ": two runs differ";
  std::printf("  %-40s T=%-6lld %s rel_l2=%.2e max_abs=%.3e\n", name.c_str(), (long long)p.tokens,
              plan.to_string().c_str(), st.rel_l2, st.max_abs);
}

class PrefillVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(PrefillVsReference, MatchesReference) {
  GPU_TEST_PREAMBLE();
  const Case& c = GetParam();
  const uint64_t seed = 4321 + std::hash<std::string>{}(c.name) % 1000;
  const MoeProblem p = make_problem(c);
  check_against_reference(p, random_weights(p, seed), random_inputs(p, seed + 1), c.name);
}

std::vector<Case> cases() {
  std::vector<Case> v;
  // H = 320 and I = 96 are not multiples of 128 (nor of 64): boxes run past the expert's last m-tile.
  for (int64_t T : {65, 127, 1000, 4096, 16384}) v.push_back({"nvfp4_swiglu_T" + std::to_string(T), 320, 96, 16, 4, T});
  for (int64_t T : {65, 1000, 4096})
    v.push_back({"mxfp4_oai_bias_T" + std::to_string(T), 288, 160, 16, 4, T, Format::mxfp4, RoutingMethod::topk_softmax,
                 Activation::swiglu_oai, InputMode::w4a16, true});
  v.push_back({"mxfp4_swiglu_T300", 320, 96, 16, 4, 300, Format::mxfp4});
  v.push_back({"nvfp4_deepseek_T1000", 256, 128, 32, 6, 1000, Format::nvfp4, RoutingMethod::deepseek_v3});
  v.push_back({"nvfp4_llama4_T500", 256, 192, 8, 1, 500, Format::nvfp4, RoutingMethod::llama4});
  v.push_back({"nvfp4_sigmoid_topk_T200", 192, 64, 12, 3, 200, Format::nvfp4, RoutingMethod::sigmoid_topk});
  v.push_back({"nvfp4_precomputed_T1000", 192, 64, 12, 3, 1000, Format::nvfp4, RoutingMethod::precomputed});
  v.push_back({"nvfp4_relu2_T300", 256, 80, 8, 2, 300, Format::nvfp4, RoutingMethod::softmax_topk, Activation::relu2});
  v.push_back({"mxfp4_relu2_T4096", 256, 96, 8, 2, 4096, Format::mxfp4, RoutingMethod::softmax_topk, Activation::relu2});
  v.push_back({"nvfp4_geglu_T300", 256, 80, 8, 2, 300, Format::nvfp4, RoutingMethod::softmax_topk, Activation::geglu_tanh});
  v.push_back({"nvfp4_w4a4_T300", 256, 128, 8, 2, 300, Format::nvfp4, RoutingMethod::softmax_topk, Activation::swiglu,
               InputMode::w4a4});
  v.push_back({"nvfp4_w4a4_bias_T4096", 512, 256, 16, 4, 4096, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a4, true});
  v.push_back({"nvfp4_w4a4_relu2_T1000", 256, 96, 8, 2, 1000, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::relu2, InputMode::w4a4});
  v.push_back({"nvfp4_bias_T127", 256, 128, 8, 2, 127, Format::nvfp4, RoutingMethod::softmax_topk, Activation::swiglu,
               InputMode::w4a16, true});
  v.push_back({"nvfp4_ep_middle_T1000", 256, 128, 16, 4, 1000, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a16, true, 4, 6});
  v.push_back({"nvfp4_ep_last_T65", 256, 128, 16, 4, 65, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a16, false, 12, 4});
  v.push_back({"nvfp4_many_experts_empty_T65", 512, 128, 128, 2, 65});
  v.push_back({"nvfp4_large_k_T300", 128, 64, 64, 16, 300});
  v.push_back({"nvfp4_wide_T1000", 2048, 768, 32, 8, 1000});
  v.push_back({"mxfp4_gptoss_shape_T160", 2880, 2880, 8, 4, 160, Format::mxfp4, RoutingMethod::topk_softmax,
               Activation::swiglu_oai, InputMode::w4a16, true});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, PrefillVsReference, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// Every token on one expert (slot 0) and most experts empty: one expert's tile list is T long.
TEST(Prefill, OneExpertReceivesEveryToken) {
  GPU_TEST_PREAMBLE();
  Case c{"one_expert", 256, 128, 64, 2, 4096, Format::nvfp4, RoutingMethod::precomputed};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 31);
  auto data = random_inputs(p, 32);
  for (int64_t t = 0; t < p.tokens; ++t) {
    data.ids[size_t(2 * t)] = 5;
    data.ids[size_t(2 * t + 1)] = 6 + int(t % 3);  // three more experts; the other 60 stay empty
  }
  check_against_reference(p, w, data, c.name);
}

// Precomputed ids outside [0, E) are skipped on the device, never read or written out of bounds.
TEST(Prefill, OutOfRangeDeviceIdsAreIgnored) {
  GPU_TEST_PREAMBLE();
  Case c{"oob", 128, 64, 8, 2, 200, Format::nvfp4, RoutingMethod::precomputed};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 5);
  auto data = random_inputs(p, 6);
  auto fixed = data;
  for (int64_t t = 0; t < p.tokens; t += 7) {
    data.ids[size_t(2 * t + 1)] = (t % 2) ? 1000 : -5;
    fixed.ids[size_t(2 * t + 1)] = (fixed.ids[size_t(2 * t)] + 1) % 8;
    fixed.weights[size_t(2 * t + 1)] = 0.0f;
  }
  const Plan plan = prefill_plan(p);
  DeviceWeights dw(prepack(p, w));
  const auto got = run_gpu(p, dw, data, 1, nullptr, &plan);
  const auto ref = moe_reference(p, w, testing::host_inputs(p, fixed));
  const auto st = compare(got, ref.out);
  EXPECT_EQ(st.nan_count, 0);
  EXPECT_LT(st.rel_l2, 1e-2);
}

// Within the prefill kernels a token's output does not depend on the rest of the batch, also where the
// planner picks another tile width for the smaller call.
TEST(Prefill, BatchInvariance) {
  GPU_TEST_PREAMBLE();
  Case c{"batch", 512, 192, 16, 4, 4096, Format::nvfp4, RoutingMethod::softmax_topk};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 41);
  const auto data = random_inputs(p, 42);
  DeviceWeights dw(prepack(p, w));
  const auto full = run_gpu(p, dw, data);
  // Within the prefill kernels a token's output does not depend on the batch: every part runs the
  // prefill tactic (forced where the planner would pick the decode kernel).
  for (auto [t0, n] : {std::pair<int64_t, int64_t>{0, 65}, {1000, 300}, {4000, 96}, {17, 2048}}) {
    MoeProblem q = p;
    q.tokens = n;
    const Plan plan = prefill_plan(q);
    const auto part = run_gpu(q, dw, slice(p, data, t0, n), 1, nullptr, &plan);
    EXPECT_EQ(first_mismatch(part, rows(full, p.hidden, t0, n), p.hidden), "")
        << "tokens [" << t0 << ", " << t0 + n << "), " << plan.to_string() << " vs " << make_plan(p).to_string();
  }
}

// batch_invariant: one summation order for every T, across the decode / prefill crossover.
TEST(Prefill, BatchInvariantModeAcrossT) {
  GPU_TEST_PREAMBLE();
  for (Format f : {Format::nvfp4, Format::mxfp4}) {
    Case c{"invariant", 320, 96, 16, 4, 4096, f, RoutingMethod::softmax_topk};
    MoeProblem p = make_problem(c);
    p.batch_invariant = true;
    const MoeWeights w = random_weights(p, 51);
    const auto data = random_inputs(p, 52);
    DeviceWeights dw(prepack(p, w));
    const auto full = run_gpu(p, dw, data);
    const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
    EXPECT_LT(compare(full, ref.out).rel_l2, 1e-2);
    for (int64_t n : {1, 64, 65}) {
      for (int64_t t0 : {int64_t(0), int64_t(3000)}) {
        MoeProblem q = p;
        q.tokens = n;
        const auto part = run_gpu(q, dw, slice(p, data, t0, n));
        EXPECT_EQ(first_mismatch(part, rows(full, p.hidden, t0, n), p.hidden), "")
            << to_string(f) << " T=" << n << " at token " << t0;
      }
    }
  }
}

}  // namespace
}  // namespace fp4moe
