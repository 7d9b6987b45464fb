// Routing on the device: one warp per token, every SPEC routing method. Scores live in two rows of
// shared memory per warp; top-k is k rounds of a warp arg-max of the lanes' best entries (ties to
// the lower expert index).
#pragma once
#include <cuda_bf16.h>
#include <math.h>

#include "fp4moe/types.h"

namespace fp4moe::kernels {

struct ArgMax {
  float v;
  int i;
};

// Better = larger value, then lower index; NaN marks a taken or excluded entry and never wins.
__device__ __forceinline__ bool better(float v, int i, const ArgMax& b) {
  return v > b.v || (v == b.v && i < b.i);
}

// Total order of floats as unsigned keys (larger float, larger key); NaN maps to 0 and never wins.
__device__ __forceinline__ unsigned order_key(float v) {
  const unsigned u = __float_as_uint(v);
  if (v != v) return 0u;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Warp-wide arg-max of the lanes' candidates (i < 0: none): the largest value, then the lowest index.
// NOTES: two hardware warp reductions (redux.sync) replace five rounds of shuffles and branches.
__device__ __forceinline__ ArgMax warp_argmax(ArgMax m) {
  const unsigned key = m.i >= 0 ? order_key(m.v) : 0u;
  const unsigned best = __reduce_max_sync(0xffffffffu, key);
  const unsigned idx = (m.i >= 0 && key == best) ? unsigned(m.i) : 0xffffffffu;
  const unsigned win = __reduce_min_sync(0xffffffffu, idx);
  if (win == 0xffffffffu) return ArgMax{-INFINITY, -1};
  const int owner = __ffs(__ballot_sync(0xffffffffu, idx == win)) - 1;
  return ArgMax{__shfl_sync(0xffffffffu, m.v, owner), int(win)};
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

// Routes token t into ids_out / tw_out [t * k + j]; sel / val are this warp's 2 * E floats of scratch.
// P is any launch-parameter struct with the routing fields (E, k, logits, logits_bf16, router_bias,
// has_router_bias, method, renormalize, n_group, topk_group, routed_scaling_factor).
template <class P>
__device__ inline void route_token(const P& p, int t, float* sel, float* val, int lane, int* ids_out,
                                   float* tw_out) {
  const int E = p.E, k = p.k;
  // NOTES: SPEC "Non-finite inputs". A NaN score (NaN logit or router bias, inf - inf) is selected
  // as -inf, so the k picks stay distinct valid ids (NaN in `sel` marks taken entries), and the
  // token's k weights become NaN at the end.
  bool nan_seen = false;
  // NOTES: the logits (and biases) of four rows of 32 experts are loaded before any is used, so a
  // lane waits for one memory round trip per 128 experts instead of one per 32.
  constexpr int kRows = 4;
  for (int base = 0; base < E; base += 32 * kRows) {
    float lg[kRows], bs[kRows];
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int e = base + 32 * u + lane;
      lg[u] = 0.0f;
      bs[u] = 0.0f;
      if (e < E) {
        lg[u] = p.logits_bf16 ? __bfloat162float(__ldg(reinterpret_cast<const __nv_bfloat16*>(p.logits) + int64_t(t) * E + e))
                              : __ldg(reinterpret_cast<const float*>(p.logits) + int64_t(t) * E + e);
        if (p.has_router_bias) bs[u] = __ldg(p.router_bias + e);
      }
    }
#pragma unroll
    for (int u = 0; u < kRows; ++u) {
      const int e = base + 32 * u + lane;
      if (e >= E) break;
      const float l = lg[u], b = bs[u];
      float s = l;
      switch (p.method) {
        case RoutingMethod::softmax_topk: break;             // softmax below
        case RoutingMethod::topk_softmax: s = l + b; break;  // softmax over the k below
        case RoutingMethod::deepseek_v3: s = sigmoidf_exact(l); break;
        case RoutingMethod::llama4: break;
        case RoutingMethod::sigmoid_topk: s = sigmoidf_exact(l); break;
        default: break;
      }
      val[e] = s;
      const float c = p.method == RoutingMethod::deepseek_v3 ? s + b : s;
      nan_seen |= c != c;
      sel[e] = c != c ? -INFINITY : c;
    }
  }
  __syncwarp();
  if (p.method == RoutingMethod::softmax_topk) {
    float m = -INFINITY;
    for (int e = lane; e < E; e += 32) m = fmaxf(m, val[e]);
    m = warp_max(m);
    float sum = 0.0f;
    for (int e = lane; e < E; e += 32) sum += expf(val[e] - m);
    sum = warp_sum(sum);
    for (int e = lane; e < E; e += 32) {
      float pr = expf(val[e] - m) / sum;
      val[e] = pr;
      nan_seen |= pr != pr;
      sel[e] = pr != pr ? -INFINITY : pr;
    }
    __syncwarp();
  }
  if (p.method == RoutingMethod::deepseek_v3 && p.n_group > 1) {
    // Group score: sum of the two largest selection scores of the group; keep topk_group groups.
    const int gs = E / p.n_group;
    float score = -INFINITY;
    if (lane < p.n_group) {
      float b1 = -INFINITY, b2 = -INFINITY;
      for (int e = lane * gs; e < (lane + 1) * gs; ++e) {
        float v = sel[e];
        if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) { b2 = v; }
      }
      score = b1 + b2;
    }
    unsigned keep = 0;
    for (int r = 0; r < p.topk_group; ++r) {
      ArgMax m = (lane < p.n_group && !((keep >> lane) & 1)) ? ArgMax{score, lane} : ArgMax{-INFINITY, -1};
      m = warp_argmax(m);
      keep |= 1u << m.i;
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32)
      if (!((keep >> (e / gs)) & 1)) sel[e] = __int_as_float(0x7fffffff);
    __syncwarp();
  }
  const bool nan_token = __any_sync(0xffffffffu, nan_seen);
  // k rounds of arg-max; lane j keeps the j-th pick. Entry e of `sel` is lane e % 32's alone (it
  // wrote it above), and each lane keeps the best of its entries in registers: a round is one warp
  // arg-max of the lanes' bests, after which only the winner's lane drops that expert and rescans its
  // entries (independent shared-memory loads, no warp barrier).
  // NOTES: a full warp scan of `sel` per round with two warp barriers cost about 1000 cycles a pick.
  auto lane_best = [&]() {
    ArgMax m{-INFINITY, -1};
    for (int e = lane; e < E; e += 32) {
      const float v = sel[e];
      if (v == v && (m.i < 0 || v > m.v)) m = ArgMax{v, e};  // ascending e: ties keep the lower index
    }
    return m;
  };
  ArgMax mine = lane_best();
  int my_id = -1;
  float my_val = 0.0f;
  for (int j = 0; j < k; ++j) {
    const ArgMax m = warp_argmax(mine);
    if (lane == j && m.i >= 0) { my_id = m.i; my_val = val[m.i]; }
    if (m.i >= 0 && (m.i & 31) == lane) {
      sel[m.i] = __int_as_float(0x7fffffff);
      mine = lane_best();
    }
  }
  __syncwarp();
  float w = my_val;
  const bool active = lane < k;
  switch (p.method) {
    case RoutingMethod::softmax_topk:
    case RoutingMethod::sigmoid_topk: {
      float sum = warp_sum(active ? my_val : 0.0f);
      if (p.renormalize) w = my_val / sum;
      break;
    }
    case RoutingMethod::topk_softmax: {
      float m = warp_max(active ? my_val : -INFINITY);
      float ex = active ? expf(my_val - m) : 0.0f;
      float sum = warp_sum(ex);
      w = ex / sum;
      break;
    }
    case RoutingMethod::deepseek_v3: {
      float sum = warp_sum(active ? my_val : 0.0f);
      w = (p.renormalize ? my_val / (sum + 1e-20f) : my_val) * p.routed_scaling_factor;
      break;
    }
    case RoutingMethod::llama4: w = sigmoidf_exact(my_val); break;
    default: break;
  }
  if (nan_token) w = __int_as_float(0x7fffffff);
  if (active) {
    ids_out[t * k + lane] = my_id;
    tw_out[t * k + lane] = w;
  }
  __syncwarp();
}

}  // namespace fp4moe::kernels
