/* C ABI of fp4moe's host-side FP4 formats, for ctypes and other foreign-function users.
 *
 * Every function returns FP4MOE_OK (0) on success or a non-zero status; on failure
 * fp4moe_last_error() returns a message for the calling thread (valid until that thread's next call
 * into this API). No C++ exception crosses this boundary. The caller owns every buffer; sizes are
 * in elements unless a parameter says bytes. Matrices are row-major; FP4 data is packed two codes
 * per byte (element 2j in the low nibble of byte j) and block scales are linear [rows, cols / block]
 * unless a function says otherwise. */
#ifndef FP4MOE_C_API_H
#define FP4MOE_C_API_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum {
  FP4MOE_OK = 0,
  FP4MOE_ERROR_INVALID = 1, /* bad argument: shape, size, pointer or value */
  FP4MOE_ERROR_INTERNAL = 2 /* unexpected failure, e.g. out of memory */
};

/* Formats (fp4moe::Format) and NVFP4 global-scale directions (fp4moe::ScaleDirection). */
enum { FP4MOE_FORMAT_NVFP4 = 0, FP4MOE_FORMAT_MXFP4 = 1 };
enum { FP4MOE_SCALE_DECODE = 0, FP4MOE_SCALE_ENCODE = 1 };

/* Message of the calling thread's last failure; "" if none. Never NULL. */
const char* fp4moe_last_error(void);

/* Element-wise codecs over n values. Decoding reads codes (E2M1 uses code & 0xF); encoding rounds
 * to nearest, ties to even (E8M0: to the nearest power of two, 1.5 rounds up) and saturates, as
 * documented in fp4moe/formats.h. */
int fp4moe_e2m1_decode(const uint8_t* codes, size_t n, float* out);
int fp4moe_e4m3_decode(const uint8_t* codes, size_t n, float* out);
int fp4moe_e8m0_decode(const uint8_t* codes, size_t n, float* out);
int fp4moe_bf16_decode(const uint16_t* bits, size_t n, float* out);
int fp4moe_e2m1_encode(const float* values, size_t n, uint8_t* out);
int fp4moe_e4m3_encode(const float* values, size_t n, uint8_t* out);
int fp4moe_e8m0_encode(const float* values, size_t n, uint8_t* out);
int fp4moe_bf16_encode(const float* values, size_t n, uint16_t* out);

/* NVFP4 decode-direction global scale for a tensor of largest magnitude amax (amax / 2688). */
int fp4moe_nvfp4_global_scale(float amax, float* out);

/* Quantizes x[rows, cols] (cols a multiple of 16) with the ModelOpt recipe. global_scale is read in
 * `direction` (FP4MOE_SCALE_*). Writes data[rows * cols / 2], scales[rows * cols / 16] (E4M3
 * codes) and, if global_scale_decode is not NULL, the decode-direction global scale used. */
int fp4moe_quantize_nvfp4(const float* x, int64_t rows, int64_t cols, float global_scale,
                          int direction, uint8_t* data, uint8_t* scales,
                          float* global_scale_decode);

/* Quantizes x[rows, cols] (cols a multiple of 32) per OCP MX v1.0. Writes data[rows * cols / 2]
 * and scales[rows * cols / 32] (E8M0 codes). */
int fp4moe_quantize_mxfp4(const float* x, int64_t rows, int64_t cols, uint8_t* data,
                          uint8_t* scales);

/* Dequantizes into out[rows * cols]. global_scale is the decode direction (must be 1 for MXFP4). */
int fp4moe_dequantize(int format, int64_t rows, int64_t cols, const uint8_t* data,
                      const uint8_t* scales, float global_scale, float* out);

/* Swizzled 128x4 block-scale layout (TRT-LLM / FlashInfer) of a [rows, kcols] scale matrix. */
int fp4moe_swizzled_128x4_size(int64_t rows, int64_t kcols, size_t* out_bytes);
/* linear[rows * kcols] -> out[out_bytes]; out_bytes must equal fp4moe_swizzled_128x4_size. */
int fp4moe_swizzle_scales_128x4(const uint8_t* linear, int64_t rows, int64_t kcols, uint8_t* out,
                                size_t out_bytes);
/* swizzled[swizzled_bytes] -> out[rows * kcols]. */
int fp4moe_unswizzle_scales_128x4(const uint8_t* swizzled, size_t swizzled_bytes, int64_t rows,
                                  int64_t kcols, uint8_t* out);

#ifdef __cplusplus
}
#endif

#endif /* FP4MOE_C_API_H */
