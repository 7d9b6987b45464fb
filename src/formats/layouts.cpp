// Nibble packing and the block-scale layouts found in checkpoints (linear, swizzled 128x4).
#include <cstdint>
#include <span>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe {
namespace {

// One 128x4 tile holds 128 rows of 4 scale columns: 512 bytes.
constexpr int64_t kTileRows = 128;
constexpr int64_t kTileCols = 4;
constexpr int64_t kTileBytes = kTileRows * kTileCols;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_scale_shape(int64_t rows, int64_t kcols, const char* fn) {
  FP4MOE_CHECK(rows >= 0 && kcols >= 0,
               fn << " needs a non-negative scale shape, got [" << rows << ", " << kcols << "].");
}

}  // namespace

std::vector<uint8_t> pack_nibbles(std::span<const uint8_t> codes) {
  std::vector<uint8_t> packed((codes.size() + 1) / 2, 0);
  for (size_t i = 0; i < codes.size(); ++i) {
    FP4MOE_CHECK(codes[i] <= 0xF, "pack_nibbles got the value " << int{codes[i]} << " at index " << i
                                                                << "; FP4 codes are 0..15.");
    packed[i / 2] |= static_cast<uint8_t>((i % 2 == 0) ? codes[i] : (codes[i] << 4));
  }
  return packed;
}

std::vector<uint8_t> unpack_nibbles(std::span<const uint8_t> packed, size_t count) {
  FP4MOE_CHECK(packed.size() == (count + 1) / 2,
               "unpack_nibbles needs " << (count + 1) / 2 << " bytes for " << count
                                       << " codes, got " << packed.size() << ".");
  std::vector<uint8_t> codes(count);
  for (size_t i = 0; i < count; ++i) {
    const uint8_t byte = packed[i / 2];
    codes[i] = (i % 2 == 0) ? (byte & 0x0Fu) : (byte >> 4);
  }
  return codes;
}

size_t swizzled_128x4_offset(int64_t m, int64_t k, int64_t kcols) {
  FP4MOE_CHECK(m >= 0 && k >= 0 && k < kcols,
               "swizzled_128x4_offset: (row " << m << ", scale column " << k
                                              << ") is outside a matrix with " << kcols
                                              << " scale columns.");
  const int64_t kt = ceil_div(kcols, kTileCols);
  return static_cast<size_t>((m / kTileRows) * kt * kTileBytes + (k / kTileCols) * kTileBytes +
                             (m % 32) * 16 + ((m % kTileRows) / 32) * 4 + k % kTileCols);
}

size_t swizzled_128x4_size(int64_t rows, int64_t kcols) {
  check_scale_shape(rows, kcols, "swizzled_128x4_size");
  return static_cast<size_t>(ceil_div(rows, kTileRows) * ceil_div(kcols, kTileCols) * kTileBytes);
}

std::vector<uint8_t> swizzle_scales_128x4(std::span<const uint8_t> linear, int64_t rows,
                                          int64_t kcols) {
  check_scale_shape(rows, kcols, "swizzle_scales_128x4");
  FP4MOE_CHECK(static_cast<int64_t>(linear.size()) == rows * kcols,
               "swizzle_scales_128x4 needs " << rows * kcols << " linear scale bytes for ["
                                             << rows << ", " << kcols << "], got " << linear.size()
                                             << ".");
  std::vector<uint8_t> out(swizzled_128x4_size(rows, kcols), 0);
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t k = 0; k < kcols; ++k) {
      out[swizzled_128x4_offset(m, k, kcols)] = linear[static_cast<size_t>(m * kcols + k)];
    }
  }
  return out;
}

std::vector<uint8_t> unswizzle_scales_128x4(std::span<const uint8_t> swizzled, int64_t rows,
                                            int64_t kcols) {
  const size_t want = swizzled_128x4_size(rows, kcols);
  FP4MOE_CHECK(swizzled.size() == want,
               "unswizzle_scales_128x4 needs " << want << " swizzled scale bytes for [" << rows
                                               << ", " << kcols << "] (rows padded to 128, columns "
                                               << "to 4), got " << swizzled.size() << ".");
  std::vector<uint8_t> out(static_cast<size_t>(rows * kcols));
  for (int64_t m = 0; m < rows; ++m) {
    for (int64_t k = 0; k < kcols; ++k) {
      out[static_cast<size_t>(m * kcols + k)] = swizzled[swizzled_128x4_offset(m, k, kcols)];
    }
  }
  return out;
}

std::vector<uint8_t> scales_to_linear(std::span<const uint8_t> scales, ScaleLayout layout,
                                      int64_t rows, int64_t kcols) {
  check_scale_shape(rows, kcols, "scales_to_linear");
  if (layout == ScaleLayout::swizzled_128x4) return unswizzle_scales_128x4(scales, rows, kcols);
  FP4MOE_CHECK(static_cast<int64_t>(scales.size()) == rows * kcols,
               "linear block scales for [" << rows << ", " << kcols << "] need " << rows * kcols
                                           << " bytes, got " << scales.size() << ".");
  return {scales.begin(), scales.end()};
}

}  // namespace fp4moe
