// Host expert weights: validation against a problem, and deterministic random layers for tests and
// the CLI.
#include "fp4moe/weights.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "fp4moe/error.h"
#include "fp4moe/layout.h"
#include "reference/parallel.h"

namespace fp4moe {
namespace {

void check_matrix(const QuantizedMatrix& m, Format format, int64_t rows, int64_t cols, int expert,
                  const char* name) {
  const std::string what = "expert " + std::to_string(expert) + " " + name;
  FP4MOE_CHECK(m.format == format, what << " is " << to_string(m.format) << " but the problem is "
                                        << to_string(format));
  FP4MOE_CHECK(m.rows == rows && m.cols == cols, what << " has shape [" << m.rows << ", " << m.cols
                                                      << "], expected [" << rows << ", " << cols
                                                      << "]");
  validate(m, what.c_str());
}

void check_bias(const std::vector<float>& b, size_t want, int expert, const char* name,
                bool has_bias) {
  if (!has_bias) {
    FP4MOE_CHECK(b.empty(), "expert " << expert << " " << name << " has " << b.size()
                                      << " values but the problem has has_bias = false");
    return;
  }
  FP4MOE_CHECK(b.size() == want, "expert " << expert << " " << name << " has " << b.size()
                                           << " values, expected " << want);
}

// splitmix64: decorrelates the seeds of neighbouring experts and tensors.
uint64_t mix(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Approximately normal values (sum of four uniform 16-bit draws per 64-bit output, variance
// matched): much cheaper than std::normal_distribution, which matters for 10^10-element layers.
void fill_normal(std::mt19937_64& rng, float* out, size_t n, float stddev) {
  // Each 16-bit uniform has variance (2^32 - 1) / 12; four of them 4x that.
  const float scale = stddev / std::sqrt(4.0f * (65536.0f * 65536.0f - 1.0f) / 12.0f);
  const float mean = 4.0f * 65535.0f / 2.0f;
  for (size_t i = 0; i < n; ++i) {
    const uint64_t r = rng();
    const float sum = static_cast<float>((r & 0xFFFF) + ((r >> 16) & 0xFFFF) + ((r >> 32) & 0xFFFF) +
                                         (r >> 48));
    out[i] = (sum - mean) * scale;
  }
}

// Quantized rows to draw expert matrices from. Quantizing every element of a large layer (10^10
// for DeepSeek-V3) with the reference quantizer takes minutes, so each tensor kind (gate, up,
// down) quantizes at most kMaxPoolRows rows of N(0, stddev) values once, with the library quantizer,
// and experts copy rows from it. Small layers get one pool row per expert row (no sharing).
constexpr int64_t kMaxPoolRows = 2048;
constexpr int64_t kPoolChunkRows = 64;

QuantizedMatrix make_pool(Format format, int64_t rows, int64_t cols, float stddev, uint64_t seed) {
  std::vector<float> values(static_cast<size_t>(rows * cols));
  const int64_t chunks = (rows + kPoolChunkRows - 1) / kPoolChunkRows;
  // Each chunk of rows has its own stream, so the pool does not depend on the thread count.
  detail::parallel_for(chunks, 0, [&](int64_t c) {
    std::mt19937_64 rng(mix(seed + static_cast<uint64_t>(c)));
    const int64_t r0 = c * kPoolChunkRows, r1 = std::min(rows, r0 + kPoolChunkRows);
    fill_normal(rng, values.data() + r0 * cols, static_cast<size_t>((r1 - r0) * cols), stddev);
  });
  float amax = 0.0f;
  for (float v : values) amax = std::max(amax, std::fabs(v));
  const float g = nvfp4_global_scale(amax);
  QuantizedMatrix pool;
  pool.format = format;
  pool.rows = rows;
  pool.cols = cols;
  pool.global_scale = format == Format::nvfp4 ? g : 1.0f;
  pool.data.resize(static_cast<size_t>(rows * cols / 2));
  pool.scales.resize(static_cast<size_t>(rows * pool.scale_cols()));
  detail::parallel_for(chunks, 0, [&](int64_t c) {
    const int64_t r0 = c * kPoolChunkRows, r1 = std::min(rows, r0 + kPoolChunkRows);
    const float* src = values.data() + r0 * cols;
    const QuantizedMatrix q = format == Format::nvfp4 ? quantize_nvfp4(src, r1 - r0, cols, g)
                                                      : quantize_mxfp4(src, r1 - r0, cols);
    std::copy(q.data.begin(), q.data.end(), pool.data.begin() + r0 * cols / 2);
    std::copy(q.scales.begin(), q.scales.end(), pool.scales.begin() + r0 * pool.scale_cols());
  });
  return pool;
}

// Expert `e`'s matrix: rows of the pool (expert e's own rows when the pool holds one per expert
// row, random rows otherwise), rescaled per expert (global scale times [0.75, 1.25) for NVFP4, a
// power of two in {1/2, 1, 2} for MXFP4) so that experts also differ in scale.
QuantizedMatrix expert_matrix(const QuantizedMatrix& pool, int64_t rows, int e, uint64_t seed) {
  std::mt19937_64 rng(seed);
  QuantizedMatrix m;
  m.format = pool.format;
  m.rows = rows;
  m.cols = pool.cols;
  const int64_t row_bytes = pool.cols / 2, row_scales = pool.scale_cols();
  m.data.resize(static_cast<size_t>(rows * row_bytes));
  m.scales.resize(static_cast<size_t>(rows * row_scales));
  const bool own_rows = pool.rows >= (int64_t{e} + 1) * rows;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t src = own_rows ? int64_t{e} * rows + r : static_cast<int64_t>(rng() % pool.rows);
    std::copy_n(pool.data.begin() + src * row_bytes, row_bytes, m.data.begin() + r * row_bytes);
    std::copy_n(pool.scales.begin() + src * row_scales, row_scales, m.scales.begin() + r * row_scales);
  }
  if (m.format == Format::nvfp4) {
    m.global_scale = pool.global_scale * std::uniform_real_distribution<float>(0.75f, 1.25f)(rng);
  } else {
    const int shift = static_cast<int>(rng() % 3) - 1;
    for (uint8_t& s : m.scales) s = static_cast<uint8_t>(std::clamp(int{s} + shift, 0, 254));
    m.global_scale = 1.0f;
  }
  return m;
}

std::vector<float> random_vector(size_t n, float stddev, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<float> v(n);
  fill_normal(rng, v.data(), n, stddev);
  return v;
}

// Standard deviations of the random layers. Gate and up differ on purpose so that their NVFP4
// global scales differ and a backend that applies one to both halves fails its check.
constexpr float kGateStd = 0.02f;
constexpr float kUpStd = 0.03f;
constexpr float kDownStd = 0.02f;
constexpr float kBiasStd = 0.1f;
// Plausible activation ranges for W4A4 input scales: hidden states of magnitude up to ~8 (the
// tests and CLI draw N(0, 1)); `a` up to ~16 standard deviations of gate times up.
constexpr float kXAmax = 8.0f;

}  // namespace

void validate(const MoeProblem& p, const MoeWeights& w) {
  p.validate();
  FP4MOE_CHECK(w.format == p.format, "weights are " << to_string(w.format) << " but the problem is "
                                                    << to_string(p.format));
  FP4MOE_CHECK(w.hidden == p.hidden && w.intermediate == p.intermediate,
               "weights have H = " << w.hidden << ", I = " << w.intermediate
                                   << " but the problem has H = " << p.hidden
                                   << ", I = " << p.intermediate);
  FP4MOE_CHECK(static_cast<int64_t>(w.experts.size()) == p.local_experts(),
               "weights hold " << w.experts.size() << " experts but the problem has "
                               << p.local_experts() << " local experts");
  const int64_t H = p.hidden, I = p.intermediate;
  for (size_t i = 0; i < w.experts.size(); ++i) {
    const ExpertWeights& x = w.experts[i];
    const int e = p.local_expert_offset + static_cast<int>(i);
    if (p.gated()) {
      check_matrix(x.gate, p.format, I, H, e, "gate");
    } else {
      FP4MOE_CHECK(x.gate.empty(), "expert " << e << " gate must be empty for the non-gated "
                                             << to_string(p.activation.kind) << " activation");
    }
    check_matrix(x.up, p.format, I, H, e, "up");
    check_matrix(x.down, p.format, H, I, e, "down");
    check_bias(x.gate_bias, p.gated() ? static_cast<size_t>(I) : 0, e, "gate_bias", p.has_bias);
    check_bias(x.up_bias, static_cast<size_t>(I), e, "up_bias", p.has_bias);
    check_bias(x.down_bias, static_cast<size_t>(H), e, "down_bias", p.has_bias);
    if (p.input_mode == InputMode::w4a4) {
      FP4MOE_CHECK(std::isfinite(x.input_scale13) && x.input_scale13 > 0,
                   "expert " << e << " input_scale13 must be positive and finite for w4a4, got "
                             << x.input_scale13);
      FP4MOE_CHECK(std::isfinite(x.input_scale2) && x.input_scale2 > 0,
                   "expert " << e << " input_scale2 must be positive and finite for w4a4, got "
                             << x.input_scale2);
    }
  }
}

namespace {
void check_matrix_scales(const QuantizedMatrix& m, int expert, const char* name) {
  const int64_t kcols = m.scale_cols();
  for (size_t i = 0; i < m.scales.size(); ++i) {
    const uint8_t c = m.scales[i];
    const bool nan = m.format == Format::nvfp4 ? (c & 0x7F) == 0x7F : c == 0xFF;
    if (!nan) continue;
    FP4MOE_FAIL("expert " << expert << " " << name << ": block scale of row " << int64_t(i) / kcols
                          << ", block " << int64_t(i) % kcols << " (columns "
                          << int64_t(i) % kcols * m.block() << ".." << (int64_t(i) % kcols + 1) * m.block() - 1
                          << ") is NaN (" << (m.format == Format::nvfp4 ? "E4M3" : "E8M0") << " code "
                          << detail::hex_byte(c) << "); NaN block scales are not accepted");
  }
}
}  // namespace

void check_block_scales(const MoeProblem& p, const MoeWeights& w) {
  validate(p, w);
  for (size_t i = 0; i < w.experts.size(); ++i) {
    const ExpertWeights& x = w.experts[i];
    const int e = p.local_expert_offset + static_cast<int>(i);
    if (p.gated()) check_matrix_scales(x.gate, e, "gate");
    check_matrix_scales(x.up, e, "up");
    check_matrix_scales(x.down, e, "down");
  }
}

MoeWeights random_weights(const MoeProblem& p, uint64_t seed) {
  p.validate();
  {
    const PackedLayout L = PackedLayout::make(p.hidden, p.intermediate, p.local_experts(), p.format,
                                              p.gated(), p.has_bias);
    detail::check_host_bytes(L.checkpoint_bytes_per_expert() * p.local_experts(),
                             "random_weights (the layer's FP4 weights)");
  }
  MoeWeights w;
  w.format = p.format;
  w.hidden = p.hidden;
  w.intermediate = p.intermediate;
  const int n = p.local_experts();
  w.experts.resize(static_cast<size_t>(n));
  const int64_t H = p.hidden, I = p.intermediate;
  const float gate_std = p.gated() ? kGateStd : kUpStd;
  const float h_std = gate_std * std::sqrt(static_cast<float>(H));  // for x ~ N(0, 1)
  const float up_h_std = kUpStd * std::sqrt(static_cast<float>(H));
  const float a_amax = p.gated() ? 16.0f * h_std * up_h_std : 16.0f * up_h_std * up_h_std;

  // Pools depend on (seed, tensor kind, global E) and each expert's tensors on (seed, global expert
  // index, tensor), so a layer restricted to some local experts holds exactly those experts of the
  // full layer, whatever the thread count.
  const auto pool_rows = [&](int64_t rows) {
    return std::min<int64_t>(kMaxPoolRows, rows * p.num_experts);
  };
  QuantizedMatrix gate_pool;
  if (p.gated()) gate_pool = make_pool(p.format, pool_rows(I), H, kGateStd, mix(seed ^ 0x6A7E));
  const QuantizedMatrix up_pool = make_pool(p.format, pool_rows(I), H, kUpStd, mix(seed ^ 0x0B));
  const QuantizedMatrix down_pool =
      make_pool(p.format, pool_rows(H), I, kDownStd, mix(seed ^ 0xD0));

  detail::parallel_for(n, 0, [&](int64_t i) {
    const int e = p.local_expert_offset + static_cast<int>(i);
    const uint64_t base = mix(seed ^ mix(static_cast<uint64_t>(e)));
    ExpertWeights& x = w.experts[static_cast<size_t>(i)];
    if (p.gated()) x.gate = expert_matrix(gate_pool, I, e, mix(base + 1));
    x.up = expert_matrix(up_pool, I, e, mix(base + 2));
    x.down = expert_matrix(down_pool, H, e, mix(base + 3));
    if (p.has_bias) {
      if (p.gated()) x.gate_bias = random_vector(static_cast<size_t>(I), kBiasStd, mix(base + 4));
      x.up_bias = random_vector(static_cast<size_t>(I), kBiasStd, mix(base + 5));
      x.down_bias = random_vector(static_cast<size_t>(H), kBiasStd, mix(base + 6));
    }
    // Per-expert input scales (ModelOpt stores one per expert) vary by up to 25% so that a backend
    // using the wrong expert's scale shows.
    std::mt19937_64 rng(mix(base + 7));
    std::uniform_real_distribution<float> jitter(1.0f, 1.25f);
    x.input_scale13 = kXAmax / (6.0f * 448.0f) * jitter(rng);
    x.input_scale2 = a_amax / (6.0f * 448.0f) * jitter(rng);
  });
  return w;
}

}  // namespace fp4moe
