// Host expert weights: validation against a problem, and deterministic random layers for tests and
// the CLI.
#include "fp4moe/weights.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <string>

#include "fp4moe/error.h"
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

QuantizedMatrix random_matrix(Format format, int64_t rows, int64_t cols, float stddev,
                              uint64_t seed, std::vector<float>& scratch) {
  std::mt19937_64 rng(seed);
  scratch.resize(static_cast<size_t>(rows * cols));
  fill_normal(rng, scratch.data(), scratch.size(), stddev);
  if (format == Format::mxfp4) return quantize_mxfp4(scratch.data(), rows, cols);
  float amax = 0.0f;
  for (float v : scratch) amax = std::max(amax, std::fabs(v));
  return quantize_nvfp4(scratch.data(), rows, cols, nvfp4_global_scale(amax));
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

MoeWeights random_weights(const MoeProblem& p, uint64_t seed) {
  p.validate();
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

  // Each expert's tensors depend only on (seed, global expert index, tensor), so a layer restricted
  // to some local experts holds exactly those experts of the full layer, whatever the thread count.
  auto make_expert = [&](int i, std::vector<float>& scratch) {
    const uint64_t base = mix(seed ^ mix(static_cast<uint64_t>(p.local_expert_offset + i)));
    ExpertWeights& x = w.experts[static_cast<size_t>(i)];
    if (p.gated()) x.gate = random_matrix(p.format, I, H, kGateStd, mix(base + 1), scratch);
    x.up = random_matrix(p.format, I, H, kUpStd, mix(base + 2), scratch);
    x.down = random_matrix(p.format, H, I, kDownStd, mix(base + 3), scratch);
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
  };

  detail::parallel_for(n, 0, [&](int64_t i) {
    std::vector<float> scratch;
    make_expert(static_cast<int>(i), scratch);
  });
  return w;
}

}  // namespace fp4moe
