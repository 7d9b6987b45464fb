// NVFP4 (ModelOpt recipe) and MXFP4 (OCP MX v1.0) quantization, dequantization and validation.
#include <cmath>
#include <limits>
#include <cstdint>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe {
namespace {

constexpr float kE2m1Max = 6.0f;
constexpr float kE4m3Max = 448.0f;
// Smallest E4M3 subnormal: a block scale below it would round to zero and lose the whole block.
const float kE4m3MinScale = std::ldexp(1.0f, -9);

const char* format_name(Format f) { return f == Format::nvfp4 ? "nvfp4" : "mxfp4"; }

void check_shape(int64_t rows, int64_t cols, int block, const char* fmt) {
  FP4MOE_CHECK(rows >= 0 && cols >= 0,
               fmt << " quantization needs a non-negative shape, got [" << rows << ", " << cols << "].");
  FP4MOE_CHECK(cols % block == 0, fmt << " quantization needs cols to be a multiple of the block size "
                                      << block << ", got cols = " << cols << ".");
  detail::checked_mul(rows, cols, "quantization shape [rows, cols]");
}

// Largest magnitude of one block; a NaN or infinite input has no meaningful block scale, so it is
// rejected with the position the caller can look up.
float block_amax(const float* x, int n, int64_t row, int64_t col0, const char* fmt) {
  float amax = 0.0f;
  for (int i = 0; i < n; ++i) {
    FP4MOE_CHECK(std::isfinite(x[i]), fmt << " quantization input has a non-finite value ("
                                          << x[i] << ") at row " << row << ", col " << col0 + i
                                          << "; clean the tensor before quantizing.");
    amax = std::fmax(amax, std::fabs(x[i]));
  }
  return amax;
}

void set_nibble(std::vector<uint8_t>& data, int64_t index, uint8_t code) {
  uint8_t& byte = data[static_cast<size_t>(index / 2)];
  byte = (index % 2 == 0) ? static_cast<uint8_t>((byte & 0xF0u) | code)
                          : static_cast<uint8_t>((byte & 0x0Fu) | (code << 4));
}

float decode_scale(Format f, uint8_t code) {
  return f == Format::nvfp4 ? e4m3_to_float(code) : e8m0_to_float(code);
}

}  // namespace

float QuantizedMatrix::element(int64_t r, int64_t c) const {
  validate(*this, "QuantizedMatrix::element");
  FP4MOE_CHECK(r >= 0 && r < rows && c >= 0 && c < cols,
               "element (" << r << ", " << c << ") is outside the [" << rows << ", " << cols
                           << "] quantized matrix.");
  const int64_t index = r * cols + c;
  const uint8_t byte = data[static_cast<size_t>(index / 2)];
  const uint8_t code = (index % 2 == 0) ? (byte & 0x0Fu) : (byte >> 4);
  const float scale = decode_scale(format, scales[static_cast<size_t>(r * scale_cols() + c / block())]);
  return e2m1_to_float(code) * scale * global_scale;
}

float nvfp4_global_scale(float amax) {
  FP4MOE_CHECK(std::isfinite(amax) && amax >= 0.0f,
               "nvfp4_global_scale needs a finite, non-negative amax, got " << amax << ".");
  if (amax == 0.0f) return 1.0f;
  // A subnormal amax would give 0 (or a scale without a finite reciprocal): the smallest normal
  // float instead, which quantizes such a tensor to zeros and the smallest codes.
  return std::max(amax / (kE2m1Max * kE4m3Max), std::numeric_limits<float>::min());
}

float convert_global_scale(float g, ScaleDirection from, ScaleDirection to) {
  FP4MOE_CHECK(std::isfinite(g) && g != 0.0f,
               "a global scale must be finite and non-zero to convert its direction, got " << g << ".");
  return from == to ? g : 1.0f / g;
}

QuantizedMatrix quantize_nvfp4(const float* x, int64_t rows, int64_t cols, float global_scale,
                               ScaleDirection dir) {
  constexpr int kBlock = 16;
  check_shape(rows, cols, kBlock, "nvfp4");
  FP4MOE_CHECK(rows * cols == 0 || x != nullptr, "nvfp4 quantization got a null input pointer.");
  FP4MOE_CHECK(std::isfinite(global_scale) && global_scale > 0.0f,
               "nvfp4 quantization needs a finite, positive global scale, got " << global_scale << ".");
  const float g = convert_global_scale(global_scale, dir, ScaleDirection::decode);
  FP4MOE_CHECK(std::isfinite(g) && g > 0.0f,
               "the global scale " << global_scale << " has no finite decode-direction reciprocal.");

  QuantizedMatrix m;
  m.format = Format::nvfp4;
  m.rows = rows;
  m.cols = cols;
  m.global_scale = g;
  m.data.assign(static_cast<size_t>(rows * cols / 2), 0);
  m.scales.assign(static_cast<size_t>(rows * (cols / kBlock)), 0);
  const int64_t kcols = cols / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < kcols; ++b) {
      const float* xb = x + r * cols + b * kBlock;
      const float amax = block_amax(xb, kBlock, r, b * kBlock, "nvfp4");
      float scale = amax / (kE2m1Max * g);
      if (amax == 0.0f) scale = 1.0f;
      scale = std::fmax(scale, kE4m3MinScale);
      const uint8_t scale_code = float_to_e4m3(scale);
      m.scales[static_cast<size_t>(r * kcols + b)] = scale_code;
      const float denom = e4m3_to_float(scale_code) * g;
      for (int i = 0; i < kBlock; ++i) {
        set_nibble(m.data, r * cols + b * kBlock + i, float_to_e2m1(xb[i] / denom));
      }
    }
  }
  return m;
}

QuantizedMatrix quantize_mxfp4(const float* x, int64_t rows, int64_t cols) {
  constexpr int kBlock = 32;
  // Largest E2M1 exponent: the block's top binade maps onto [4, 8), saturating above 6.
  constexpr int kE2m1Emax = 2;
  check_shape(rows, cols, kBlock, "mxfp4");
  FP4MOE_CHECK(rows * cols == 0 || x != nullptr, "mxfp4 quantization got a null input pointer.");

  QuantizedMatrix m;
  m.format = Format::mxfp4;
  m.rows = rows;
  m.cols = cols;
  m.global_scale = 1.0f;
  m.data.assign(static_cast<size_t>(rows * cols / 2), 0);
  m.scales.assign(static_cast<size_t>(rows * (cols / kBlock)), 0);
  const int64_t kcols = cols / kBlock;
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t b = 0; b < kcols; ++b) {
      const float* xb = x + r * cols + b * kBlock;
      const float amax = block_amax(xb, kBlock, r, b * kBlock, "mxfp4");
      // All-zero block: the smallest scale (code 0, 2^-127); every element encodes as 0 anyway.
      int s = -127;
      if (amax > 0.0f) s = std::ilogb(amax) - kE2m1Emax;
      if (s < -127) s = -127;
      if (s > 127) s = 127;
      m.scales[static_cast<size_t>(r * kcols + b)] = static_cast<uint8_t>(s + 127);
      for (int i = 0; i < kBlock; ++i) {
        // Division by a power of two is exact unless the quotient is subnormal, where it rounds
        // once, the same as x / 2^s in fp32.
        set_nibble(m.data, r * cols + b * kBlock + i, float_to_e2m1(std::ldexp(xb[i], -s)));
      }
    }
  }
  return m;
}

void validate(const QuantizedMatrix& m, const char* what) {
  const char* fmt = format_name(m.format);
  const int block = m.block();
  FP4MOE_CHECK(m.rows >= 0 && m.cols >= 0, what << " (" << fmt << ") has a negative shape ["
                                                 << m.rows << ", " << m.cols << "].");
  FP4MOE_CHECK(m.cols % block == 0, what << " (" << fmt << ") has " << m.cols
                                         << " columns, which is not a multiple of the block size "
                                         << block << ".");
  const int64_t want_data = detail::checked_mul(m.rows, m.cols, what) / 2;
  FP4MOE_CHECK(static_cast<int64_t>(m.data.size()) == want_data,
               what << " (" << fmt << ", [" << m.rows << ", " << m.cols << "]) needs " << want_data
                    << " packed data bytes, got " << m.data.size() << ".");
  const int64_t want_scales = m.rows * (m.cols / block);
  FP4MOE_CHECK(static_cast<int64_t>(m.scales.size()) == want_scales,
               what << " (" << fmt << ", [" << m.rows << ", " << m.cols << "]) needs " << want_scales
                    << " block-scale bytes, got " << m.scales.size() << ".");
  if (m.format == Format::nvfp4) {
    FP4MOE_CHECK(std::isfinite(m.global_scale) && m.global_scale > 0.0f,
                 what << " (nvfp4) needs a finite, positive decode-direction global scale, got "
                      << m.global_scale << ".");
  } else {
    FP4MOE_CHECK(m.global_scale == 1.0f,
                 what << " (mxfp4) has no global scale; it must be 1, got " << m.global_scale << ".");
  }
}

void dequantize(const QuantizedMatrix& m, float* out) {
  validate(m, "dequantize input");
  FP4MOE_CHECK(m.rows * m.cols == 0 || out != nullptr, "dequantize got a null output pointer.");
  const int block = m.block();
  const int64_t kcols = m.scale_cols();
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t b = 0; b < kcols; ++b) {
      const float scale = decode_scale(m.format, m.scales[static_cast<size_t>(r * kcols + b)]);
      for (int i = 0; i < block; ++i) {
        const int64_t index = r * m.cols + b * block + i;
        const uint8_t byte = m.data[static_cast<size_t>(index / 2)];
        const uint8_t code = (index % 2 == 0) ? (byte & 0x0Fu) : (byte >> 4);
        out[index] = e2m1_to_float(code) * scale * m.global_scale;
      }
    }
  }
}

std::vector<float> dequantize(const QuantizedMatrix& m) {
  validate(m, "dequantize input");
  std::vector<float> out(static_cast<size_t>(m.rows * m.cols));
  dequantize(m, out.data());
  return out;
}

}  // namespace fp4moe
