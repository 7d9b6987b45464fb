// Routing methods, activations and the W4A4 block quantizer on hand-worked cases.
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/reference.h"

namespace fp4moe {
namespace {

MoeProblem routing_problem(RoutingMethod m, int E, int k, int64_t T = 1) {
  MoeProblem p;
  p.tokens = T;
  p.hidden = 32;
  p.intermediate = 32;
  p.num_experts = E;
  p.top_k = k;
  p.routing.method = m;
  return p;
}

struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

Routed route(const MoeProblem& p, const void* logits, const float* bias = nullptr) {
  Routed r;
  r.ids.assign(static_cast<size_t>(p.tokens * p.top_k), -7);
  r.weights.assign(r.ids.size(), std::numeric_limits<float>::quiet_NaN());
  route_reference(p, logits, bias, r.ids.data(), r.weights.data());
  return r;
}

// Routing math is a handful of fp32 operations: a few ulp.
constexpr float kTol = 1e-6f;

TEST(Routing, SoftmaxTopkRenormalized) {
  // softmax = {1, 3, 2, 4} / 10; top-2 = experts 3 (0.4) and 1 (0.3); renormalized 4/7, 3/7.
  MoeProblem p = routing_problem(RoutingMethod::softmax_topk, 4, 2);
  const std::vector<float> logits{0.0f, std::log(3.0f), std::log(2.0f), std::log(4.0f)};
  Routed r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 1}));
  EXPECT_NEAR(r.weights[0], 4.0f / 7.0f, kTol);
  EXPECT_NEAR(r.weights[1], 3.0f / 7.0f, kTol);
  p.routing.renormalize = false;
  r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 1}));
  EXPECT_NEAR(r.weights[0], 0.4f, kTol);
  EXPECT_NEAR(r.weights[1], 0.3f, kTol);
}

TEST(Routing, TiesGoToTheLowerExpert) {
  MoeProblem p = routing_problem(RoutingMethod::softmax_topk, 5, 3);
  const std::vector<float> logits{1.0f, 3.0f, 2.0f, 3.0f, 2.0f};
  Routed r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3, 2}));
  p.routing.method = RoutingMethod::topk_softmax;
  const std::vector<float> flat{2.0f, 2.0f, 2.0f, 2.0f, 2.0f};
  r = route(p, flat.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{0, 1, 2}));
  for (float w : r.weights) EXPECT_NEAR(w, 1.0f / 3.0f, kTol);
}

TEST(Routing, TopkSoftmaxAddsTheBiasBeforeSelection) {
  // logits + bias = {1, 2, 0.5, 3}: top-2 = {3, 1}; softmax over {3, 2}.
  MoeProblem p = routing_problem(RoutingMethod::topk_softmax, 4, 2);
  p.routing.has_bias = true;
  const std::vector<float> logits{1.0f, 2.0f, 3.0f, 0.0f};
  const std::vector<float> bias{0.0f, 0.0f, -2.5f, 3.0f};
  Routed r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{3, 1}));
  const float e = std::exp(1.0f);
  EXPECT_NEAR(r.weights[0], e / (e + 1.0f), kTol);
  EXPECT_NEAR(r.weights[1], 1.0f / (e + 1.0f), kTol);
  // Without the bias, expert 2 wins.
  p.routing.has_bias = false;
  r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 1}));
}

TEST(Routing, DeepseekWeightsComeFromSigmoidNotTheBiasedScore) {
  // One group. s = {0.5, 0.75, 0.25, 0.5}; c = s + bias = {0.5, 0.25, 0.85, 0.5}. Top-2 of c:
  // expert 2, then 0 (ties 3 at 0.5). Weights = s / (0.25 + 0.5) * 2.5.
  MoeProblem p = routing_problem(RoutingMethod::deepseek_v3, 4, 2);
  p.routing.has_bias = true;
  p.routing.routed_scaling_factor = 2.5f;
  const std::vector<float> logits{0.0f, std::log(3.0f), -std::log(3.0f), 0.0f};
  const std::vector<float> bias{0.0f, -0.5f, 0.6f, 0.0f};
  Routed r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 0}));
  EXPECT_NEAR(r.weights[0], 0.25f / 0.75f * 2.5f, 4 * kTol);
  EXPECT_NEAR(r.weights[1], 0.5f / 0.75f * 2.5f, 4 * kTol);
}

TEST(Routing, DeepseekWithoutRenormalizeStillScales) {
  // norm_topk_prob = false (transformers' DeepseekV3TopkRouter / Glm4MoeTopkRouter): the weights
  // are s at the chosen experts times the scaling factor, not divided by their sum.
  MoeProblem p = routing_problem(RoutingMethod::deepseek_v3, 4, 2);
  p.routing.has_bias = true;
  p.routing.routed_scaling_factor = 2.5f;
  p.routing.renormalize = false;
  const std::vector<float> logits{0.0f, std::log(3.0f), -std::log(3.0f), 0.0f};
  const std::vector<float> bias{0.0f, -0.5f, 0.6f, 0.0f};
  Routed r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 0}));
  EXPECT_NEAR(r.weights[0], 0.25f * 2.5f, 4 * kTol);
  EXPECT_NEAR(r.weights[1], 0.5f * 2.5f, 4 * kTol);
  p.routing.routed_scaling_factor = 1.0f;
  r = route(p, logits.data(), bias.data());
  EXPECT_NEAR(r.weights[0], 0.25f, kTol);
  EXPECT_NEAR(r.weights[1], 0.5f, kTol);
}

TEST(Routing, DeepseekGroupsRankByTheSumOfTheirTwoBest) {
  // All logits 0: s = 0.5, c = 0.5 + bias (exact binary fractions). Group 0 = {0.875, 0.125,
  // 0.125, 0.125}: best-two sum 1.0 (max 0.875, full sum 1.25). Group 1 = {0.5625, 0.5625, 0, 0}:
  // best-two sum 1.125. Only the best-two sum keeps group 1.
  MoeProblem p = routing_problem(RoutingMethod::deepseek_v3, 8, 2);
  p.routing.n_group = 2;
  p.routing.topk_group = 1;
  p.routing.has_bias = true;
  const std::vector<float> logits(8, 0.0f);
  const std::vector<float> bias{0.375f, -0.375f, -0.375f, -0.375f, 0.0625f, 0.0625f, -0.5f, -0.5f};
  Routed r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{4, 5}));
  EXPECT_FLOAT_EQ(r.weights[0], 0.5f);
  EXPECT_FLOAT_EQ(r.weights[1], 0.5f);
}

TEST(Routing, DeepseekGroupTiesGoToTheLowerGroup) {
  // Groups of 2; c = {0.625, 0.5 | 0.75, 0.375 | 0.5, 0.5625 | 0.6875, 0.6875}; group scores
  // {1.125, 1.125, 1.0625, 1.375}: keep group 3, then group 0 over group 1 (tie). Expert 2 has the
  // best c of all but its group is dropped. Top-2 among {0, 1, 6, 7}: 6, 7.
  MoeProblem p = routing_problem(RoutingMethod::deepseek_v3, 8, 2);
  p.routing.n_group = 4;
  p.routing.topk_group = 2;
  p.routing.has_bias = true;
  p.routing.routed_scaling_factor = 2.0f;
  const std::vector<float> logits(8, 0.0f);
  const std::vector<float> bias{0.125f, 0.0f, 0.25f, -0.125f, 0.0f, 0.0625f, 0.1875f, 0.1875f};
  Routed r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{6, 7}));
  EXPECT_FLOAT_EQ(r.weights[0], 1.0f);
  EXPECT_FLOAT_EQ(r.weights[1], 1.0f);
  // With both groups 0 and 1 kept (topk_group 3), expert 2 wins.
  p.routing.topk_group = 3;
  r = route(p, logits.data(), bias.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{2, 6}));
}

TEST(Routing, Llama4TopOneWithSigmoidWeight) {
  MoeProblem p = routing_problem(RoutingMethod::llama4, 4, 1, 2);
  const std::vector<float> logits{0.5f, 2.0f, 2.0f, -1.0f, /* token 1 */ -3.0f, -2.0f, -4.0f, -2.5f};
  Routed r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 1}));
  EXPECT_NEAR(r.weights[0], 1.0f / (1.0f + std::exp(-2.0f)), kTol);
  EXPECT_NEAR(r.weights[1], 1.0f / (1.0f + std::exp(2.0f)), kTol);
}

TEST(Routing, SigmoidTopk) {
  // s = {0.5, 0.75, 0.25, sigmoid(1)}: top-2 = {1, 3}.
  MoeProblem p = routing_problem(RoutingMethod::sigmoid_topk, 4, 2);
  const std::vector<float> logits{0.0f, std::log(3.0f), -std::log(3.0f), 1.0f};
  const float s1 = 1.0f / (1.0f + std::exp(-1.0f));
  p.routing.renormalize = false;
  Routed r = route(p, logits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 3}));
  EXPECT_NEAR(r.weights[0], 0.75f, kTol);
  EXPECT_NEAR(r.weights[1], s1, kTol);
  p.routing.renormalize = true;
  r = route(p, logits.data());
  EXPECT_NEAR(r.weights[0], 0.75f / (0.75f + s1), kTol);
  EXPECT_NEAR(r.weights[1], s1 / (0.75f + s1), kTol);
}

TEST(Routing, Bf16LogitsAreDecodedExactly) {
  // 0x3FC0 = 1.5, 0x4040 = 3.0, 0x4000 = 2.0, 0xBF80 = -1.0.
  MoeProblem p = routing_problem(RoutingMethod::softmax_topk, 4, 2);
  p.routing.logits_dtype = DType::bf16;
  p.routing.renormalize = false;
  const std::vector<uint16_t> bits{0x3FC0, 0x4040, 0x4000, 0xBF80};
  Routed r = route(p, bits.data());
  EXPECT_EQ(r.ids, (std::vector<int32_t>{1, 2}));
  const double z = std::exp(1.5) + std::exp(3.0) + std::exp(2.0) + std::exp(-1.0);
  EXPECT_NEAR(r.weights[0], std::exp(3.0) / z, kTol);
  EXPECT_NEAR(r.weights[1], std::exp(2.0) / z, kTol);

  // Every method: bf16 logits route exactly like their fp32 values.
  std::mt19937_64 rng(11);
  std::normal_distribution<float> nd(0.0f, 2.0f);
  for (RoutingMethod m : {RoutingMethod::softmax_topk, RoutingMethod::topk_softmax,
                          RoutingMethod::deepseek_v3, RoutingMethod::llama4,
                          RoutingMethod::sigmoid_topk}) {
    SCOPED_TRACE(std::string(to_string(m)));
    MoeProblem q = routing_problem(m, 16, m == RoutingMethod::llama4 ? 1 : 4, 5);
    q.routing.n_group = m == RoutingMethod::deepseek_v3 ? 4 : 1;
    q.routing.topk_group = m == RoutingMethod::deepseek_v3 ? 2 : 1;
    std::vector<uint16_t> b(80);
    std::vector<float> f(80);
    for (size_t i = 0; i < b.size(); ++i) {
      b[i] = float_to_bf16(nd(rng));
      f[i] = bf16_to_float(b[i]);
    }
    q.routing.logits_dtype = DType::bf16;
    Routed rb = route(q, b.data());
    q.routing.logits_dtype = DType::f32;
    Routed rf = route(q, f.data());
    EXPECT_EQ(rb.ids, rf.ids);
    EXPECT_EQ(rb.weights, rf.weights);
  }
}

TEST(Routing, RandomLogitsGiveDistinctOrderedIds) {
  std::mt19937_64 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  for (RoutingMethod m : {RoutingMethod::softmax_topk, RoutingMethod::topk_softmax,
                          RoutingMethod::deepseek_v3, RoutingMethod::sigmoid_topk}) {
    SCOPED_TRACE(std::string(to_string(m)));
    const int E = 64, k = 6;
    MoeProblem p = routing_problem(m, E, k, 20);
    if (m == RoutingMethod::deepseek_v3) {
      p.routing.n_group = 8;
      p.routing.topk_group = 3;
    }
    std::vector<float> logits(static_cast<size_t>(20 * E));
    for (float& v : logits) v = nd(rng);
    Routed r = route(p, logits.data());
    for (int t = 0; t < 20; ++t) {
      std::set<int> seen;
      float sum = 0;
      for (int j = 0; j < k; ++j) {
        const int id = r.ids[t * k + j];
        ASSERT_GE(id, 0);
        ASSERT_LT(id, E);
        seen.insert(id);
        sum += r.weights[t * k + j];
        // Scores are monotone in the logit for every method without a bias: descending.
        if (j > 0) EXPECT_GE(logits[t * E + r.ids[t * k + j - 1]], logits[t * E + id]);
      }
      EXPECT_EQ(seen.size(), static_cast<size_t>(k));
      if (m != RoutingMethod::deepseek_v3 || p.routing.routed_scaling_factor == 1.0f)
        EXPECT_NEAR(sum, 1.0f, 1e-5f);
      if (m == RoutingMethod::deepseek_v3) {
        // Every chosen expert lies in one of at most topk_group groups.
        std::set<int> groups;
        for (int j = 0; j < k; ++j) groups.insert(r.ids[t * k + j] / (E / 8));
        EXPECT_LE(groups.size(), 3u);
      }
    }
  }
}

TEST(Routing, BadCallsThrow) {
  MoeProblem p = routing_problem(RoutingMethod::precomputed, 4, 2);
  int32_t ids[2];
  float w[2];
  const float logits[4] = {0, 0, 0, 0};
  EXPECT_THROW(route_reference(p, logits, nullptr, ids, w), Error);
  p.routing.method = RoutingMethod::softmax_topk;
  EXPECT_THROW(route_reference(p, nullptr, nullptr, ids, w), Error);
  p.routing.method = RoutingMethod::topk_softmax;
  p.routing.has_bias = true;
  EXPECT_THROW(route_reference(p, logits, nullptr, ids, w), Error);
  p.tokens = 0;  // nothing to route: no pointer is read
  EXPECT_NO_THROW(route_reference(p, nullptr, nullptr, nullptr, nullptr));
}

TEST(Activation, HandComputedPoints) {
  ActivationConfig a;
  a.kind = Activation::swiglu;
  EXPECT_NEAR(activation_reference(a, 1.0f, 2.0f), 1.4621171572600098, 1e-6);
  EXPECT_NEAR(activation_reference(a, -2.0f, 1.0f), -0.2384058440442351, 1e-6);
  EXPECT_EQ(activation_reference(a, 0.0f, 5.0f), 0.0f);

  a.kind = Activation::swiglu_oai;  // alpha 1.702, limit 7
  EXPECT_NEAR(activation_reference(a, 1.0f, 0.5f), 1.268693648899232, 1e-6);
  // gate clamped above at 7 and up into [-7, 7]: (-7 + 1) * 7 * sigmoid(1.702 * 7)
  EXPECT_NEAR(activation_reference(a, 10.0f, -9.0f), -41.99971876981991, 4e-5);
  // gate not clamped below; up clamped to 7: 8 * -3 * sigmoid(-5.106)
  EXPECT_NEAR(activation_reference(a, -3.0f, 8.0f), -0.14457047766228776, 1e-6);
  a.limit = 1.0f;
  a.alpha = 1.0f;
  EXPECT_NEAR(activation_reference(a, 2.0f, 3.0f), 2.0 * 1.0 * 0.7310585786300049, 1e-6);

  a.kind = Activation::relu2;
  EXPECT_EQ(activation_reference(a, 100.0f, 3.0f), 9.0f);
  EXPECT_EQ(activation_reference(a, 100.0f, -2.0f), 0.0f);
  EXPECT_EQ(activation_reference(a, -5.0f, 0.5f), 0.25f);

  a.kind = Activation::geglu_tanh;
  EXPECT_NEAR(activation_reference(a, 1.0f, 2.0f), 1.6823839812165535, 1e-6);
  EXPECT_NEAR(activation_reference(a, -1.5f, 3.0f), -0.3012852690593012, 1e-6);
}

TEST(FakeQuantize, HandWorkedBlocks) {
  // amax 6 with g = 1: block scale 1, elements round to E2M1 with ties to even.
  const float in[16] = {6.0f, 0.25f, 0.75f, 5.0f, 2.5f, -1.25f, -6.0f, 0.0f,
                        3.0f, 1.75f, -0.1f, 4.5f, -3.5f, 0.5f, 1.0f, -0.0f};
  const float want[16] = {6.0f, 0.0f, 1.0f, 4.0f, 2.0f, -1.0f, -6.0f, 0.0f,
                          3.0f, 2.0f, -0.0f, 4.0f, -4.0f, 0.5f, 1.0f, -0.0f};
  float out[16];
  fake_quantize_nvfp4_block(in, out, 1.0f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(out[i], want[i]) << "element " << i;
  // g = 0.5 and amax 3: scale 3 / (6 * 0.5) = 1, denominator 0.5: values are multiples of 0.25.
  float half[16];
  for (int i = 0; i < 16; ++i) half[i] = in[i] * 0.5f;
  fake_quantize_nvfp4_block(half, out, 0.5f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(out[i], want[i] * 0.5f) << "element " << i;
  // amax 7, g = 1: scale 7/6 rounds to E4M3 1.125; 7 / 1.125 saturates at 6 -> 6.75.
  float seven[16] = {7.0f};
  fake_quantize_nvfp4_block(seven, out, 1.0f);
  EXPECT_EQ(out[0], 6.75f);
  for (int i = 1; i < 16; ++i) EXPECT_EQ(out[i], 0.0f);
  // All-zero block.
  const float zeros[16] = {};
  fake_quantize_nvfp4_block(zeros, out, 0.01f);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(out[i], 0.0f);
  EXPECT_THROW(fake_quantize_nvfp4_block(in, out, 0.0f), Error);
}

TEST(FakeQuantize, MatchesTheLibraryQuantizerBitwise) {
  std::mt19937_64 rng(23);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::uniform_real_distribution<float> mag(-6.0f, 3.0f);
  for (int trial = 0; trial < 500; ++trial) {
    float in[16], out[16];
    const float spread = std::pow(10.0f, mag(rng));
    for (float& v : in) v = nd(rng) * spread;
    const float g = 4.0f / (6.0f * 448.0f) * std::pow(10.0f, mag(rng) / 3.0f);
    fake_quantize_nvfp4_block(in, out, g);
    const std::vector<float> lib = dequantize(quantize_nvfp4(in, 1, 16, g));
    for (int i = 0; i < 16; ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(out[i]), std::bit_cast<uint32_t>(lib[i]))
          << "trial " << trial << " element " << i << ": " << out[i] << " vs " << lib[i];
  }
}

}  // namespace
}  // namespace fp4moe
