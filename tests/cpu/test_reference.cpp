// The CPU reference layer against a plain double-precision loop written here, with its own
// dequantization (QuantizedMatrix::element), activations and W4A4 quantization (the library
// quantizer), sharing only the routing.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/reference.h"
#include "fp4moe/weights.h"

namespace fp4moe {
namespace {

double naive_act(const ActivationConfig& a, double gate, double up) {
  const auto sig = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  switch (a.kind) {
    case Activation::swiglu:
      return gate * sig(gate) * up;
    case Activation::swiglu_oai: {
      const double g = std::min<double>(gate, a.limit);
      const double u = std::max<double>(-a.limit, std::min<double>(up, a.limit));
      return (u + 1.0) * g * sig(a.alpha * g);
    }
    case Activation::relu2:
      return up > 0 ? up * up : 0.0;
    case Activation::geglu_tanh:
      return 0.5 * gate * (1.0 + std::tanh(std::sqrt(2.0 / M_PI) * (gate + 0.044715 * gate * gate * gate))) * up;
  }
  return std::numeric_limits<double>::quiet_NaN();
}

// NVFP4 quantize-dequantize of a vector through the library quantizer (one row).
std::vector<float> quant_dequant(const std::vector<float>& v, float g) {
  return dequantize(quantize_nvfp4(v.data(), 1, static_cast<int64_t>(v.size()), g));
}

// out[T, H] in double, straight from SPEC "The layer".
std::vector<double> naive_moe(const MoeProblem& p, const MoeWeights& w, const std::vector<uint16_t>& x,
                              const std::vector<int32_t>& ids, const std::vector<float>& wts) {
  const int64_t T = p.tokens, H = p.hidden, I = p.intermediate;
  const int k = p.top_k;
  const bool llama4 = p.routing.method == RoutingMethod::llama4;
  std::vector<double> out(static_cast<size_t>(T * H), 0.0);
  for (int64_t t = 0; t < T; ++t) {
    for (int j = 0; j < k; ++j) {
      const int e = ids[t * k + j];
      const float wt = wts[t * k + j];
      if (e < p.local_expert_offset || e >= p.local_expert_offset + p.local_experts()) continue;
      const ExpertWeights& ew = w.experts[e - p.local_expert_offset];
      std::vector<float> xin(static_cast<size_t>(H));
      for (int64_t h = 0; h < H; ++h) {
        xin[h] = bf16_to_float(x[t * H + h]);
        if (llama4) xin[h] *= wt;
      }
      if (p.input_mode == InputMode::w4a4) xin = quant_dequant(xin, ew.input_scale13);
      std::vector<float> a(static_cast<size_t>(I));
      for (int64_t i = 0; i < I; ++i) {
        double g = 0, u = 0;
        for (int64_t h = 0; h < H; ++h) {
          if (p.gated()) g += static_cast<double>(ew.gate.element(i, h)) * xin[h];
          u += static_cast<double>(ew.up.element(i, h)) * xin[h];
        }
        if (p.has_bias) {
          if (p.gated()) g += ew.gate_bias[i];
          u += ew.up_bias[i];
        }
        a[i] = bf16_to_float(float_to_bf16(static_cast<float>(naive_act(p.activation, g, u))));
      }
      if (p.input_mode == InputMode::w4a4) a = quant_dequant(a, ew.input_scale2);
      for (int64_t h = 0; h < H; ++h) {
        double y = 0;
        for (int64_t i = 0; i < I; ++i) y += static_cast<double>(ew.down.element(h, i)) * a[i];
        if (p.has_bias) y += ew.down_bias[h];
        out[t * H + h] += llama4 ? y : wt * y;
      }
    }
  }
  return out;
}

std::vector<uint16_t> random_x(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<uint16_t> x(static_cast<size_t>(n));
  for (auto& v : x) v = float_to_bf16(nd(rng));
  return x;
}

std::vector<float> random_f32(int64_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, stddev);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& f : v) f = nd(rng);
  return v;
}

double rel_l2(const std::vector<float>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * (got[i] - want[i]);
    den += want[i] * want[i];
  }
  return den == 0 ? std::sqrt(num) : std::sqrt(num / den);
}

MoeProblem small(int64_t T = 6) {
  MoeProblem p;
  p.tokens = T;
  p.hidden = 64;
  p.intermediate = 32;
  p.num_experts = 8;
  p.top_k = 2;
  return p;
}

// The reference and the loop above differ only in fp32 vs fp64 roundings: ~1e-7 relative (3e-8
// measured). Through them a bf16 rounding of `a` could flip by one ulp, moving the output by up to
// 2^-8 / sqrt(I) ~ 7e-4 for I = 32, but such a flip is a ~1e-5 event per element and the seeds
// below produce none. Leaving out the bf16 rounding of `a` moves the output by ~1e-3, a wrong
// scale, bias, slot, expert or weight by 1e-2 or more.
constexpr double kTol = 1e-4;

struct Case {
  std::string name;
  MoeProblem p;
};

void check_case(const MoeProblem& p, uint64_t seed) {
  SCOPED_TRACE(p.to_string());
  const MoeWeights w = random_weights(p, seed);
  const std::vector<uint16_t> x = random_x(p.tokens * p.hidden, seed + 1);
  const std::vector<float> logits = random_f32(p.tokens * p.num_experts, 1.0f, seed + 2);
  std::vector<uint16_t> logits_bf16(logits.size());
  for (size_t i = 0; i < logits.size(); ++i) logits_bf16[i] = float_to_bf16(logits[i]);
  const void* logits_ptr = p.routing.logits_dtype == DType::bf16
                               ? static_cast<const void*>(logits_bf16.data())
                               : static_cast<const void*>(logits.data());
  const std::vector<float> bias = random_f32(p.num_experts, 0.5f, seed + 3);
  HostInputs in;
  in.x = x.data();
  in.logits = logits_ptr;
  in.router_bias = p.routing.has_bias ? bias.data() : nullptr;
  std::vector<int32_t> pre_ids;
  std::vector<float> pre_w;
  if (p.routing.method == RoutingMethod::precomputed) {
    // Distinct random ids over all E (some outside the local range) with random weights.
    std::mt19937_64 rng(seed + 4);
    for (int64_t t = 0; t < p.tokens; ++t) {
      std::vector<int32_t> perm(static_cast<size_t>(p.num_experts));
      for (int e = 0; e < p.num_experts; ++e) perm[e] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < p.top_k; ++j) {
        pre_ids.push_back(perm[j]);
        pre_w.push_back(std::uniform_real_distribution<float>(0.1f, 1.0f)(rng));
      }
    }
    in.topk_ids = pre_ids.data();
    in.topk_weights = pre_w.data();
  }
  const ReferenceResult r = moe_reference(p, w, in, 2);
  ASSERT_EQ(r.out.size(), static_cast<size_t>(p.tokens * p.hidden));
  ASSERT_EQ(r.out_f32.size(), r.out.size());
  ASSERT_EQ(r.topk_ids.size(), static_cast<size_t>(p.tokens * p.top_k));
  if (p.routing.method == RoutingMethod::precomputed) {
    EXPECT_EQ(r.topk_ids, pre_ids);
    EXPECT_EQ(r.topk_weights, pre_w);
  } else {
    std::vector<int32_t> ids(r.topk_ids.size(), -1);
    std::vector<float> wts(r.topk_weights.size());
    route_reference(p, logits_ptr, in.router_bias, ids.data(), wts.data());
    EXPECT_EQ(r.topk_ids, ids);
    EXPECT_EQ(r.topk_weights, wts);
  }
  const std::vector<double> want = naive_moe(p, w, x, r.topk_ids, r.topk_weights);
  double norm = 0;
  for (double v : want) norm += v * v;
  ASSERT_GT(norm, 0.0) << "the case routes nothing to this rank; it would test nothing";
  EXPECT_LT(rel_l2(r.out_f32, want), kTol);
  for (size_t i = 0; i < r.out.size(); ++i) {
    ASSERT_FALSE(std::isnan(r.out_f32[i])) << "element " << i;
    ASSERT_EQ(r.out[i], float_to_bf16(r.out_f32[i])) << "out is out_f32 rounded to bf16, element " << i;
  }
}

TEST(Reference, MatchesThePlainLoop) {
  std::vector<Case> cases;
  cases.push_back({"nvfp4 w4a16 softmax", small()});
  {
    MoeProblem p = small();
    p.input_mode = InputMode::w4a4;
    cases.push_back({"nvfp4 w4a4", p});
  }
  {
    MoeProblem p = small();
    p.format = Format::mxfp4;
    p.activation.kind = Activation::swiglu_oai;
    p.routing.method = RoutingMethod::topk_softmax;
    p.routing.has_bias = true;
    p.has_bias = true;
    cases.push_back({"mxfp4 gpt-oss-like", p});
  }
  {
    MoeProblem p = small();
    p.has_bias = true;
    p.routing.method = RoutingMethod::deepseek_v3;
    p.routing.n_group = 4;
    p.routing.topk_group = 2;
    p.routing.has_bias = true;
    p.routing.routed_scaling_factor = 2.5f;
    p.routing.logits_dtype = DType::f32;
    cases.push_back({"deepseek biases", p});
  }
  {
    MoeProblem p = small();
    p.top_k = 1;
    p.routing.method = RoutingMethod::llama4;
    cases.push_back({"llama4", p});
  }
  {
    MoeProblem p = small();
    p.top_k = 1;
    p.routing.method = RoutingMethod::llama4;
    p.input_mode = InputMode::w4a4;
    cases.push_back({"llama4 w4a4", p});
  }
  {
    MoeProblem p = small();
    p.activation.kind = Activation::relu2;
    p.has_bias = true;
    p.routing.method = RoutingMethod::sigmoid_topk;
    cases.push_back({"relu2", p});
  }
  {
    MoeProblem p = small();
    p.activation.kind = Activation::geglu_tanh;
    p.input_mode = InputMode::w4a4;
    p.has_bias = true;
    cases.push_back({"geglu w4a4 biases", p});
  }
  {
    MoeProblem p = small(9);
    p.routing.method = RoutingMethod::precomputed;
    p.local_expert_offset = 2;
    p.num_local_experts = 3;
    cases.push_back({"precomputed expert parallel", p});
  }
  {
    MoeProblem p = small(5);
    p.format = Format::mxfp4;
    p.local_expert_offset = 5;
    p.num_local_experts = 3;
    p.top_k = 4;
    cases.push_back({"mxfp4 expert parallel", p});
  }
  {
    MoeProblem p = small(3);
    p.hidden = 96;
    p.intermediate = 48;
    p.top_k = 8;
    p.routing.logits_dtype = DType::bf16;
    cases.push_back({"awkward shapes, k = E", p});
  }
  uint64_t seed = 100;
  for (Case& c : cases) {
    SCOPED_TRACE(c.name);
    check_case(c.p, seed);
    seed += 10;
  }
}

TEST(Reference, ThreadCountDoesNotChangeBits) {
  MoeProblem p = small(40);
  p.input_mode = InputMode::w4a4;
  const MoeWeights w = random_weights(p, 7);
  const auto x = random_x(p.tokens * p.hidden, 8);
  const auto logits = random_f32(p.tokens * p.num_experts, 1.0f, 9);
  HostInputs in;
  in.x = x.data();
  in.logits = logits.data();
  const ReferenceResult a = moe_reference(p, w, in, 1);
  for (int threads : {0, 2, 3, 7}) {
    const ReferenceResult b = moe_reference(p, w, in, threads);
    EXPECT_EQ(a.out, b.out) << threads << " threads";
    for (size_t i = 0; i < a.out_f32.size(); ++i)
      ASSERT_EQ(std::bit_cast<uint32_t>(a.out_f32[i]), std::bit_cast<uint32_t>(b.out_f32[i]))
          << threads << " threads, element " << i;
  }
}

TEST(Reference, ExpertParallelRanksSumToTheFullLayer) {
  MoeProblem full = small(12);
  const auto x = random_x(full.tokens * full.hidden, 31);
  const auto logits = random_f32(full.tokens * full.num_experts, 1.0f, 32);
  HostInputs in;
  in.x = x.data();
  in.logits = logits.data();
  const ReferenceResult all = moe_reference(full, random_weights(full, 30), in, 2);
  std::vector<double> sum(all.out_f32.size(), 0.0);
  for (int rank = 0; rank < 2; ++rank) {
    MoeProblem p = full;
    p.local_expert_offset = 4 * rank;
    p.num_local_experts = 4;
    const MoeWeights w = random_weights(p, 30);  // the same experts as the full layer's
    const ReferenceResult r = moe_reference(p, w, in, 2);
    EXPECT_EQ(r.topk_ids, all.topk_ids);
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += r.out_f32[i];
  }
  // Each partial is one fp32 rounding of an fp64 sum: two roundings apart at most.
  for (size_t i = 0; i < sum.size(); ++i)
    ASSERT_NEAR(sum[i], all.out_f32[i], 4e-7 * (std::fabs(all.out_f32[i]) + 1e-3)) << "element " << i;
}

TEST(Reference, SlotsOfOtherRanksContributeNothing) {
  MoeProblem p = small(2);
  p.routing.method = RoutingMethod::precomputed;
  p.local_expert_offset = 4;
  p.num_local_experts = 4;
  const MoeWeights w = random_weights(p, 41);
  const auto x = random_x(p.tokens * p.hidden, 42);
  // Token 0: slot 0 on another rank with a NaN weight, slot 1 local. Token 1: nothing local.
  const std::vector<int32_t> ids{1, 5, 0, 3};
  const std::vector<float> wts{std::numeric_limits<float>::quiet_NaN(), 0.75f, 0.5f, 0.5f};
  HostInputs in;
  in.x = x.data();
  in.topk_ids = ids.data();
  in.topk_weights = wts.data();
  const ReferenceResult r = moe_reference(p, w, in, 2);
  const std::vector<double> want = naive_moe(p, w, x, ids, wts);
  for (int64_t h = 0; h < p.hidden; ++h) {
    ASSERT_FALSE(std::isnan(r.out_f32[h])) << "element " << h;
    EXPECT_NEAR(r.out_f32[h], want[h], 1e-6 * (std::fabs(want[h]) + 1e-3));
    EXPECT_EQ(r.out_f32[p.hidden + h], 0.0f);
  }
}

TEST(Reference, GateAndUpCarryDifferentGlobalScales) {
  const MoeProblem p = small(1);
  const MoeWeights w = random_weights(p, 3);
  for (const ExpertWeights& e : w.experts) {
    EXPECT_NE(e.gate.global_scale, e.up.global_scale);
    EXPECT_GT(e.input_scale13, 0.0f);
  }
  // Deterministic in the seed, different across seeds.
  const MoeWeights again = random_weights(p, 3);
  EXPECT_EQ(again.experts[5].down.data, w.experts[5].down.data);
  EXPECT_EQ(again.experts[5].up.scales, w.experts[5].up.scales);
  EXPECT_NE(random_weights(p, 4).experts[5].down.data, w.experts[5].down.data);
  EXPECT_NO_THROW(validate(p, w));
}

TEST(Reference, ZeroTokensReturnsEmpty) {
  const MoeProblem p = small(0);
  const ReferenceResult r = moe_reference(p, random_weights(p, 1), HostInputs{});
  EXPECT_TRUE(r.out.empty());
  EXPECT_TRUE(r.out_f32.empty());
  EXPECT_TRUE(r.topk_ids.empty());
}

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

#define EXPECT_ERROR_HAS(stmt, text) \
  do {                               \
    const std::string msg_ = error_of([&] { stmt; }); \
    EXPECT_NE(msg_.find(text), std::string::npos) << msg_; \
  } while (0)

TEST(Reference, BadInputsAreRejected) {
  MoeProblem p = small(2);
  p.routing.method = RoutingMethod::precomputed;
  const MoeWeights w = random_weights(p, 1);
  const auto x = random_x(p.tokens * p.hidden, 2);
  std::vector<int32_t> ids{0, 1, 2, 8};
  std::vector<float> wts{0.5f, 0.5f, 0.5f, 0.5f};
  HostInputs in;
  in.x = x.data();
  in.topk_ids = ids.data();
  in.topk_weights = wts.data();
  EXPECT_ERROR_HAS(moe_reference(p, w, in), "topk_ids[1][1] = 8 is outside [0, num_experts = 8)");
  ids[3] = -1;
  EXPECT_ERROR_HAS(moe_reference(p, w, in), "(token 1, slot 1)");
  ids[3] = 3;
  EXPECT_NO_THROW(moe_reference(p, w, in));
  in.topk_ids = nullptr;
  EXPECT_ERROR_HAS(moe_reference(p, w, in), "topk_ids or topk_weights is null");
  in.topk_ids = ids.data();
  in.x = nullptr;
  EXPECT_ERROR_HAS(moe_reference(p, w, in), "x is null");
  in.x = x.data();

  // Weights that do not match the problem.
  MoeWeights bad = w;
  bad.experts[3].gate = bad.experts[3].down;
  EXPECT_ERROR_HAS(moe_reference(p, bad, in), "expert 3 gate has shape [64, 32], expected [32, 64]");
  bad = w;
  bad.experts.pop_back();
  EXPECT_ERROR_HAS(moe_reference(p, bad, in), "weights hold 7 experts");
  bad = w;
  bad.experts[2].up.data.pop_back();
  EXPECT_ERROR_HAS(moe_reference(p, bad, in), "expert 2 up");
  bad = w;
  bad.experts[1].down_bias.assign(64, 0.0f);
  EXPECT_ERROR_HAS(moe_reference(p, bad, in), "expert 1 down_bias");
  MoeProblem biased = p;
  biased.has_bias = true;
  EXPECT_ERROR_HAS(moe_reference(biased, w, in), "expert 0 gate_bias has 0 values, expected 32");
  MoeProblem mx = p;
  mx.format = Format::mxfp4;
  EXPECT_ERROR_HAS(moe_reference(mx, w, in), "weights are nvfp4 but the problem is mxfp4");
  // K not a multiple of the block, W4A4 with MXFP4.
  MoeProblem odd = p;
  odd.hidden = 72;
  EXPECT_ERROR_HAS(moe_reference(odd, w, in), "hidden (H) = 72 must be a multiple of 16");
  bad = w;
  bad.experts[0].up.cols = 60;
  EXPECT_ERROR_HAS(moe_reference(p, bad, in), "expert 0 up");
  mx.input_mode = InputMode::w4a4;
  EXPECT_ERROR_HAS(moe_reference(mx, w, in), "needs format nvfp4");
  // W4A4 needs usable input scales.
  MoeProblem a4 = p;
  a4.input_mode = InputMode::w4a4;
  bad = w;
  bad.experts[6].input_scale2 = 0.0f;
  EXPECT_ERROR_HAS(moe_reference(a4, bad, in), "expert 6 input_scale2");
  // Logits routing without logits.
  MoeProblem routed = p;
  routed.routing.method = RoutingMethod::softmax_topk;
  EXPECT_ERROR_HAS(moe_reference(routed, w, in), "logits is null");
}

}  // namespace
}  // namespace fp4moe
