// Plain-loop MoE layer for `fp4moe check` (see naive_moe.h). Each row is accumulated block by
// block (scale times the block's code-weighted sum), a different order from the reference.
#include "naive_moe.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <exception>
#include <mutex>
#include <thread>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe::cli {
namespace {

double act(const ActivationConfig& a, double gate, double up) {
  const auto sigmoid = [](double v) { return 1.0 / (1.0 + std::exp(-v)); };
  switch (a.kind) {
    case Activation::swiglu:
      return gate * sigmoid(gate) * up;
    case Activation::swiglu_oai: {
      const double g = std::min<double>(gate, a.limit);
      const double u = std::clamp<double>(up, -a.limit, a.limit);
      return (u + 1.0) * g * sigmoid(a.alpha * g);
    }
    case Activation::relu2:
      return up > 0.0 ? up * up : 0.0;
    case Activation::geglu_tanh: {
      const double c = std::sqrt(2.0 / 3.14159265358979323846);
      return 0.5 * gate * (1.0 + std::tanh(c * (gate + 0.044715 * gate * gate * gate))) * up;
    }
  }
  FP4MOE_FAIL("naive_moe: unknown activation");
}

// (m · v)[r] * global_scale + bias[r] for every row r.
std::vector<double> matvec(const QuantizedMatrix& m, const std::vector<float>& bias,
                           const std::vector<double>& v) {
  float code_value[16];
  for (int c = 0; c < 16; ++c) code_value[c] = e2m1_to_float(static_cast<uint8_t>(c));
  const int block = m.block();
  std::vector<double> out(static_cast<size_t>(m.rows));
  for (int64_t r = 0; r < m.rows; ++r) {
    double row_sum = 0.0;
    for (int64_t b = 0; b < m.cols / block; ++b) {
      const uint8_t sc = m.scales[static_cast<size_t>(r * (m.cols / block) + b)];
      const double scale = m.format == Format::nvfp4 ? e4m3_to_float(sc) : e8m0_to_float(sc);
      double block_sum = 0.0;
      for (int i = 0; i < block; ++i) {
        const int64_t idx = r * m.cols + b * block + i;
        const uint8_t byte = m.data[static_cast<size_t>(idx / 2)];
        const uint8_t code = idx % 2 == 0 ? (byte & 0xF) : (byte >> 4);
        block_sum += code_value[code] * v[static_cast<size_t>(b * block + i)];
      }
      row_sum += scale * block_sum;
    }
    out[r] = row_sum * m.global_scale + (bias.empty() ? 0.0 : bias[static_cast<size_t>(r)]);
  }
  return out;
}

// W4A4: the activation vector quantized to NVFP4 with scale g and decoded again.
std::vector<double> quantize_activations(const std::vector<double>& v, float g) {
  std::vector<float> f(v.begin(), v.end());
  const std::vector<float> q = dequantize(quantize_nvfp4(f.data(), 1, static_cast<int64_t>(f.size()), g));
  return std::vector<double>(q.begin(), q.end());
}

void token(const MoeProblem& p, const MoeWeights& w, const uint16_t* x, const int32_t* ids,
           const float* weights, int64_t t, double* out) {
  const int64_t H = p.hidden, I = p.intermediate;
  const bool llama4 = p.routing.method == RoutingMethod::llama4;
  std::fill(out, out + H, 0.0);
  for (int j = 0; j < p.top_k; ++j) {
    const int32_t e = ids[t * p.top_k + j];
    const float wt = weights[t * p.top_k + j];
    if (e < p.local_expert_offset || e >= p.local_expert_offset + p.local_experts()) continue;
    const ExpertWeights& ew = w.experts[static_cast<size_t>(e - p.local_expert_offset)];
    std::vector<double> xin(static_cast<size_t>(H));
    for (int64_t h = 0; h < H; ++h) {
      const float v = bf16_to_float(x[t * H + h]);
      xin[h] = llama4 ? static_cast<double>(v * wt) : v;
    }
    if (p.input_mode == InputMode::w4a4) xin = quantize_activations(xin, ew.input_scale13);
    const std::vector<double> up = matvec(ew.up, ew.up_bias, xin);
    std::vector<double> gate;
    if (p.gated()) gate = matvec(ew.gate, ew.gate_bias, xin);
    std::vector<double> a(static_cast<size_t>(I));
    for (int64_t i = 0; i < I; ++i) {
      const double v = act(p.activation, p.gated() ? gate[i] : 0.0, up[i]);
      a[i] = bf16_to_float(float_to_bf16(static_cast<float>(v)));
    }
    if (p.input_mode == InputMode::w4a4) a = quantize_activations(a, ew.input_scale2);
    const std::vector<double> y = matvec(ew.down, ew.down_bias, a);
    for (int64_t h = 0; h < H; ++h) out[h] += llama4 ? y[h] : wt * y[h];
  }
}

}  // namespace

std::vector<double> naive_moe(const MoeProblem& p, const MoeWeights& w, const uint16_t* x,
                              const int32_t* ids, const float* weights, int threads) {
  const int64_t T = p.tokens, H = p.hidden;
  std::vector<double> out(static_cast<size_t>(T * H));
  if (threads <= 0) threads = std::max(1u, std::thread::hardware_concurrency());
  const int64_t n = std::min<int64_t>(threads, T);
  std::atomic<int64_t> next{0};
  std::exception_ptr error;
  std::mutex error_mutex;
  auto work = [&] {
    try {
      for (int64_t t = next++; t < T; t = next++) token(p, w, x, ids, weights, t, out.data() + t * H);
    } catch (...) {
      std::lock_guard<std::mutex> lock(error_mutex);
      if (!error) error = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int64_t i = 1; i < n; ++i) pool.emplace_back(work);
  if (n > 0) work();
  for (auto& th : pool) th.join();
  if (error) std::rethrow_exception(error);
  return out;
}

}  // namespace fp4moe::cli
