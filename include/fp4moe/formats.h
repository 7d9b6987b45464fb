// FP4 formats on the host: element and scale codecs, quantize / dequantize, nibble packing and the
// block-scale layouts seen in checkpoints. Definitions follow SPEC "FP4 formats" exactly.
#pragma once
#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

#include "fp4moe/types.h"

namespace fp4moe {

// ---- scalar codecs -------------------------------------------------------------------------------
// E2M1: codes 0..7 = {0, 0.5, 1, 1.5, 2, 3, 4, 6}, 8..15 their negatives (8 is -0).
float e2m1_to_float(uint8_t code);            // code & 0xF
uint8_t float_to_e2m1(float v);               // nearest, ties to even, saturating at +-6; NaN -> +0
// E4M3 (OCP FP8, "fn": no inf, 0x7F / 0xFF are NaN, max 448).
float e4m3_to_float(uint8_t code);
uint8_t float_to_e4m3(float v);               // nearest, ties to even, saturating at +-448; NaN -> 0x7F
// E8M0 (OCP MX): 2^(code - 127), 0xFF is NaN.
float e8m0_to_float(uint8_t code);
// Nearest power of two (significand 1.5 rounds up), saturating to [2^-127, 2^127]; 0 -> 0x00;
// NaN, inf and negative values -> 0xFF.
uint8_t float_to_e8m0(float v);
// bfloat16 stored as uint16_t bits.
float bf16_to_float(uint16_t bits);
uint16_t float_to_bf16(float v);              // nearest, ties to even; NaN stays NaN

// ---- quantized matrices ----------------------------------------------------------------------------
// One FP4 matrix [rows, cols] in the standard checkpoint layout: K = cols runs along a row, elements
// 2j / 2j+1 in the low / high nibble of byte j, block scales linear [rows, cols / block].
struct QuantizedMatrix {
  Format format = Format::nvfp4;
  int64_t rows = 0;
  int64_t cols = 0;
  std::vector<uint8_t> data;    // rows * cols / 2 bytes
  std::vector<uint8_t> scales;  // rows * (cols / block) bytes: E4M3 (nvfp4) or E8M0 (mxfp4)
  float global_scale = 1.0f;    // decode direction; always 1 for mxfp4

  int block() const { return block_size(format); }
  int64_t scale_cols() const { return cols / block(); }
  bool empty() const { return rows == 0; }
  float element(int64_t r, int64_t c) const;  // dequantized value of one element
};

// NVFP4 per-tensor scale in the decode direction for a tensor whose largest magnitude is amax:
// amax / (6 * 448), at least the smallest normal float (a subnormal amax); 1.0 when amax is 0.
float nvfp4_global_scale(float amax);
// Converts a global scale between directions (reciprocal); throws on 0, inf or NaN.
float convert_global_scale(float g, ScaleDirection from, ScaleDirection to);

// ModelOpt recipe (SPEC): block scale = block_amax / (6 * g) (all-zero block -> 1.0), clamped below at
// 2^-9, rounded to E4M3; element = x / (scale * g) rounded to E2M1 (ties to even, saturating).
// cols must be a multiple of 16. `global_scale` is read in direction `dir`.
QuantizedMatrix quantize_nvfp4(const float* x, int64_t rows, int64_t cols, float global_scale,
                               ScaleDirection dir = ScaleDirection::decode);
// OCP MX v1.0: s = floor(log2(block_amax)) - 2 (all-zero block: s = -127), elements rounded to
// nearest even and saturated. cols must be a multiple of 32.
QuantizedMatrix quantize_mxfp4(const float* x, int64_t rows, int64_t cols);

// Dequantize into out[rows * cols] (fp32).
void dequantize(const QuantizedMatrix& m, float* out);
std::vector<float> dequantize(const QuantizedMatrix& m);

// Validates sizes of data / scales against rows, cols and the format (cols a multiple of the block);
// throws fp4moe::Error naming `what` otherwise.
void validate(const QuantizedMatrix& m, const char* what);

// ---- nibble packing --------------------------------------------------------------------------------
// codes[n] (values 0..15) -> packed[(n + 1) / 2]; element 2j in the low nibble of byte j.
std::vector<uint8_t> pack_nibbles(std::span<const uint8_t> codes);
std::vector<uint8_t> unpack_nibbles(std::span<const uint8_t> packed, size_t count);

// ---- block-scale layouts ---------------------------------------------------------------------------
// Swizzled 128x4 layout (TRT-LLM / FlashInfer): for row m, scale column k of a matrix with
// kcols = K / 16 scale columns: Kt = ceil(kcols / 4),
// offset = (m / 128) * Kt * 512 + (k / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + k % 4.
size_t swizzled_128x4_offset(int64_t m, int64_t k, int64_t kcols);
size_t swizzled_128x4_size(int64_t rows, int64_t kcols);  // padded byte count
// linear [rows, kcols] <-> swizzled (padding bytes are written as 0 and ignored on the way back).
std::vector<uint8_t> swizzle_scales_128x4(std::span<const uint8_t> linear, int64_t rows, int64_t kcols);
std::vector<uint8_t> unswizzle_scales_128x4(std::span<const uint8_t> swizzled, int64_t rows,
                                            int64_t kcols);
// Converts scales in `layout` to linear (identity for linear); checks the byte count.
std::vector<uint8_t> scales_to_linear(std::span<const uint8_t> scales, ScaleLayout layout,
                                      int64_t rows, int64_t kcols);

}  // namespace fp4moe
