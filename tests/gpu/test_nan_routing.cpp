// Non-finite inputs on the device (SPEC "Non-finite inputs"): a NaN logit, router bias, top-k weight
// or hidden state makes that token's output NaN, every other token's output stays bitwise what it is
// without the NaN, and the GPU routing never produces an out-of-range or duplicate id (the kernel
// would read out of bounds; compute-sanitizer in scripts/gpu_checks.sh catches that).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>

#include "gpu/gpu_harness.h"

namespace fp4moe {
namespace {

using testing::random_inputs;
using testing::run_gpu;

struct NanCase {
  std::string name;
  RoutingMethod method;
  int k;
  int64_t T;  // 5: each block routes the chunk itself; 70: routed once in global memory, two chunks
};

void PrintTo(const NanCase& c, std::ostream* os) { *os << c.name; }

MoeProblem nan_problem(const NanCase& c) {
  MoeProblem p;
  p.tokens = c.T;
  p.hidden = 128;
  p.intermediate = 64;
  p.num_experts = 16;
  p.top_k = c.k;
  p.routing.method = c.method;
  if (c.method == RoutingMethod::topk_softmax) p.routing.has_bias = true;
  if (c.method == RoutingMethod::deepseek_v3) {
    p.routing.has_bias = true;
    p.routing.n_group = 4;
    p.routing.topk_group = 2;
    p.routing.routed_scaling_factor = 2.5f;
  }
  return p;
}

bool is_nan_bf16(uint16_t b) { return std::isnan(bf16_to_float(b)); }

// Token `bad` must be NaN in every element, every other token bitwise equal to `clean`.
void expect_only_token_nan(const std::vector<uint16_t>& got, const std::vector<uint16_t>& clean, int64_t T,
                           int64_t H, int64_t bad, const std::string& what) {
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const size_t i = size_t(t * H + h);
      if (t == bad) {
        ASSERT_TRUE(is_nan_bf16(got[i])) << what << ": token " << t << " element " << h << " is "
                                         << bf16_to_float(got[i]) << ", expected NaN";
      } else {
        ASSERT_EQ(got[i], clean[i]) << what << ": token " << t << " element " << h << " changed: "
                                    << bf16_to_float(got[i]) << " vs " << bf16_to_float(clean[i]);
      }
    }
}

class NanRoutingOnDevice : public ::testing::TestWithParam<NanCase> {};

TEST_P(NanRoutingOnDevice, NanLogitMakesOnlyThatTokenNan) {
  GPU_TEST_PREAMBLE();
  const NanCase& c = GetParam();
  const MoeProblem p = nan_problem(c);
  const MoeWeights w = random_weights(p, 77);
  DeviceWeights dw(prepack(p, w));
  auto data = random_inputs(p, 78);
  const std::vector<uint16_t> clean = run_gpu(p, dw, data);
  for (uint16_t b : clean) ASSERT_FALSE(is_nan_bf16(b)) << c.name << ": NaN without NaN input";
  const int64_t bad = c.T / 2;
  data.logits[size_t(bad * p.num_experts + 5)] = std::numeric_limits<float>::quiet_NaN();
  expect_only_token_nan(run_gpu(p, dw, data), clean, p.tokens, p.hidden, bad, c.name + " NaN logit");
  // The same on the CPU reference (both must agree on which tokens are NaN).
  const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
  for (int64_t h = 0; h < p.hidden; ++h) ASSERT_TRUE(std::isnan(ref.out_f32[size_t(bad * p.hidden + h)]));
  if (p.routing.has_bias) {
    auto biased = random_inputs(p, 78);
    biased.bias[3] = std::numeric_limits<float>::quiet_NaN();
    const auto got = run_gpu(p, dw, biased);
    for (size_t i = 0; i < got.size(); ++i)
      ASSERT_TRUE(is_nan_bf16(got[i])) << c.name << ": NaN router bias, element " << i << " is finite";
  }
}

TEST_P(NanRoutingOnDevice, AllNanLogitsStillPickValidIds) {
  // Every score NaN: before the fix the arg-max found no candidate and wrote id -1.
  GPU_TEST_PREAMBLE();
  const NanCase& c = GetParam();
  const MoeProblem p = nan_problem(c);
  DeviceWeights dw(prepack(p, random_weights(p, 79)));
  auto data = random_inputs(p, 80);
  const std::vector<uint16_t> clean = run_gpu(p, dw, data);
  const int64_t bad = 1;
  for (int e = 0; e < p.num_experts; ++e)
    data.logits[size_t(bad * p.num_experts + e)] = std::numeric_limits<float>::quiet_NaN();
  expect_only_token_nan(run_gpu(p, dw, data), clean, p.tokens, p.hidden, bad, c.name + " all-NaN logits");
}

INSTANTIATE_TEST_SUITE_P(
    Methods, NanRoutingOnDevice,
    ::testing::Values(NanCase{"softmax_topk_T5", RoutingMethod::softmax_topk, 4, 5},
                      NanCase{"softmax_topk_T70", RoutingMethod::softmax_topk, 4, 70},
                      NanCase{"sigmoid_topk_T5", RoutingMethod::sigmoid_topk, 4, 5},
                      NanCase{"topk_softmax_T5", RoutingMethod::topk_softmax, 4, 5},
                      NanCase{"topk_softmax_T70", RoutingMethod::topk_softmax, 4, 70},
                      NanCase{"deepseek_v3_T5", RoutingMethod::deepseek_v3, 4, 5},
                      NanCase{"deepseek_v3_T70", RoutingMethod::deepseek_v3, 4, 70},
                      NanCase{"llama4_T5", RoutingMethod::llama4, 1, 5}),
    [](const auto& info) { return info.param.name; });

TEST(NanInputsOnDevice, NanTopkWeightOrHiddenStateMakesOnlyThatTokenNan) {
  GPU_TEST_PREAMBLE();
  MoeProblem p = nan_problem({"precomputed", RoutingMethod::precomputed, 4, 9});
  DeviceWeights dw(prepack(p, random_weights(p, 81)));
  auto data = random_inputs(p, 82);
  const std::vector<uint16_t> clean = run_gpu(p, dw, data);
  auto nan_weight = data;
  nan_weight.weights[size_t(3 * p.top_k + 2)] = std::numeric_limits<float>::quiet_NaN();
  expect_only_token_nan(run_gpu(p, dw, nan_weight), clean, p.tokens, p.hidden, 3, "NaN top-k weight");
  auto nan_x = data;
  nan_x.x[size_t(6 * p.hidden + 17)] = 0x7FC0;  // bf16 NaN
  expect_only_token_nan(run_gpu(p, dw, nan_x), clean, p.tokens, p.hidden, 6, "NaN hidden state");
}

}  // namespace
}  // namespace fp4moe
