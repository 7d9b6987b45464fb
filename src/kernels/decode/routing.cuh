// Routing on the device: one warp per token, every SPEC routing method. Scores live in registers
// (up to 16 per lane); top-k is k rounds of a warp arg-max (ties to the lower expert index).
#pragma once
#include <cuda_bf16.h>
#include <math.h>

#include "kernels/decode/params.h"

namespace fp4moe::kernels {

struct ArgMax {
  float v;
  int i;
};

// Better = larger value, then lower index; NaN marks a taken or excluded entry and never wins.
__device__ __forceinline__ bool better(float v, int i, const ArgMax& b) {
  return v > b.v || (v == b.v && i < b.i);
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax m) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    ArgMax other{__shfl_xor_sync(0xffffffffu, m.v, o), __shfl_xor_sync(0xffffffffu, m.i, o)};
    if (other.i >= 0 && (m.i < 0 || better(other.v, other.i, m))) m = other;
  }
  return m;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float sigmoidf_exact(float x) { return 1.0f / (1.0f + expf(-x)); }

constexpr int kRouteSlots = kMaxRoutedExperts / 32;  // scores per lane: expert lane + 32 i

// Routes token t into ids_out / tw_out [t * k + j]. Scores live in registers (expert lane + 32 i);
// `scratch` (E floats of this warp's shared memory) is used only for DeepSeek's group scores.
__device__ __noinline__ void route_token(const DecodeParams& p, int t, float* scratch, int lane, int* ids_out,
                                   float* tw_out) {
  const int E = p.E, k = p.k;
  const float kNaN = __int_as_float(0x7fffffff);
  float sel[kRouteSlots], val[kRouteSlots];  // selection score, weight score; NaN sel = not selectable
#pragma unroll
  for (int i = 0; i < kRouteSlots; ++i) {
    const int e = lane + 32 * i;
    sel[i] = kNaN;
    val[i] = 0.0f;
    if (e < E) {
      const float l = p.logits_bf16
                          ? __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.logits)[int64_t(t) * E + e])
                          : reinterpret_cast<const float*>(p.logits)[int64_t(t) * E + e];
      const float b = p.has_router_bias ? p.router_bias[e] : 0.0f;
      float s = l;
      if (p.method == RoutingMethod::topk_softmax) s = l + b;
      if (p.method == RoutingMethod::deepseek_v3 || p.method == RoutingMethod::sigmoid_topk) s = sigmoidf_exact(l);
      val[i] = s;
      sel[i] = p.method == RoutingMethod::deepseek_v3 ? s + b : s;
    }
  }
  if (p.method == RoutingMethod::softmax_topk) {
    float m = -INFINITY;
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i)
      if (lane + 32 * i < E) m = fmaxf(m, val[i]);
    m = warp_max(m);
    float sum = 0.0f;
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i)
      if (lane + 32 * i < E) sum += expf(val[i] - m);
    sum = warp_sum(sum);
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i)
      if (lane + 32 * i < E) {
        val[i] = expf(val[i] - m) / sum;
        sel[i] = val[i];
      }
  }
  if (p.method == RoutingMethod::deepseek_v3 && p.n_group > 1) {
    // Group score: sum of the two largest selection scores of the group; keep topk_group groups.
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i)
      if (lane + 32 * i < E) scratch[lane + 32 * i] = sel[i];
    __syncwarp();
    const int gs = E / p.n_group;
    float score = -INFINITY;
    if (lane < p.n_group) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int e = lane * gs; e < (lane + 1) * gs; ++e) {
        const float v = scratch[e];
        if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
      }
      score = b1 + b2;
    }
    __syncwarp();
    unsigned keep = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      ArgMax m = (lane < p.n_group && !((keep >> lane) & 1)) ? ArgMax{score, lane} : ArgMax{-INFINITY, -1};
      m = warp_argmax(m);
      keep |= 1u << m.i;
    }
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i)
      if (lane + 32 * i < E && !((keep >> ((lane + 32 * i) / gs)) & 1)) sel[i] = kNaN;
  }
  // k rounds of arg-max (larger score, then lower index); lane j keeps the j-th pick.
  unsigned taken = 0;
  int my_id = -1;
  float my_val = 0.0f;
  for (int j = 0; j < k; ++j) {
    ArgMax best{-INFINITY, -1};
    float best_val = 0.0f;
#pragma unroll
    for (int i = 0; i < kRouteSlots; ++i) {
      const float v = sel[i];
      const int e = lane + 32 * i;
      if (v == v && !((taken >> i) & 1) && (best.i < 0 || better(v, e, best))) {
        best = ArgMax{v, e};
        best_val = val[i];
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const ArgMax other{__shfl_xor_sync(0xffffffffu, best.v, o), __shfl_xor_sync(0xffffffffu, best.i, o)};
      const float other_val = __shfl_xor_sync(0xffffffffu, best_val, o);
      if (other.i >= 0 && (best.i < 0 || better(other.v, other.i, best))) {
        best = other;
        best_val = other_val;
      }
    }
    if (best.i >= 0 && (best.i & 31) == lane) taken |= 1u << (best.i >> 5);
    if (lane == j) {
      my_id = best.i;
      my_val = best_val;
    }
  }
  float w = my_val;
  const bool active = lane < k;
  switch (p.method) {
    case RoutingMethod::softmax_topk:
    case RoutingMethod::sigmoid_topk: {
      const float sum = warp_sum(active ? my_val : 0.0f);
      if (p.renormalize) w = my_val / sum;
      break;
    }
    case RoutingMethod::topk_softmax: {
      const float m = warp_max(active ? my_val : -INFINITY);
      const float ex = active ? expf(my_val - m) : 0.0f;
      const float sum = warp_sum(ex);
      w = ex / sum;
      break;
    }
    case RoutingMethod::deepseek_v3: {
      const float sum = warp_sum(active ? my_val : 0.0f);
      w = my_val / (sum + 1e-20f) * p.routed_scaling_factor;
      break;
    }
    case RoutingMethod::llama4: w = sigmoidf_exact(my_val); break;
    default: break;
  }
  if (active) {
    ids_out[t * k + lane] = my_id;
    tw_out[t * k + lane] = w;
  }
  __syncwarp();
}

}  // namespace fp4moe::kernels
