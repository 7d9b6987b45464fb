// Shared pieces of the GPU tests and the benchmark's correctness column: device buffers, random
// inputs, the layer run through the public API, and error measures.
#pragma once
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "fp4moe/fp4moe.h"

namespace fp4moe::testing {

#define GPU_TEST_PREAMBLE()                                   \
  do {                                                        \
    std::string why_;                                         \
    if (!::fp4moe::gpu_available(&why_)) GTEST_SKIP() << why_; \
  } while (0)

#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr << ": " << cudaGetErrorString(expr)

template <class T>
struct DevBuf {
  T* ptr = nullptr;
  size_t n = 0;
  explicit DevBuf(size_t count = 0) : n(count) {
    if (count) {
      cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&ptr), count * sizeof(T));
      if (e != cudaSuccess) throw std::runtime_error(cudaGetErrorString(e));
    }
  }
  DevBuf(const std::vector<T>& h) : DevBuf(h.size()) { upload(h); }
  ~DevBuf() { if (ptr) cudaFree(ptr); }
  DevBuf(const DevBuf&) = delete;
  void upload(const std::vector<T>& h) {
    if (!h.empty()) cudaMemcpy(ptr, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    if (n) cudaMemcpy(h.data(), ptr, n * sizeof(T), cudaMemcpyDeviceToHost);
    return h;
  }
};

struct HostData {
  std::vector<uint16_t> x;       // [T, H] bf16
  std::vector<float> logits;     // [T, E]
  std::vector<float> bias;       // [E]
  std::vector<int32_t> ids;      // [T, k] (precomputed routing)
  std::vector<float> weights;    // [T, k]
};

inline HostData random_inputs(const MoeProblem& p, uint64_t seed) {
  HostData d;
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  d.x.resize(size_t(p.tokens) * p.hidden);
  for (auto& v : d.x) v = float_to_bf16(nd(rng));
  d.logits.resize(size_t(p.tokens) * p.num_experts);
  for (auto& v : d.logits) v = 2.0f * nd(rng);
  d.bias.resize(size_t(p.num_experts));
  for (auto& v : d.bias) v = 0.5f * nd(rng);
  if (p.routing.method == RoutingMethod::precomputed) {
    d.ids.resize(size_t(p.tokens) * p.top_k);
    d.weights.resize(d.ids.size());
    std::vector<int> perm(size_t(p.num_experts));
    for (int64_t t = 0; t < p.tokens; ++t) {
      for (int e = 0; e < p.num_experts; ++e) perm[size_t(e)] = e;
      std::shuffle(perm.begin(), perm.end(), rng);
      for (int j = 0; j < p.top_k; ++j) {
        d.ids[size_t(t * p.top_k + j)] = perm[size_t(j)];
        d.weights[size_t(t * p.top_k + j)] = std::uniform_real_distribution<float>(0.1f, 1.0f)(rng);
      }
    }
  }
  return d;
}

inline HostInputs host_inputs(const MoeProblem& p, const HostData& d) {
  HostInputs in;
  in.x = d.x.data();
  if (p.routing.method == RoutingMethod::precomputed) {
    in.topk_ids = d.ids.data();
    in.topk_weights = d.weights.data();
  } else {
    in.logits = d.logits.data();
    in.router_bias = p.routing.has_bias ? d.bias.data() : nullptr;
  }
  return in;
}

// Runs the layer on the GPU with the output poisoned (NaN) first; returns out [T, H] bf16 bits.
// plan: run with this plan instead of make_plan(p) (a tactic forced below or above the crossover).
inline std::vector<uint16_t> run_gpu(const MoeProblem& p, const DeviceWeights& w, const HostData& d,
                                     int repeats = 1, std::vector<uint16_t>* first = nullptr,
                                     const Plan* plan = nullptr) {
  DevBuf<uint16_t> x(d.x), out(size_t(p.tokens) * p.hidden);
  DevBuf<float> logits(d.logits), bias(d.bias), weights(d.weights);
  DevBuf<int32_t> ids(d.ids);
  const size_t ws_bytes = plan ? workspace_size(p, *plan) : workspace_size(p);
  DevBuf<uint8_t> ws(ws_bytes);
  DeviceInputs in;
  in.x = x.ptr;
  in.out = out.ptr;
  if (p.routing.method == RoutingMethod::precomputed) {
    in.topk_ids = ids.ptr;
    in.topk_weights = weights.ptr;
  } else {
    in.logits = logits.ptr;
    in.router_bias = p.routing.has_bias ? bias.ptr : nullptr;
  }
  std::vector<uint16_t> result;
  for (int r = 0; r < repeats; ++r) {
    cudaMemset(out.ptr, 0xFF, out.n * 2);  // bf16 0xFFFF is NaN: unwritten elements fail
    if (plan) run(p, w, in, ws.ptr, ws_bytes, nullptr, *plan);
    else run(p, w, in, ws.ptr, ws_bytes, nullptr);
    cudaError_t e = cudaDeviceSynchronize();
    if (e != cudaSuccess) throw std::runtime_error(std::string("kernel failed: ") + cudaGetErrorString(e));
    result = out.download();
    if (r == 0 && first) *first = result;
  }
  return result;
}

// One GPU test case: a small layer shape and the options it exercises.
struct Case {
  std::string name;
  int H, I, E, k;
  int64_t T;
  Format format = Format::nvfp4;
  RoutingMethod routing = RoutingMethod::softmax_topk;
  Activation act = Activation::swiglu;
  InputMode mode = InputMode::w4a16;
  bool bias = false;
  int ep_offset = 0, ep_count = 0;
};

// gtest prints parameters in test listings (ctest, CI logs): the case's name, not its bytes.
inline void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

inline MoeProblem make_problem(const Case& c) {
  MoeProblem p;
  p.tokens = c.T;
  p.hidden = c.H;
  p.intermediate = c.I;
  p.num_experts = c.E;
  p.top_k = c.k;
  p.format = c.format;
  p.input_mode = c.mode;
  p.activation.kind = c.act;
  p.routing.method = c.routing;
  p.has_bias = c.bias;
  p.local_expert_offset = c.ep_offset;
  p.num_local_experts = c.ep_count;
  switch (c.routing) {
    case RoutingMethod::topk_softmax: p.routing.has_bias = true; break;
    case RoutingMethod::deepseek_v3:
      p.routing.has_bias = true;
      p.routing.n_group = 4;
      p.routing.topk_group = 2;
      p.routing.routed_scaling_factor = 2.5f;
      break;
    default: break;
  }
  return p;
}

struct ErrorStats {
  double rel_l2 = 0;
  double max_abs = 0;
  int64_t nan_count = 0;
};

inline ErrorStats compare(const std::vector<uint16_t>& got, const std::vector<uint16_t>& ref) {
  ErrorStats s;
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double a = bf16_to_float(got[i]), b = bf16_to_float(ref[i]);
    if (std::isnan(a)) { ++s.nan_count; continue; }
    num += (a - b) * (a - b);
    den += b * b;
    s.max_abs = std::max(s.max_abs, std::fabs(a - b));
  }
  s.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return s;
}

// First differing element of two bf16 tensors [rows, cols] as "(row, col): a vs b", or "".
inline std::string first_mismatch(const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, int64_t cols) {
  for (size_t i = 0; i < a.size() && i < b.size(); ++i)
    if (a[i] != b[i])
      return "(" + std::to_string(int64_t(i) / cols) + ", " + std::to_string(int64_t(i) % cols) +
             "): " + std::to_string(bf16_to_float(a[i])) + " vs " + std::to_string(bf16_to_float(b[i]));
  if (a.size() != b.size()) return "sizes differ";
  return "";
}

}  // namespace fp4moe::testing
