// Host routing, activations and W4A4 activation quantization: the scalar definitions of SPEC
// "Routing methods", "Activations" and "Activation input" that every backend must reproduce.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/reference.h"

namespace fp4moe {
namespace {

float sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }

// NaN scores sort below everything so the selection stays a strict order; the NaN still reaches
// the weights (and the output) of any token that has one.
float order_key(float v) { return std::isnan(v) ? -std::numeric_limits<float>::infinity() : v; }

// Indices of the k largest keys among those with allowed[i], descending, ties to the lower index.
// O(k * n) on purpose: n <= a few hundred and the order is then obvious.
void top_k_indices(const float* keys, int n, int k, const std::vector<bool>* allowed, int* out) {
  std::vector<bool> taken(static_cast<size_t>(n), false);
  for (int j = 0; j < k; ++j) {
    int best = -1;
    for (int i = 0; i < n; ++i) {
      if (taken[i] || (allowed && !(*allowed)[i])) continue;
      if (best < 0 || order_key(keys[i]) > order_key(keys[best])) best = i;
    }
    FP4MOE_CHECK(best >= 0, "top-k found fewer than " << k << " candidates among " << n);
    taken[best] = true;
    out[j] = best;
  }
}

void route_token(const MoeProblem& p, const float* logit, const float* bias, int32_t* ids,
                 float* weights) {
  const int E = p.num_experts;
  const int k = p.top_k;
  const RoutingConfig& r = p.routing;
  std::vector<float> score(static_cast<size_t>(E));
  std::vector<int> idx(static_cast<size_t>(k));
  switch (r.method) {
    case RoutingMethod::softmax_topk: {
      float mx = -std::numeric_limits<float>::infinity();
      for (int e = 0; e < E; ++e) mx = std::max(mx, logit[e]);
      float sum = 0.0f;
      for (int e = 0; e < E; ++e) {
        score[e] = std::exp(logit[e] - mx);
        sum += score[e];
      }
      for (int e = 0; e < E; ++e) score[e] /= sum;
      top_k_indices(score.data(), E, k, nullptr, idx.data());
      float wsum = 0.0f;
      for (int j = 0; j < k; ++j) wsum += score[idx[j]];
      for (int j = 0; j < k; ++j)
        weights[j] = r.renormalize ? score[idx[j]] / wsum : score[idx[j]];
      break;
    }
    case RoutingMethod::sigmoid_topk: {
      for (int e = 0; e < E; ++e) score[e] = sigmoid(logit[e]);
      top_k_indices(score.data(), E, k, nullptr, idx.data());
      float wsum = 0.0f;
      for (int j = 0; j < k; ++j) wsum += score[idx[j]];
      for (int j = 0; j < k; ++j)
        weights[j] = r.renormalize ? score[idx[j]] / wsum : score[idx[j]];
      break;
    }
    case RoutingMethod::topk_softmax: {
      for (int e = 0; e < E; ++e) score[e] = logit[e] + (bias ? bias[e] : 0.0f);
      top_k_indices(score.data(), E, k, nullptr, idx.data());
      // Softmax over the selected k: the first is the largest, so it is the stable shift.
      const float mx = score[idx[0]];
      float sum = 0.0f;
      for (int j = 0; j < k; ++j) {
        weights[j] = std::exp(score[idx[j]] - mx);
        sum += weights[j];
      }
      for (int j = 0; j < k; ++j) weights[j] /= sum;
      break;
    }
    case RoutingMethod::deepseek_v3: {
      std::vector<float> s(static_cast<size_t>(E));
      for (int e = 0; e < E; ++e) {
        s[e] = sigmoid(logit[e]);
        score[e] = s[e] + (bias ? bias[e] : 0.0f);
      }
      const int G = r.n_group;
      const int per_group = E / G;
      std::vector<float> group_score(static_cast<size_t>(G));
      std::vector<int> best2(2);
      for (int g = 0; g < G; ++g) {
        const int m = std::min(2, per_group);
        top_k_indices(score.data() + g * per_group, per_group, m, nullptr, best2.data());
        float gs = 0.0f;
        for (int i = 0; i < m; ++i) gs += score[g * per_group + best2[i]];
        group_score[g] = gs;
      }
      std::vector<int> groups(static_cast<size_t>(r.topk_group));
      top_k_indices(group_score.data(), G, r.topk_group, nullptr, groups.data());
      std::vector<bool> allowed(static_cast<size_t>(E), false);
      for (int g : groups)
        for (int i = 0; i < per_group; ++i) allowed[g * per_group + i] = true;
      top_k_indices(score.data(), E, k, &allowed, idx.data());
      float wsum = 0.0f;
      for (int j = 0; j < k; ++j) wsum += s[idx[j]];
      for (int j = 0; j < k; ++j)
        weights[j] = (r.renormalize ? s[idx[j]] / (wsum + 1e-20f) : s[idx[j]]) * r.routed_scaling_factor;
      break;
    }
    case RoutingMethod::llama4: {
      top_k_indices(logit, E, 1, nullptr, idx.data());
      weights[0] = sigmoid(logit[idx[0]]);
      break;
    }
    case RoutingMethod::precomputed:
      FP4MOE_FAIL("route_reference: routing method 'precomputed' has no logits to route; pass "
                  "topk_ids / topk_weights instead");
  }
  for (int j = 0; j < k; ++j) ids[j] = idx[j];
  // SPEC "Non-finite inputs": a NaN anywhere in the token's scores (a NaN logit or router bias, or
  // inf - inf) makes every weight of the token NaN, so its output is NaN whatever was selected; the
  // ids stay k distinct experts in [0, E) (NaN scores order below every number).
  if (std::any_of(score.begin(), score.end(), [](float v) { return std::isnan(v); }) ||
      (r.method == RoutingMethod::llama4 &&
       std::any_of(logit, logit + E, [](float v) { return std::isnan(v); }))) {
    for (int j = 0; j < k; ++j) weights[j] = std::numeric_limits<float>::quiet_NaN();
  }
}

}  // namespace

void route_reference(const MoeProblem& p, const void* logits, const float* router_bias,
                     int32_t* topk_ids, float* topk_weights) {
  p.validate();
  FP4MOE_CHECK(p.routing.method != RoutingMethod::precomputed,
               "route_reference: routing method 'precomputed' has no logits to route; pass "
               "topk_ids / topk_weights instead");
  if (p.tokens == 0) return;
  FP4MOE_CHECK(logits != nullptr, "route_reference: logits is null for " << p.tokens << " tokens");
  FP4MOE_CHECK(topk_ids != nullptr && topk_weights != nullptr,
               "route_reference: topk_ids and topk_weights outputs must not be null");
  FP4MOE_CHECK(!p.routing.has_bias || router_bias != nullptr,
               "route_reference: routing.has_bias is set but router_bias is null");
  const int E = p.num_experts;
  std::vector<float> row(static_cast<size_t>(E));
  const float* bias = p.routing.has_bias ? router_bias : nullptr;
  for (int64_t t = 0; t < p.tokens; ++t) {
    if (p.routing.logits_dtype == DType::f32) {
      const float* l = static_cast<const float*>(logits) + t * E;
      std::copy(l, l + E, row.begin());
    } else {
      const uint16_t* l = static_cast<const uint16_t*>(logits) + t * E;
      for (int e = 0; e < E; ++e) row[e] = bf16_to_float(l[e]);
    }
    route_token(p, row.data(), bias, topk_ids + t * p.top_k, topk_weights + t * p.top_k);
  }
}

float activation_reference(const ActivationConfig& a, float gate, float up) {
  switch (a.kind) {
    case Activation::swiglu:
      return gate * sigmoid(gate) * up;
    case Activation::swiglu_oai: {
      const float g = std::min(gate, a.limit);
      const float u = std::clamp(up, -a.limit, a.limit);
      return (u + 1.0f) * (g * sigmoid(a.alpha * g));
    }
    case Activation::relu2: {
      const float r = std::max(up, 0.0f);
      return r * r;
    }
    case Activation::geglu_tanh: {
      constexpr float kSqrt2OverPi = 0.7978845608028654f;
      const float inner = kSqrt2OverPi * (gate + 0.044715f * gate * gate * gate);
      return 0.5f * gate * (1.0f + std::tanh(inner)) * up;
    }
  }
  FP4MOE_FAIL("activation_reference: unknown activation " << static_cast<int>(a.kind));
}

void fake_quantize_nvfp4_block(const float* in, float* out, float g) {
  constexpr int kBlock = 16;
  FP4MOE_CHECK(std::isfinite(g) && g > 0.0f,
               "fake_quantize_nvfp4_block: the input scale must be positive and finite, got " << g);
  float amax = 0.0f;
  for (int i = 0; i < kBlock; ++i) amax = std::fmax(amax, std::fabs(in[i]));
  float scale = amax == 0.0f ? 1.0f : amax / (6.0f * g);
  scale = std::fmax(scale, std::ldexp(1.0f, -9));
  const float scale_q = e4m3_to_float(float_to_e4m3(scale));
  const float denom = scale_q * g;
  for (int i = 0; i < kBlock; ++i) {
    // A NaN activation stays NaN so that it reaches the output instead of quantizing to 0.
    if (std::isnan(in[i])) {
      out[i] = in[i];
      continue;
    }
    out[i] = e2m1_to_float(float_to_e2m1(in[i] / denom)) * scale_q * g;
  }
}

}  // namespace fp4moe
