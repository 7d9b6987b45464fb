// Scalar codecs for E2M1, E4M3 (OCP "fn"), E8M0 and bfloat16, derived from the bit layouts.
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#include "fp4moe/formats.h"

namespace fp4moe {
namespace {

// Decodes a sign-less minifloat field with `man_bits` mantissa bits and exponent `bias`; exponent
// field 0 is subnormal (no implicit one).
float decode_minifloat(uint32_t exp_field, uint32_t man_field, int man_bits, int bias) {
  const float man = static_cast<float>(man_field);
  if (exp_field == 0) return std::ldexp(man, 1 - bias - man_bits);
  return std::ldexp(static_cast<float>((1u << man_bits) + man_field),
                    static_cast<int>(exp_field) - bias - man_bits);
}

// Rounds |v| (finite, >= 0) to the minifloat with `man_bits` mantissa bits and exponent `bias`,
// ties to even, and returns the sign-less code, saturated at max_code. The subnormal and normal
// cases share one formula: with e clamped at the smallest normal exponent, the code is
// ((e + bias) << man_bits) + r - 2^man_bits, where r is the significand rounded to an integer
// multiple of the quantum 2^(e - man_bits). A carry of r into the next binade (r == 2^(man_bits+1))
// lands on the next exponent field by the same formula, and r's parity is the code's parity, so
// ties to even on r are ties to even on the code.
uint32_t encode_minifloat_magnitude(float a, int man_bits, int bias, uint32_t max_code) {
  if (a == 0.0f) return 0;
  if (std::isinf(a)) return max_code;
  int e = std::ilogb(a);  // floor(log2(a)), exact for subnormal floats too
  const int e_min = 1 - bias;
  if (e < e_min) e = e_min;
  // a / 2^(e - man_bits) is exact (a power-of-two rescale of a value that stays a normal float).
  const double n = std::ldexp(static_cast<double>(a), man_bits - e);
  const double r = std::nearbyint(n);  // current rounding mode: to nearest, ties to even
  const int64_t code = (static_cast<int64_t>(e + bias) << man_bits) + static_cast<int64_t>(r) -
                       (int64_t{1} << man_bits);
  if (code > static_cast<int64_t>(max_code)) return max_code;
  return static_cast<uint32_t>(code);
}

}  // namespace

float e2m1_to_float(uint8_t code) {
  const float mag = decode_minifloat((code >> 1) & 0x3u, code & 0x1u, 1, 1);
  return (code & 0x8u) ? -mag : mag;
}

uint8_t float_to_e2m1(float v) {
  if (std::isnan(v)) return 0;
  const uint32_t mag = encode_minifloat_magnitude(std::fabs(v), 1, 1, 0x7u);
  return static_cast<uint8_t>((std::signbit(v) ? 0x8u : 0u) | mag);
}

float e4m3_to_float(uint8_t code) {
  if ((code & 0x7Fu) == 0x7Fu) return std::numeric_limits<float>::quiet_NaN();
  const float mag = decode_minifloat((code >> 3) & 0xFu, code & 0x7u, 3, 7);
  return (code & 0x80u) ? -mag : mag;
}

uint8_t float_to_e4m3(float v) {
  if (std::isnan(v)) return 0x7F;
  const uint32_t mag = encode_minifloat_magnitude(std::fabs(v), 3, 7, 0x7Eu);
  return static_cast<uint8_t>((std::signbit(v) ? 0x80u : 0u) | mag);
}

float e8m0_to_float(uint8_t code) {
  if (code == 0xFF) return std::numeric_limits<float>::quiet_NaN();
  return std::ldexp(1.0f, static_cast<int>(code) - 127);
}

uint8_t float_to_e8m0(float v) {
  if (std::isnan(v) || std::signbit(v) || std::isinf(v)) return 0xFF;
  if (v == 0.0f) return 0x00;
  int e = std::ilogb(v);
  // With no mantissa bits the significand 1.f rounds to 1 or 2; a tie (1.5) goes up.
  const float significand = std::ldexp(v, -e);
  if (significand >= 1.5f) ++e;
  if (e < -127) return 0x00;
  if (e > 127) return 0xFE;
  return static_cast<uint8_t>(e + 127);
}

float bf16_to_float(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

uint16_t float_to_bf16(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  // Keep NaN a NaN: truncation could clear every mantissa bit, so force the quiet bit.
  if (std::isnan(v)) return static_cast<uint16_t>((u >> 16) | 0x0040u);
  const uint32_t rounding = 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

}  // namespace fp4moe
