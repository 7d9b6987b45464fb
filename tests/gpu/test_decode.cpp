// The decode path against the CPU reference: every routing method, activation, format, input mode,
// EP range and awkward shape; poisoned outputs, bitwise determinism, batch invariance, bad inputs.
#include <gtest/gtest.h>

#include "gpu/gpu_harness.h"

namespace fp4moe {
namespace {

using testing::compare;
using testing::first_mismatch;
using testing::random_inputs;
using testing::run_gpu;
using testing::Case;
using testing::make_problem;

// The reference result uses the weights of the local experts only, as the GPU does.
void check_case(const Case& c, uint64_t seed) {
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, seed);
  const auto data = random_inputs(p, seed + 1);
  const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
  DeviceWeights dw(prepack(p, w));
  std::vector<uint16_t> first;
  const std::vector<uint16_t> got = run_gpu(p, dw, data, 2, &first);
  const auto st = compare(got, ref.out);
  EXPECT_EQ(st.nan_count, 0) << c.name << ": unwritten or NaN outputs";
  EXPECT_LT(st.rel_l2, 1e-2) << c.name << ": rel L2 " << st.rel_l2 << ", max abs " << st.max_abs;
  EXPECT_EQ(first_mismatch(first, got, p.hidden), "") << c.name << ": two runs differ";
  ::testing::Test::RecordProperty("rel_l2_" + c.name, std::to_string(st.rel_l2));
  std::printf("  %-40s T=%-4lld rel_l2=%.2e max_abs=%.3e\n", c.name.c_str(), (long long)c.T, st.rel_l2, st.max_abs);
}

class DecodeVsReference : public ::testing::TestWithParam<Case> {};

TEST_P(DecodeVsReference, MatchesReference) {
  GPU_TEST_PREAMBLE();
  check_case(GetParam(), 1234 + std::hash<std::string>{}(GetParam().name) % 1000);
}

std::vector<Case> cases() {
  std::vector<Case> v;
  // Shapes whose H and I are not multiples of 128 (nor of 64).
  for (int64_t T : {1, 2, 3, 8, 17, 64, 300}) v.push_back({"nvfp4_swiglu_T" + std::to_string(T), 320, 96, 16, 4, T});
  v.push_back({"mxfp4_swiglu", 320, 96, 16, 4, 8, Format::mxfp4});
  v.push_back({"mxfp4_oai_bias_topk_softmax", 288, 160, 16, 4, 17, Format::mxfp4, RoutingMethod::topk_softmax,
               Activation::swiglu_oai, InputMode::w4a16, true});
  v.push_back({"nvfp4_deepseek", 256, 128, 32, 6, 9, Format::nvfp4, RoutingMethod::deepseek_v3});
  v.push_back({"nvfp4_llama4", 256, 192, 8, 1, 5, Format::nvfp4, RoutingMethod::llama4});
  v.push_back({"nvfp4_sigmoid_topk", 192, 64, 12, 3, 6, Format::nvfp4, RoutingMethod::sigmoid_topk});
  v.push_back({"nvfp4_precomputed", 192, 64, 12, 3, 6, Format::nvfp4, RoutingMethod::precomputed});
  v.push_back({"nvfp4_relu2", 256, 80, 8, 2, 7, Format::nvfp4, RoutingMethod::softmax_topk, Activation::relu2});
  v.push_back({"mxfp4_relu2", 256, 96, 8, 2, 7, Format::mxfp4, RoutingMethod::softmax_topk, Activation::relu2});
  v.push_back({"nvfp4_geglu", 256, 80, 8, 2, 7, Format::nvfp4, RoutingMethod::softmax_topk, Activation::geglu_tanh});
  v.push_back({"nvfp4_w4a4", 256, 128, 8, 2, 11, Format::nvfp4, RoutingMethod::softmax_topk, Activation::swiglu,
               InputMode::w4a4});
  v.push_back({"nvfp4_w4a4_bias_T64", 512, 256, 16, 4, 64, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a4, true});
  v.push_back({"nvfp4_bias", 256, 128, 8, 2, 5, Format::nvfp4, RoutingMethod::softmax_topk, Activation::swiglu,
               InputMode::w4a16, true});
  v.push_back({"nvfp4_ep_middle", 256, 128, 16, 4, 13, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a16, true, 4, 6});
  v.push_back({"nvfp4_ep_last", 256, 128, 16, 4, 3, Format::nvfp4, RoutingMethod::softmax_topk,
               Activation::swiglu, InputMode::w4a16, false, 12, 4});
  v.push_back({"nvfp4_many_experts_empty", 512, 128, 128, 2, 1});
  v.push_back({"nvfp4_large_k", 128, 64, 64, 16, 64});
  v.push_back({"nvfp4_wide", 2048, 768, 32, 8, 33});
  return v;
}

INSTANTIATE_TEST_SUITE_P(Cases, DecodeVsReference, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

// All tokens on the same two experts: the heaviest per-expert load (64 tokens in one chunk).
TEST(Decode, AllTokensOnOneExpert) {
  GPU_TEST_PREAMBLE();
  Case c{"all_on_one", 256, 128, 16, 2, 100, Format::nvfp4, RoutingMethod::precomputed};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 7);
  auto data = random_inputs(p, 8);
  for (int64_t t = 0; t < p.tokens; ++t) {
    data.ids[size_t(2 * t)] = 3;
    data.ids[size_t(2 * t + 1)] = 11;
  }
  const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
  DeviceWeights dw(prepack(p, w));
  const auto got = run_gpu(p, dw, data);
  const auto st = compare(got, ref.out);
  EXPECT_EQ(st.nan_count, 0);
  EXPECT_LT(st.rel_l2, 1e-2);
}

// A token's output does not depend on which other tokens share the batch.
TEST(Decode, BatchInvariance) {
  GPU_TEST_PREAMBLE();
  Case c{"batch", 512, 192, 32, 4, 40, Format::nvfp4, RoutingMethod::softmax_topk};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 21);
  const auto data = random_inputs(p, 22);
  DeviceWeights dw(prepack(p, w));
  const auto full = run_gpu(p, dw, data);
  for (int64_t t0 : {0, 7, 39}) {
    for (int64_t n : {1, 3}) {
      if (t0 + n > p.tokens) continue;
      MoeProblem q = p;
      q.tokens = n;
      testing::HostData sub;
      sub.x.assign(data.x.begin() + t0 * p.hidden, data.x.begin() + (t0 + n) * p.hidden);
      sub.logits.assign(data.logits.begin() + t0 * p.num_experts, data.logits.begin() + (t0 + n) * p.num_experts);
      sub.bias = data.bias;
      const auto part = run_gpu(q, dw, sub);
      std::vector<uint16_t> expect(full.begin() + t0 * p.hidden, full.begin() + (t0 + n) * p.hidden);
      EXPECT_EQ(first_mismatch(part, expect, p.hidden), "") << "tokens [" << t0 << ", " << t0 + n << ")";
    }
  }
}

TEST(Decode, ZeroTokensDoesNothing) {
  GPU_TEST_PREAMBLE();
  Case c{"zero", 128, 64, 8, 2, 0};
  const MoeProblem p = make_problem(c);
  Case c1 = c;
  c1.T = 1;
  DeviceWeights dw(prepack(p, random_weights(p, 3)));
  EXPECT_EQ(workspace_size(p), 0u);
  DeviceInputs in;
  EXPECT_NO_THROW(run(p, dw, in, nullptr, 0, nullptr));
}

TEST(Decode, RejectsBadInputsBeforeLaunch) {
  GPU_TEST_PREAMBLE();
  Case c{"bad", 128, 64, 8, 2, 4};
  const MoeProblem p = make_problem(c);
  DeviceWeights dw(prepack(p, random_weights(p, 3)));
  testing::DevBuf<uint16_t> x(size_t(4 * 128)), out(size_t(4 * 128));
  testing::DevBuf<float> logits(size_t(4 * 8));
  const size_t ws_bytes = workspace_size(p);
  testing::DevBuf<uint8_t> ws(ws_bytes);
  DeviceInputs in;
  in.x = x.ptr;
  in.out = out.ptr;
  in.logits = logits.ptr;
  EXPECT_NO_THROW(run(p, dw, in, ws.ptr, ws_bytes, nullptr));
  EXPECT_THROW(run(p, dw, in, ws.ptr, ws_bytes - 1, nullptr), Error);  // workspace too small
  DeviceInputs no_logits = in;
  no_logits.logits = nullptr;
  EXPECT_THROW(run(p, dw, no_logits, ws.ptr, ws_bytes, nullptr), Error);
  DeviceInputs misaligned = in;
  misaligned.x = reinterpret_cast<const uint8_t*>(in.x) + 2;
  EXPECT_THROW(run(p, dw, misaligned, ws.ptr, ws_bytes, nullptr), Error);
  MoeProblem other = p;
  other.hidden = 256;  // weights were packed for H = 128
  EXPECT_THROW(run(other, dw, in, ws.ptr, workspace_size(other), nullptr), Error);
  MoeProblem bad_k = p;
  bad_k.top_k = 9;
  EXPECT_THROW(run(bad_k, dw, in, ws.ptr, ws_bytes, nullptr), Error);
  cudaDeviceSynchronize();
}

// Precomputed ids outside [0, E) on the device are skipped, never read or written out of bounds.
TEST(Decode, OutOfRangeDeviceIdsAreIgnored) {
  GPU_TEST_PREAMBLE();
  Case c{"oob", 128, 64, 8, 2, 3, Format::nvfp4, RoutingMethod::precomputed};
  const MoeProblem p = make_problem(c);
  const MoeWeights w = random_weights(p, 5);
  auto data = random_inputs(p, 6);
  data.ids[1] = 1000;
  data.ids[2] = -5;
  DeviceWeights dw(prepack(p, w));
  const auto got = run_gpu(p, dw, data);
  // Reference with those slots dropped (weight 0 on a valid expert).
  auto fixed = data;
  fixed.ids[1] = (fixed.ids[0] + 1) % 8;
  fixed.weights[1] = 0.0f;
  fixed.ids[2] = (fixed.ids[3] + 1) % 8;
  fixed.weights[2] = 0.0f;
  const auto ref = moe_reference(p, w, testing::host_inputs(p, fixed));
  const auto st = compare(got, ref.out);
  EXPECT_EQ(st.nan_count, 0);
  EXPECT_LT(st.rel_l2, 1e-2);
}

}  // namespace
}  // namespace fp4moe
