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

int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }  // no overflow near INT64_MAX

// Checks the shape and returns rows * kcols; every size derived from it (the padded swizzled
// count included) is then known to fit in 64 bits.
int64_t check_scale_shape(int64_t rows, int64_t kcols, const char* fn) {
  FP4MOE_CHECK(rows >= 0 && kcols >= 0,
               fn << " needs a non-negative scale shape, got [" << rows << ", " << kcols << "].");
  // Padded to 128 x 4: the padded product bounds both the linear and the swizzled byte counts.
  const int64_t prow = detail::checked_mul(ceil_div(rows, kTileRows), kTileRows, fn);
  const int64_t pcol = detail::checked_mul(ceil_div(kcols, kTileCols), kTileCols, fn);
  detail::checked_mul(prow, pcol, fn);
  return rows * kcols;
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
  FP4MOE_CHECK(count / 2 + count % 2 == packed.size(),
               "unpack_nibbles needs " << count / 2 + count % 2 << " bytes for " << count
                                       << " codes, got " << packed.size() << ".");
  std::vector<uint8_t> codes(count);
  for (size_t i = 0; i < count; ++i) {
    const uint8_t byte = packed[i / 2];
    codes[i] = (i % 2 == 0) ? (byte & 0x0Fu) : (byte >> 4);
  }
  return codes;
}

size_t swizzled_128x4_offset(int64_t m, int64_t k, int64_t kcols) {
  FP4MOE_CHECK(m >= 0 && m < INT64_MAX && k >= 0 && k < kcols,
               "swizzled_128x4_offset: (row " << m << ", scale column " << k
                                              << ") is outside a matrix with " << kcols
                                              << " scale columns.");
  check_scale_shape(m + 1, kcols, "swizzled_128x4_offset");  // the matrix holds row m
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
  const int64_t n = check_scale_shape(rows, kcols, "swizzle_scales_128x4");
  FP4MOE_CHECK(linear.size() == static_cast<uint64_t>(n),
               "swizzle_scales_128x4 needs " << n << " linear scale bytes for ["
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
  // Sizes first (overflow included), then the byte count the caller's data must back.
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
  const int64_t n = check_scale_shape(rows, kcols, "scales_to_linear");
  if (layout == ScaleLayout::swizzled_128x4) return unswizzle_scales_128x4(scales, rows, kcols);
  FP4MOE_CHECK(scales.size() == static_cast<uint64_t>(n),
               "linear block scales for [" << rows << ", " << kcols << "] need " << n
                                           << " bytes, got " << scales.size() << ".");
  return {scales.begin(), scales.end()};
}

}  // namespace fp4moe
