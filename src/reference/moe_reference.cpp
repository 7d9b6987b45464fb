// The CPU reference layer (SPEC "The layer"). Weights are decoded one row at a time straight from
// the packed bytes, and only for experts some token is routed to, so a DeepSeek-V3 layer at a few
// tokens costs about one pass over the used experts and no dequantized copies.
//
// Numerics: products and sums in fp64 with exact inputs (bf16 x, e2m1 * block scale); the global
// scale and bias are applied in fp64; the activation is evaluated in fp32 and rounded to bf16; the
// slot sum runs in fp64 in slot order and is rounded to fp32 (out_f32) and then bf16 (out) once.
#include <algorithm>
#include <array>
#include <cmath>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/reference.h"
#include "reference/parallel.h"

namespace fp4moe {
namespace {

// Decoded values of every E2M1 code and every scale byte of one format.
struct Lut {
  std::array<double, 16> e2m1;
  std::array<double, 256> scale;
  explicit Lut(Format f) {
    for (int c = 0; c < 16; ++c) e2m1[c] = e2m1_to_float(static_cast<uint8_t>(c));
    for (int c = 0; c < 256; ++c)
      scale[c] = f == Format::nvfp4 ? e4m3_to_float(static_cast<uint8_t>(c))
                                    : e8m0_to_float(static_cast<uint8_t>(c));
  }
};

// Row r of m as e2m1 * block scale (the global scale is applied by the caller, after the dot).
void decode_row(const QuantizedMatrix& m, const Lut& lut, int64_t r, double* out) {
  const int block = m.block();
  const int64_t kcols = m.scale_cols();
  const uint8_t* bytes = m.data.data() + r * m.cols / 2;
  const uint8_t* scales = m.scales.data() + r * kcols;
  for (int64_t b = 0; b < kcols; ++b) {
    const double s = lut.scale[scales[b]];
    for (int i = 0; i < block; i += 2) {
      const uint8_t byte = bytes[(b * block + i) / 2];
      out[b * block + i] = lut.e2m1[byte & 0xF] * s;
      out[b * block + i + 1] = lut.e2m1[byte >> 4] * s;
    }
  }
}

// Fixed-order dot product (four interleaved partial sums, combined in a fixed order).
double dot(const double* a, const double* b, int64_t n) {
  double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * b[i];
    s1 += a[i + 1] * b[i + 1];
    s2 += a[i + 2] * b[i + 2];
    s3 += a[i + 3] * b[i + 3];
  }
  for (; i < n; ++i) s0 += a[i] * b[i];
  return (s0 + s1) + (s2 + s3);
}

// W4A4: NVFP4 quantize-dequantize of a row in blocks of 16.
void fake_quantize_row(float* v, int64_t n, float g) {
  float tmp[16];
  for (int64_t b = 0; b < n; b += 16) {
    fake_quantize_nvfp4_block(v + b, tmp, g);
    std::copy(tmp, tmp + 16, v + b);
  }
}

// y[n][rows] = (m · in[i]) * global_scale + bias, for n inputs of length m.cols.
void gemm_rows(const QuantizedMatrix& m, const Lut& lut, const std::vector<float>& bias,
               const double* in, int64_t n, double* y, int64_t y_stride, int64_t y_offset) {
  std::vector<double> row(static_cast<size_t>(m.cols));
  const double g = m.global_scale;
  for (int64_t r = 0; r < m.rows; ++r) {
    decode_row(m, lut, r, row.data());
    const double b = bias.empty() ? 0.0 : bias[static_cast<size_t>(r)];
    for (int64_t i = 0; i < n; ++i)
      y[i * y_stride + y_offset + r] = dot(row.data(), in + i * m.cols, m.cols) * g + b;
  }
}

struct Assignment {
  int64_t token;
  int slot;
};

// A batch of assignments of one local expert; computes y for each into ys.
struct Item {
  int local_expert;
  const Assignment* begin;
  int64_t count;
};

}  // namespace

ReferenceResult moe_reference(const MoeProblem& p, const MoeWeights& w, const HostInputs& in,
                              int threads) {
  validate(p, w);
  ReferenceResult res;
  const int64_t T = p.tokens;
  if (T == 0) return res;
  const int64_t H = p.hidden, I = p.intermediate, E = p.num_experts;
  const int k = p.top_k;
  FP4MOE_CHECK(in.x != nullptr, "moe_reference: x is null for " << T << " tokens");
  // Results: out (bf16) and out_f32 [T, H], the routing [T, k] (validate() bounds T * H * 8).
  detail::check_host_bytes(T * H * 6 + T * k * 8, "moe_reference (its [T, H] results)");

  res.topk_ids.resize(static_cast<size_t>(T * k));
  res.topk_weights.resize(static_cast<size_t>(T * k));
  if (p.routing.method == RoutingMethod::precomputed) {
    FP4MOE_CHECK(in.topk_ids != nullptr && in.topk_weights != nullptr,
                 "moe_reference: routing is precomputed but topk_ids or topk_weights is null");
    for (int64_t t = 0; t < T; ++t) {
      for (int j = 0; j < k; ++j) {
        const int32_t id = in.topk_ids[t * k + j];
        FP4MOE_CHECK(id >= 0 && id < E, "topk_ids[" << t << "][" << j << "] = " << id
                                                    << " is outside [0, num_experts = " << E
                                                    << ") (token " << t << ", slot " << j << ")");
      }
    }
    std::copy(in.topk_ids, in.topk_ids + T * k, res.topk_ids.begin());
    std::copy(in.topk_weights, in.topk_weights + T * k, res.topk_weights.begin());
  } else {
    route_reference(p, in.logits, in.router_bias, res.topk_ids.data(), res.topk_weights.data());
  }

  const bool llama4 = p.routing.method == RoutingMethod::llama4;
  const bool w4a4 = p.input_mode == InputMode::w4a4;
  const bool gated = p.gated();
  const int64_t lo = p.local_expert_offset, hi = lo + p.local_experts();
  const Lut lut(p.format);

  res.out.resize(static_cast<size_t>(T * H));
  res.out_f32.resize(static_cast<size_t>(T * H));

  // Tokens are processed in chunks so that the per-slot outputs stay within ~64 MiB.
  const int64_t chunk = std::max<int64_t>(1, (int64_t{1} << 23) / (k * H));
  constexpr int64_t kItemTokens = 32;
  std::vector<double> ys;
  std::vector<std::vector<Assignment>> by_expert(static_cast<size_t>(p.local_experts()));
  for (int64_t c0 = 0; c0 < T; c0 += chunk) {
    const int64_t c1 = std::min(T, c0 + chunk);
    for (auto& v : by_expert) v.clear();
    for (int64_t t = c0; t < c1; ++t)
      for (int j = 0; j < k; ++j) {
        const int32_t e = res.topk_ids[t * k + j];
        if (e >= lo && e < hi) by_expert[e - lo].push_back({t, j});
      }
    std::vector<Item> items;
    for (size_t le = 0; le < by_expert.size(); ++le)
      for (size_t s = 0; s < by_expert[le].size(); s += kItemTokens)
        items.push_back({static_cast<int>(le), by_expert[le].data() + s,
                         std::min<int64_t>(kItemTokens, by_expert[le].size() - s)});
    ys.assign(static_cast<size_t>((c1 - c0) * k * H), 0.0);

    detail::parallel_for(static_cast<int64_t>(items.size()), threads, [&](int64_t item_index) {
      const Item& item = items[static_cast<size_t>(item_index)];
      const ExpertWeights& ew = w.experts[static_cast<size_t>(item.local_expert)];
      const int64_t n = item.count;
      // GEMM1 inputs: x (times the routing weight for llama4), NVFP4-quantized for w4a4.
      std::vector<double> xin(static_cast<size_t>(n * H));
      std::vector<float> row(static_cast<size_t>(std::max(H, I)));
      for (int64_t i = 0; i < n; ++i) {
        const Assignment& a = item.begin[i];
        const float wt = res.topk_weights[a.token * k + a.slot];
        for (int64_t h = 0; h < H; ++h) {
          const float v = bf16_to_float(in.x[a.token * H + h]);
          row[h] = llama4 ? v * wt : v;
        }
        if (w4a4) fake_quantize_row(row.data(), H, ew.input_scale13);
        std::copy(row.data(), row.data() + H, xin.data() + i * H);
      }
      const int64_t R = p.w13_rows();
      std::vector<double> h1(static_cast<size_t>(n * R));
      if (gated) gemm_rows(ew.gate, lut, ew.gate_bias, xin.data(), n, h1.data(), R, 0);
      gemm_rows(ew.up, lut, ew.up_bias, xin.data(), n, h1.data(), R, gated ? I : 0);
      // Activation in fp32, rounded to bf16; for w4a4 then quantized with the GEMM2 input scale.
      std::vector<double> act(static_cast<size_t>(n * I));
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t c = 0; c < I; ++c) {
          const float gate = gated ? static_cast<float>(h1[i * R + c]) : 0.0f;
          const float up = static_cast<float>(h1[i * R + (gated ? I : 0) + c]);
          row[c] = bf16_to_float(float_to_bf16(activation_reference(p.activation, gate, up)));
        }
        if (w4a4) fake_quantize_row(row.data(), I, ew.input_scale2);
        std::copy(row.data(), row.data() + I, act.data() + i * I);
      }
      std::vector<double> y(static_cast<size_t>(n * H));
      gemm_rows(ew.down, lut, ew.down_bias, act.data(), n, y.data(), H, 0);
      for (int64_t i = 0; i < n; ++i) {
        const Assignment& a = item.begin[i];
        std::copy(y.data() + i * H, y.data() + (i + 1) * H,
                  ys.data() + ((a.token - c0) * k + a.slot) * H);
      }
    });

    // Slots routed to other ranks contribute nothing, not even a NaN weight.
    for (int64_t t = c0; t < c1; ++t) {
      for (int64_t h = 0; h < H; ++h) {
        double acc = 0.0;
        for (int j = 0; j < k; ++j) {
          const int32_t e = res.topk_ids[t * k + j];
          if (e < lo || e >= hi) continue;
          const double yv = ys[static_cast<size_t>(((t - c0) * k + j) * H + h)];
          acc += llama4 ? yv : static_cast<double>(res.topk_weights[t * k + j]) * yv;
        }
        const float o = static_cast<float>(acc);
        res.out_f32[t * H + h] = o;
        res.out[t * H + h] = float_to_bf16(o);
      }
    }
  }
  return res;
}

}  // namespace fp4moe
