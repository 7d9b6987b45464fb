// Tests of the host FP4 formats (SPEC "FP4 formats"). Expected values are computed here from the
// bit-level definitions (sign / exponent / mantissa arithmetic in double), not from the library.
#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe {
namespace {

// ---- reference definitions -------------------------------------------------------------------------

// E2M1: sign bit 3, exponent bits 2..1 with bias 1, mantissa bit 0; exponent 0 is subnormal.
double ref_e2m1(uint8_t code) {
  const int s = (code >> 3) & 1, e = (code >> 1) & 3, m = code & 1;
  const double mag = e == 0 ? m * 0.5 : (1.0 + m / 2.0) * std::pow(2.0, e - 1);
  return s ? -mag : mag;
}

// E4M3 "fn": sign bit 7, exponent bits 6..3 with bias 7, mantissa bits 2..0; S.1111.111 is NaN.
double ref_e4m3(uint8_t code) {
  const int s = (code >> 7) & 1, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<double>::quiet_NaN();
  const double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}

// E8M0: unsigned exponent with bias 127, 0xFF is NaN.
double ref_e8m0(uint8_t code) {
  if (code == 0xFF) return std::numeric_limits<double>::quiet_NaN();
  return std::pow(2.0, static_cast<int>(code) - 127);
}

// Nearest code by exhaustive search over the finite codes of one sign, ties to the even code,
// saturating at the largest magnitude.
template <class Ref>
uint8_t nearest_code(double v, Ref ref, int sign_bit, int max_mag_code) {
  const uint8_t sign = std::signbit(v) ? static_cast<uint8_t>(1u << sign_bit) : 0;
  const double a = std::fabs(v);
  int best = 0;
  double best_err = std::numeric_limits<double>::infinity();
  for (int c = 0; c <= max_mag_code; ++c) {
    const double err = std::fabs(a - ref(static_cast<uint8_t>(c)));
    if (err < best_err || (err == best_err && c % 2 == 0)) {
      best = c;
      best_err = err;
    }
  }
  return static_cast<uint8_t>(sign | best);
}
uint8_t nearest_e2m1(double v) { return nearest_code(v, ref_e2m1, 3, 7); }
uint8_t nearest_e4m3(double v) { return nearest_code(v, ref_e4m3, 7, 0x7E); }

// Half the distance between neighbouring E2M1 magnitudes around |q| (q in scale units).
double e2m1_half_step(double q) {
  const double a = std::fabs(q);
  return a < 2.0 ? 0.25 : (a < 4.0 ? 0.5 : 1.0);
}

// SPEC formula of the swizzled 128x4 layout, written out independently of the library.
size_t ref_swizzled_offset(int64_t m, int64_t k, int64_t kcols) {
  const int64_t kt = (kcols + 3) / 4;
  return static_cast<size_t>((m / 128) * kt * 512 + (k / 4) * 512 + (m % 32) * 16 +
                             ((m % 128) / 32) * 4 + k % 4);
}

std::vector<float> random_matrix(int64_t rows, int64_t cols, int block, uint32_t seed) {
  // Each block gets its own magnitude (2^-20 .. 2^20) so scales cover many binades.
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> binade(-20, 20);
  std::vector<float> x(static_cast<size_t>(rows * cols));
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < cols / block; ++b) {
      const float mag = std::ldexp(1.0f, binade(rng));
      for (int i = 0; i < block; ++i) x[static_cast<size_t>(r * cols + b * block + i)] = normal(rng) * mag;
    }
  }
  return x;
}

uint8_t code_at(const QuantizedMatrix& m, int64_t index) {
  const uint8_t byte = m.data[static_cast<size_t>(index / 2)];
  return index % 2 == 0 ? (byte & 0xF) : (byte >> 4);
}

bool throws_error_mentioning(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
  } catch (const Error& e) {
    return std::string(e.what()).find(needle) != std::string::npos;
  }
  return false;
}

// ---- scalar codecs ---------------------------------------------------------------------------------

TEST(FormatsCodecs, E2m1DecodesAll16Codes) {
  const double table[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};  // SPEC
  for (int c = 0; c < 16; ++c) {
    const auto code = static_cast<uint8_t>(c);
    EXPECT_EQ(e2m1_to_float(code), static_cast<float>(ref_e2m1(code))) << "code " << c;
    EXPECT_EQ(ref_e2m1(code), (c & 8 ? -1 : 1) * table[c & 7]) << "code " << c;
    EXPECT_EQ(std::signbit(e2m1_to_float(code)), c >= 8) << "code " << c;
    EXPECT_EQ(e2m1_to_float(static_cast<uint8_t>(code | 0xF0)), e2m1_to_float(code))
        << "the high nibble must be ignored, code " << c;
  }
}

TEST(FormatsCodecs, E4m3DecodesAll256Codes) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const double want = ref_e4m3(code);
    const float got = e4m3_to_float(code);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
    } else {
      EXPECT_EQ(got, static_cast<float>(want)) << "code " << c;
      EXPECT_EQ(std::signbit(got), c >= 128) << "code " << c;
    }
  }
  EXPECT_EQ(e4m3_to_float(0x7E), 448.0f);
  EXPECT_EQ(e4m3_to_float(0x01), std::ldexp(1.0f, -9));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0x7F)));
  EXPECT_TRUE(std::isnan(e4m3_to_float(0xFF)));
}

TEST(FormatsCodecs, E8m0DecodesAll256Codes) {
  for (int c = 0; c < 256; ++c) {
    const auto code = static_cast<uint8_t>(c);
    const double want = ref_e8m0(code);
    const float got = e8m0_to_float(code);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
    } else {
      EXPECT_EQ(got, static_cast<float>(want)) << "code " << c;
      EXPECT_EQ(static_cast<double>(got), want) << "code " << c << " must be exact in fp32";
    }
  }
}

TEST(FormatsCodecs, EncodersRoundTripEveryFiniteCode) {
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(float_to_e2m1(e2m1_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
  }
  for (int c = 0; c < 256; ++c) {
    if ((c & 0x7F) == 0x7F) continue;
    EXPECT_EQ(float_to_e4m3(e4m3_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
  }
  for (int c = 0; c < 255; ++c) {
    EXPECT_EQ(float_to_e8m0(e8m0_to_float(static_cast<uint8_t>(c))), c) << "code " << c;
  }
}

TEST(FormatsCodecs, E2m1TiesRoundToEven) {
  const struct {
    float v;
    float want;
  } cases[] = {{0.25f, 0.0f}, {0.75f, 1.0f}, {1.25f, 1.0f}, {1.75f, 2.0f},
               {2.5f, 2.0f},  {3.5f, 4.0f},  {5.0f, 4.0f}};
  for (const auto& t : cases) {
    EXPECT_EQ(e2m1_to_float(float_to_e2m1(t.v)), t.want) << t.v;
    EXPECT_EQ(e2m1_to_float(float_to_e2m1(-t.v)), -t.want) << -t.v;
  }
  // Every midpoint between neighbours, and one ulp either side of it.
  for (int c = 0; c < 7; ++c) {
    const double lo = ref_e2m1(static_cast<uint8_t>(c)), hi = ref_e2m1(static_cast<uint8_t>(c + 1));
    const float mid = static_cast<float>((lo + hi) / 2);
    const int even = c % 2 == 0 ? c : c + 1;
    EXPECT_EQ(float_to_e2m1(mid), even) << "midpoint " << mid;
    EXPECT_EQ(float_to_e2m1(std::nextafter(mid, 0.0f)), c) << "below " << mid;
    EXPECT_EQ(float_to_e2m1(std::nextafter(mid, 100.0f)), c + 1) << "above " << mid;
    EXPECT_EQ(float_to_e2m1(-mid), 8 | even) << "midpoint " << -mid;
  }
}

TEST(FormatsCodecs, E4m3TiesBetweenAdjacentCodesRoundToEven) {
  for (int c = 0; c < 0x7E; ++c) {
    const double lo = ref_e4m3(static_cast<uint8_t>(c)), hi = ref_e4m3(static_cast<uint8_t>(c + 1));
    const float mid = static_cast<float>((lo + hi) / 2);
    ASSERT_EQ(static_cast<double>(mid), (lo + hi) / 2) << "midpoint must be exact in fp32";
    const int even = c % 2 == 0 ? c : c + 1;
    EXPECT_EQ(float_to_e4m3(mid), even) << "midpoint of codes " << c << ", " << c + 1;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 0.0f)), c) << "below midpoint of " << c;
    EXPECT_EQ(float_to_e4m3(std::nextafter(mid, 1000.0f)), c + 1) << "above midpoint of " << c;
    EXPECT_EQ(float_to_e4m3(-mid), 0x80 | even) << "negative midpoint of codes " << c;
  }
}

TEST(FormatsCodecs, EncodersMatchExhaustiveNearestOnRandomValues) {
  std::mt19937 rng(1234);
  std::uniform_real_distribution<float> e2m1_range(-7.0f, 7.0f);
  std::uniform_int_distribution<int> binade(-12, 9);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  for (int i = 0; i < 20000; ++i) {
    const float v = e2m1_range(rng);
    ASSERT_EQ(float_to_e2m1(v), nearest_e2m1(v)) << "value " << v;
    const float w = std::ldexp(unit(rng), binade(rng));
    ASSERT_EQ(float_to_e4m3(w), nearest_e4m3(w)) << "value " << w;
  }
}

TEST(FormatsCodecs, SaturationAndNan) {
  const float inf = std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (float v : {6.0f, 6.5f, 7.0f, 100.0f, 1e30f, inf}) {
    EXPECT_EQ(float_to_e2m1(v), 0x7) << v;
    EXPECT_EQ(float_to_e2m1(-v), 0xF) << -v;
  }
  for (float v : {448.0f, 463.9f, 464.0f, 480.0f, 1e6f, 3e38f, inf}) {
    EXPECT_EQ(float_to_e4m3(v), 0x7E) << v;
    EXPECT_EQ(float_to_e4m3(-v), 0xFE) << -v;
  }
  EXPECT_EQ(float_to_e2m1(nan), 0x0);
  EXPECT_EQ(float_to_e2m1(-nan), 0x0);
  EXPECT_EQ(float_to_e4m3(nan), 0x7F);
  // Underflow: half the smallest subnormal is a tie with zero.
  EXPECT_EQ(float_to_e4m3(std::ldexp(1.0f, -10)), 0x00);
  EXPECT_EQ(float_to_e4m3(std::nextafter(std::ldexp(1.0f, -10), 1.0f)), 0x01);
  EXPECT_EQ(float_to_e4m3(-std::ldexp(1.0f, -11)), 0x80);
  EXPECT_EQ(float_to_e4m3(std::ldexp(3.0f, -10)), 0x02);  // 1.5 quanta: tie -> even code 2
  EXPECT_EQ(float_to_e2m1(-0.0f), 0x8);
  EXPECT_EQ(float_to_e2m1(1e-30f), 0x0);
}

TEST(FormatsCodecs, E8m0Encode) {
  for (int e = -126; e <= 126; ++e) {
    const float p = std::ldexp(1.0f, e);
    EXPECT_EQ(float_to_e8m0(p), e + 127);
    EXPECT_EQ(float_to_e8m0(1.5f * p), e + 128) << "1.5 * 2^" << e << " rounds up";
    EXPECT_EQ(float_to_e8m0(std::nextafter(1.5f * p, 0.0f)), e + 127);
  }
  EXPECT_EQ(float_to_e8m0(0.0f), 0x00);
  EXPECT_EQ(float_to_e8m0(std::ldexp(1.0f, -140)), 0x00);
  EXPECT_EQ(float_to_e8m0(3e38f), 0xFE);
  EXPECT_EQ(float_to_e8m0(-1.0f), 0xFF);
  EXPECT_EQ(float_to_e8m0(std::numeric_limits<float>::quiet_NaN()), 0xFF);
  EXPECT_EQ(float_to_e8m0(std::numeric_limits<float>::infinity()), 0xFF);
}

TEST(FormatsCodecs, Bf16RoundsToNearestEven) {
  EXPECT_EQ(float_to_bf16(1.0f), 0x3F80);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808000u)), 0x3F80);  // tie, even stays
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F818000u)), 0x3F82);  // tie, odd goes up
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x3F808001u)), 0x3F81);
  EXPECT_EQ(float_to_bf16(std::bit_cast<float>(0x7F7FFFFFu)), 0x7F80);  // overflows to inf
  EXPECT_TRUE(std::isnan(bf16_to_float(float_to_bf16(std::bit_cast<float>(0x7F800001u)))));
  for (uint32_t b = 0; b < 0x10000; ++b) {
    const float f = bf16_to_float(static_cast<uint16_t>(b));
    EXPECT_EQ(std::bit_cast<uint32_t>(f), b << 16);
    if (!std::isnan(f)) ASSERT_EQ(float_to_bf16(f), b);
  }
}

// ---- NVFP4 -----------------------------------------------------------------------------------------

float max_abs(const float* x, size_t n) {
  float a = 0.0f;
  for (size_t i = 0; i < n; ++i) a = std::fmax(a, std::fabs(x[i]));
  return a;
}

TEST(FormatsNvfp4, GlobalScale) {
  EXPECT_EQ(nvfp4_global_scale(2688.0f), 1.0f);
  EXPECT_EQ(nvfp4_global_scale(0.0f), 1.0f);
  // A subnormal amax: the smallest normal scale, which has a finite reciprocal and quantizes.
  const float tiny = std::numeric_limits<float>::denorm_min();
  EXPECT_EQ(nvfp4_global_scale(tiny), std::numeric_limits<float>::min());
  const std::vector<float> row(32, tiny);
  const QuantizedMatrix q = quantize_nvfp4(row.data(), 1, 32, nvfp4_global_scale(tiny), ScaleDirection::decode);
  for (const float v : dequantize(q)) EXPECT_TRUE(std::isfinite(v) && std::fabs(v) <= 1e-30f);
  EXPECT_EQ(convert_global_scale(4.0f, ScaleDirection::decode, ScaleDirection::encode), 0.25f);
  EXPECT_EQ(convert_global_scale(4.0f, ScaleDirection::encode, ScaleDirection::encode), 4.0f);
  EXPECT_THROW(convert_global_scale(0.0f, ScaleDirection::decode, ScaleDirection::encode), Error);
  EXPECT_THROW(convert_global_scale(std::numeric_limits<float>::infinity(), ScaleDirection::encode,
                                    ScaleDirection::decode),
               Error);
  EXPECT_THROW(convert_global_scale(std::nanf(""), ScaleDirection::decode, ScaleDirection::decode),
               Error);
}

// Checks every block and element of an NVFP4 quantization against the recipe's guarantees.
void check_nvfp4(const std::vector<float>& x, const QuantizedMatrix& q, float g) {
  ASSERT_NO_THROW(validate(q, "quantized test matrix"));
  std::vector<float> deq(x.size(), std::numeric_limits<float>::quiet_NaN());
  dequantize(q, deq.data());
  const int64_t kcols = q.cols / 16;
  for (int64_t r = 0; r < q.rows; ++r) {
    for (int64_t b = 0; b < kcols; ++b) {
      const float* xb = x.data() + r * q.cols + b * 16;
      const float amax = max_abs(xb, 16);
      const double s = ref_e4m3(q.scales[static_cast<size_t>(r * kcols + b)]);
      // The block scale is target = amax / (6 g) (1 for an all-zero block, at least 2^-9) rounded
      // to E4M3: within half an ulp, i.e. 2^-4 relative for normals and 2^-10 absolute below 2^-6.
      double target = amax == 0.0f ? 1.0 : std::max(amax / (6.0 * g), std::ldexp(1.0, -9));
      target = std::min(target, 448.0);
      const double tol = target >= std::ldexp(1.0, -6) ? target / 16 : std::ldexp(1.0, -10);
      ASSERT_LE(std::fabs(s - target), tol * (1 + 1e-6)) << "row " << r << " block " << b;
      for (int i = 0; i < 16; ++i) {
        const int64_t idx = r * q.cols + b * 16 + i;
        const float qv = xb[i] / (static_cast<float>(s) * g);
        ASSERT_EQ(code_at(q, idx), nearest_e2m1(qv)) << "row " << r << " col " << b * 16 + i;
        // Error: half an E2M1 step at the element's magnitude times s*g, or the saturation loss
        // when rounding the scale down pushed |x| / (s g) above 6 (at most 6 / (1 - 2^-4)); plus
        // fp32 rounding of the two divisions and the products.
        const double sg = s * g;
        const double a = std::fabs(xb[i]) / sg;
        const double bound = (a > 6.0 ? std::fabs(xb[i]) - 6.0 * sg : e2m1_half_step(a) * sg) +
                             1e-6 * std::fabs(xb[i]) + 1e-6 * sg;
        ASSERT_LE(std::fabs(static_cast<double>(deq[static_cast<size_t>(idx)]) - xb[i]), bound)
            << "row " << r << " col " << b * 16 + i << " x " << xb[i];
        if (target >= std::ldexp(1.0, -6) && target < 448.0) {
          // A normal scale is rounded by at most 2^-4 relative, so |x| / (s g) <= 6 / (1 - 2^-4)
          // and the whole block's error stays within (amax / 6) (1 + 2^-4).
          ASSERT_LE(a, 6.0 / (1.0 - 1.0 / 16) * (1 + 1e-6));
          ASSERT_LE(std::fabs(static_cast<double>(deq[static_cast<size_t>(idx)]) - xb[i]),
                    amax / 6.0 * (1 + 1.0 / 16) * (1 + 1e-6));
        }
        ASSERT_EQ(q.element(r, b * 16 + i), deq[static_cast<size_t>(idx)]);
      }
    }
  }
}

TEST(FormatsNvfp4, QuantizeDequantizeErrorBoundOnRandomData) {
  const struct {
    int64_t rows, cols;
  } shapes[] = {{1, 16}, {7, 64}, {33, 48}, {128, 256}};
  uint32_t seed = 100;
  for (const auto& sh : shapes) {
    SCOPED_TRACE("shape " + std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " seed " +
                 std::to_string(seed));
    const auto x = random_matrix(sh.rows, sh.cols, 16, seed++);
    const float g = nvfp4_global_scale(max_abs(x.data(), x.size()));
    const QuantizedMatrix q = quantize_nvfp4(x.data(), sh.rows, sh.cols, g);
    EXPECT_EQ(q.format, Format::nvfp4);
    EXPECT_EQ(q.global_scale, g);
    check_nvfp4(x, q, g);
  }
}

TEST(FormatsNvfp4, ScaleSaturatesWhenGlobalScaleIsTooSmall) {
  // g far below amax / 2688: block scales saturate at 448 and elements at +-6.
  const auto x = random_matrix(4, 32, 16, 7);
  const float g = nvfp4_global_scale(max_abs(x.data(), x.size())) / 1024.0f;
  const QuantizedMatrix q = quantize_nvfp4(x.data(), 4, 32, g);
  for (int64_t i = 0; i < 4 * 32; ++i) {
    const float qv = x[static_cast<size_t>(i)] /
                     (static_cast<float>(ref_e4m3(q.scales[static_cast<size_t>(i / 16)])) * g);
    ASSERT_EQ(code_at(q, i), nearest_e2m1(qv)) << i;
  }
}

TEST(FormatsNvfp4, EncodeAndDecodeGlobalScaleGiveIdenticalResults) {
  const auto x = random_matrix(9, 96, 16, 42);
  const float encode = 2688.0f / max_abs(x.data(), x.size());
  const float decode = convert_global_scale(encode, ScaleDirection::encode, ScaleDirection::decode);
  const QuantizedMatrix a = quantize_nvfp4(x.data(), 9, 96, encode, ScaleDirection::encode);
  const QuantizedMatrix b = quantize_nvfp4(x.data(), 9, 96, decode, ScaleDirection::decode);
  EXPECT_EQ(a.global_scale, decode);
  EXPECT_EQ(a.data, b.data);
  EXPECT_EQ(a.scales, b.scales);
  EXPECT_EQ(dequantize(a), dequantize(b));
  // Reading the encode value as decode scales everything by g^2: the results must differ.
  const QuantizedMatrix wrong = quantize_nvfp4(x.data(), 9, 96, encode, ScaleDirection::decode);
  EXPECT_NE(wrong.scales, a.scales);
}

TEST(FormatsNvfp4, AllZeroBlockGetsScaleOne) {
  std::vector<float> x(64, 0.0f);
  for (int i = 16; i < 32; ++i) x[static_cast<size_t>(i)] = static_cast<float>(i - 20);
  const QuantizedMatrix q = quantize_nvfp4(x.data(), 2, 32, 0.01f);
  EXPECT_EQ(ref_e4m3(q.scales[0]), 1.0);
  EXPECT_EQ(ref_e4m3(q.scales[2]), 1.0);
  EXPECT_EQ(ref_e4m3(q.scales[3]), 1.0);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(code_at(q, i), 0) << i;
  const auto d = dequantize(q);
  for (int i = 32; i < 64; ++i) EXPECT_EQ(d[static_cast<size_t>(i)], 0.0f) << i;
  check_nvfp4(x, q, 0.01f);
}

TEST(FormatsNvfp4, SubnormalBlockScales) {
  // g = 1: a block of amax 6 * 2^-8 gets the subnormal scale 2^-8 (code 2); amax 6 * 2^-12 would
  // need 2^-12 and is clamped to 2^-9 (code 1); a block needing 1.5 * 2^-9 ties to code 2.
  std::vector<float> x(48, 0.0f);
  x[3] = 6.0f * std::ldexp(1.0f, -8);
  x[5] = -std::ldexp(1.0f, -9);
  x[20] = -6.0f * std::ldexp(1.0f, -12);
  x[21] = std::ldexp(1.0f, -13);
  x[40] = 6.0f * 1.5f * std::ldexp(1.0f, -9);
  const QuantizedMatrix q = quantize_nvfp4(x.data(), 1, 48, 1.0f);
  EXPECT_EQ(q.scales[0], 0x02);
  EXPECT_EQ(q.scales[1], 0x01);
  EXPECT_EQ(q.scales[2], 0x02);
  const auto d = dequantize(q);
  EXPECT_EQ(d[3], x[3]);
  EXPECT_EQ(d[5], x[5]);
  // -6 * 2^-12 / 2^-9 = -0.75: a tie between 0.5 and 1, rounds to the even code (1.0).
  EXPECT_EQ(d[20], -std::ldexp(1.0f, -9));
  // 2^-13 / 2^-9 = 1/16 rounds to zero.
  EXPECT_EQ(d[21], 0.0f);
  check_nvfp4(x, q, 1.0f);
}

TEST(FormatsNvfp4, NonFiniteInputThrows) {
  std::vector<float> x(32, 1.0f);
  x[17] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error_mentioning([&] { quantize_nvfp4(x.data(), 1, 32, 1.0f); }, "col 17"));
  x[17] = -std::numeric_limits<float>::infinity();
  EXPECT_THROW(quantize_nvfp4(x.data(), 1, 32, 1.0f), Error);
  x[17] = 1.0f;
  EXPECT_THROW(quantize_nvfp4(x.data(), 1, 32, 0.0f), Error);
  EXPECT_THROW(quantize_nvfp4(x.data(), 1, 32, std::nanf("")), Error);
  EXPECT_THROW(quantize_nvfp4(x.data(), 1, 32, -1.0f), Error);
}

// ---- MXFP4 -----------------------------------------------------------------------------------------

// Largest p with 2^p <= a, by counting binades (independent of frexp / ilogb).
int floor_log2(double a) {
  int p = 0;
  while (std::ldexp(1.0, p) > a) --p;
  while (std::ldexp(1.0, p + 1) <= a) ++p;
  return p;
}

TEST(FormatsMxfp4, QuantizeFollowsOcpRuleAndErrorBound) {
  const struct {
    int64_t rows, cols;
  } shapes[] = {{1, 32}, {5, 96}, {64, 128}};
  uint32_t seed = 200;
  for (const auto& sh : shapes) {
    SCOPED_TRACE("shape " + std::to_string(sh.rows) + "x" + std::to_string(sh.cols) + " seed " +
                 std::to_string(seed));
    const auto x = random_matrix(sh.rows, sh.cols, 32, seed++);
    const QuantizedMatrix q = quantize_mxfp4(x.data(), sh.rows, sh.cols);
    ASSERT_NO_THROW(validate(q, "mxfp4 test matrix"));
    EXPECT_EQ(q.global_scale, 1.0f);
    std::vector<float> deq(x.size(), std::numeric_limits<float>::quiet_NaN());
    dequantize(q, deq.data());
    const int64_t kcols = sh.cols / 32;
    for (int64_t r = 0; r < sh.rows; ++r) {
      for (int64_t b = 0; b < kcols; ++b) {
        const float* xb = x.data() + r * sh.cols + b * 32;
        const int s = floor_log2(max_abs(xb, 32)) - 2;
        ASSERT_EQ(q.scales[static_cast<size_t>(r * kcols + b)], s + 127) << r << " " << b;
        const double scale = std::ldexp(1.0, s);
        for (int i = 0; i < 32; ++i) {
          const int64_t idx = r * sh.cols + b * 32 + i;
          const double a = std::fabs(xb[i]) / scale;
          ASSERT_LT(a, 8.0);
          ASSERT_EQ(code_at(q, idx), nearest_e2m1(xb[i] / scale)) << "element " << idx;
          // Saturation loses up to 2 steps of scale (|x| / scale < 8 vs 6); otherwise half a step.
          const double bound = a > 6.0 ? std::fabs(xb[i]) - 6.0 * scale : e2m1_half_step(a) * scale;
          ASSERT_LE(std::fabs(deq[static_cast<size_t>(idx)] - static_cast<double>(xb[i])), bound)
              << "element " << idx;
        }
      }
    }
  }
}

TEST(FormatsMxfp4, AllZeroAndExtremeBlocks) {
  std::vector<float> x(128, 0.0f);
  x[32] = 3e38f;                         // s = 127 - 2 = 125
  x[64] = std::ldexp(1.0f, -140);        // s = -142 clamped to -127
  x[96] = -std::ldexp(1.0f, -125);       // s = -127 exactly; -2^-125 / 2^-127 = -4
  const QuantizedMatrix q = quantize_mxfp4(x.data(), 1, 128);
  EXPECT_EQ(q.scales[0], 0x00) << "all-zero block: s = -127";
  EXPECT_EQ(q.scales[1], 125 + 127);
  EXPECT_EQ(q.scales[2], 0x00);
  EXPECT_EQ(q.scales[3], 0x00);
  const auto d = dequantize(q);
  for (int i = 0; i < 32; ++i) EXPECT_EQ(d[static_cast<size_t>(i)], 0.0f);
  EXPECT_EQ(d[32], 4.0f * std::ldexp(1.0f, 125) * 1.5f) << "3e38 / 2^125 = 7.05 saturates to 6";
  EXPECT_EQ(d[64], 0.0f) << "2^-140 is far below half the smallest representable 2^-128";
  EXPECT_EQ(d[96], x[96]);
}

TEST(FormatsMxfp4, NonFiniteInputThrows) {
  std::vector<float> x(64, 1.0f);
  x[40] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_TRUE(throws_error_mentioning([&] { quantize_mxfp4(x.data(), 1, 64); }, "col 40"));
}

// ---- shapes and validation -------------------------------------------------------------------------

TEST(FormatsValidate, BadShapesAndSizesThrow) {
  std::vector<float> x(96, 1.0f);
  EXPECT_TRUE(throws_error_mentioning([&] { quantize_nvfp4(x.data(), 4, 24, 1.0f); }, "multiple"));
  EXPECT_TRUE(throws_error_mentioning([&] { quantize_mxfp4(x.data(), 2, 48); }, "multiple"));
  EXPECT_THROW(quantize_nvfp4(x.data(), -1, 16, 1.0f), Error);

  const QuantizedMatrix good = quantize_nvfp4(x.data(), 2, 48, 1.0f);
  EXPECT_NO_THROW(validate(good, "good"));
  QuantizedMatrix m = good;
  m.data.pop_back();
  EXPECT_TRUE(throws_error_mentioning([&] { validate(m, "W13[3]"); }, "W13[3]"));
  EXPECT_THROW(dequantize(m), Error);
  m = good;
  m.scales.push_back(0);
  EXPECT_TRUE(throws_error_mentioning([&] { validate(m, "W2[0]"); }, "W2[0]"));
  m = good;
  m.cols = 40;
  m.data.resize(40);
  m.scales.resize(5);
  EXPECT_TRUE(throws_error_mentioning([&] { validate(m, "odd cols"); }, "odd cols"));
  m = good;
  m.global_scale = 0.0f;
  EXPECT_THROW(validate(m, "zero global scale"), Error);
  m = good;
  m.format = Format::mxfp4;  // 48 is not a multiple of 32
  EXPECT_THROW(validate(m, "wrong format"), Error);
  EXPECT_THROW(good.element(2, 0), Error);
  EXPECT_THROW(good.element(0, 48), Error);

  const QuantizedMatrix empty = quantize_nvfp4(nullptr, 0, 32, 1.0f);
  EXPECT_TRUE(empty.empty());
  EXPECT_TRUE(dequantize(empty).empty());
}

// ---- nibble packing --------------------------------------------------------------------------------

TEST(FormatsNibbles, PackUnpackRoundTripWithOddCounts) {
  std::mt19937 rng(5);
  std::uniform_int_distribution<int> code(0, 15);
  for (size_t n : {size_t{0}, size_t{1}, size_t{2}, size_t{7}, size_t{33}, size_t{1001}}) {
    std::vector<uint8_t> codes(n);
    for (auto& c : codes) c = static_cast<uint8_t>(code(rng));
    const auto packed = pack_nibbles(codes);
    ASSERT_EQ(packed.size(), (n + 1) / 2);
    for (size_t i = 0; i < n; ++i) {
      ASSERT_EQ(i % 2 == 0 ? (packed[i / 2] & 0xF) : (packed[i / 2] >> 4), codes[i]) << i;
    }
    if (n % 2 == 1) EXPECT_EQ(packed.back() >> 4, 0) << "the unused high nibble must be 0";
    EXPECT_EQ(unpack_nibbles(packed, n), codes) << "n = " << n;
  }
  const std::vector<uint8_t> three = {1, 2, 3};
  EXPECT_EQ(pack_nibbles(three), (std::vector<uint8_t>{0x21, 0x03}));
  const std::vector<uint8_t> bad = {1, 16};
  EXPECT_THROW(pack_nibbles(bad), Error);
  const std::vector<uint8_t> two_bytes = {0x21, 0x03};
  EXPECT_THROW(unpack_nibbles(two_bytes, 5), Error);
}

// ---- swizzled 128x4 scale layout -------------------------------------------------------------------

TEST(FormatsSwizzle, OffsetsMatchSpecFormula) {
  EXPECT_EQ(swizzled_128x4_offset(0, 0, 5), 0u);
  EXPECT_EQ(swizzled_128x4_offset(0, 1, 5), 1u);
  EXPECT_EQ(swizzled_128x4_offset(1, 0, 5), 16u);
  EXPECT_EQ(swizzled_128x4_offset(32, 0, 5), 4u);
  EXPECT_EQ(swizzled_128x4_offset(127, 3, 5), 31u * 16 + 3 * 4 + 3);
  EXPECT_EQ(swizzled_128x4_offset(0, 4, 5), 512u);
  EXPECT_EQ(swizzled_128x4_offset(128, 0, 5), 1024u);  // Kt = 2 tiles of 512 bytes per 128 rows
  EXPECT_EQ(swizzled_128x4_offset(129, 4, 5), 1024u + 512 + 16);
  for (int64_t kcols : {1, 4, 5, 8, 13}) {
    for (int64_t m = 0; m < 300; m += 7) {
      for (int64_t k = 0; k < kcols; ++k) {
        ASSERT_EQ(swizzled_128x4_offset(m, k, kcols), ref_swizzled_offset(m, k, kcols))
            << m << " " << k << " " << kcols;
      }
    }
  }
  EXPECT_THROW(swizzled_128x4_offset(0, 5, 5), Error);
}

TEST(FormatsSwizzle, RoundTripWithPartialTiles) {
  const struct {
    int64_t rows, kcols;
  } shapes[] = {{130, 5}, {1, 1}, {128, 4}, {257, 9}, {0, 3}};
  uint32_t seed = 300;
  for (const auto& sh : shapes) {
    SCOPED_TRACE(std::to_string(sh.rows) + "x" + std::to_string(sh.kcols));
    std::mt19937 rng(seed++);
    std::uniform_int_distribution<int> byte(1, 255);  // non-zero so padding is distinguishable
    std::vector<uint8_t> linear(static_cast<size_t>(sh.rows * sh.kcols));
    for (auto& v : linear) v = static_cast<uint8_t>(byte(rng));
    const size_t size = swizzled_128x4_size(sh.rows, sh.kcols);
    EXPECT_EQ(size, static_cast<size_t>((sh.rows + 127) / 128 * 128 * ((sh.kcols + 3) / 4 * 4)));
    const auto sw = swizzle_scales_128x4(linear, sh.rows, sh.kcols);
    ASSERT_EQ(sw.size(), size);
    std::set<size_t> used;
    for (int64_t m = 0; m < sh.rows; ++m) {
      for (int64_t k = 0; k < sh.kcols; ++k) {
        const size_t off = ref_swizzled_offset(m, k, sh.kcols);
        ASSERT_LT(off, size);
        ASSERT_TRUE(used.insert(off).second) << "offset " << off << " used twice";
        ASSERT_EQ(sw[off], linear[static_cast<size_t>(m * sh.kcols + k)]) << m << " " << k;
      }
    }
    for (size_t i = 0; i < size; ++i) {
      if (!used.count(i)) ASSERT_EQ(sw[i], 0) << "padding byte " << i;
    }
    EXPECT_EQ(unswizzle_scales_128x4(sw, sh.rows, sh.kcols), linear);
    EXPECT_EQ(scales_to_linear(sw, ScaleLayout::swizzled_128x4, sh.rows, sh.kcols), linear);
    EXPECT_EQ(scales_to_linear(linear, ScaleLayout::linear, sh.rows, sh.kcols), linear);
  }
}

TEST(FormatsSwizzle, WrongByteCountsThrow) {
  const std::vector<uint8_t> linear(130 * 5, 1);
  EXPECT_THROW(swizzle_scales_128x4(linear, 130, 4), Error);
  const auto sw = swizzle_scales_128x4(linear, 130, 5);
  const std::vector<uint8_t> short_sw(sw.begin(), sw.end() - 1);
  EXPECT_TRUE(throws_error_mentioning([&] { unswizzle_scales_128x4(short_sw, 130, 5); }, "2048"));
  EXPECT_THROW(scales_to_linear(short_sw, ScaleLayout::swizzled_128x4, 130, 5), Error);
  EXPECT_THROW(scales_to_linear(linear, ScaleLayout::linear, 130, 6), Error);
  EXPECT_THROW(swizzled_128x4_size(-1, 4), Error);
}

}  // namespace
}  // namespace fp4moe
