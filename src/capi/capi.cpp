// C ABI over the host-side FP4 formats: every entry point catches all exceptions and turns them
// into a status code plus a thread-local message.
#include "fp4moe/c_api.h"

#include <algorithm>
#include <exception>
#include <new>
#include <span>
#include <string>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace {

thread_local std::string g_last_error;

template <class F>
int guarded(F&& f) {
  g_last_error.clear();
  try {
    f();
    return FP4MOE_OK;
  } catch (const fp4moe::Error& e) {
    g_last_error = e.what();
    return FP4MOE_ERROR_INVALID;
  } catch (const std::bad_alloc&) {
    g_last_error = "out of host memory";
    return FP4MOE_ERROR_INTERNAL;
  } catch (const std::exception& e) {
    g_last_error = e.what();
    return FP4MOE_ERROR_INTERNAL;
  } catch (...) {
    g_last_error = "unknown failure";
    return FP4MOE_ERROR_INTERNAL;
  }
}

void check_ptr(const void* p, size_t n, const char* name, const char* fn) {
  FP4MOE_CHECK(n == 0 || p != nullptr, fn << ": `" << name << "` is NULL but " << n
                                          << " elements were requested.");
}

template <class In, class Out, class Codec>
int map_codec(const In* in, size_t n, Out* out, Codec codec, const char* fn) {
  return guarded([&] {
    check_ptr(in, n, "input", fn);
    check_ptr(out, n, "out", fn);
    for (size_t i = 0; i < n; ++i) out[i] = codec(in[i]);
  });
}

int64_t element_count(int64_t rows, int64_t cols, const char* fn) {
  FP4MOE_CHECK(rows >= 0 && cols >= 0,
               fn << " needs a non-negative shape, got [" << rows << ", " << cols << "].");
  return fp4moe::detail::checked_mul(rows, cols, fn);
}

fp4moe::ScaleDirection to_direction(int d) {
  FP4MOE_CHECK(d == FP4MOE_SCALE_DECODE || d == FP4MOE_SCALE_ENCODE,
               "direction must be FP4MOE_SCALE_DECODE (0) or FP4MOE_SCALE_ENCODE (1), got " << d << ".");
  return d == FP4MOE_SCALE_DECODE ? fp4moe::ScaleDirection::decode : fp4moe::ScaleDirection::encode;
}

fp4moe::Format to_format(int f) {
  FP4MOE_CHECK(f == FP4MOE_FORMAT_NVFP4 || f == FP4MOE_FORMAT_MXFP4,
               "format must be FP4MOE_FORMAT_NVFP4 (0) or FP4MOE_FORMAT_MXFP4 (1), got " << f << ".");
  return f == FP4MOE_FORMAT_NVFP4 ? fp4moe::Format::nvfp4 : fp4moe::Format::mxfp4;
}

void write_quantized(const fp4moe::QuantizedMatrix& m, uint8_t* data, uint8_t* scales) {
  std::copy(m.data.begin(), m.data.end(), data);
  std::copy(m.scales.begin(), m.scales.end(), scales);
}

}  // namespace

extern "C" {

const char* fp4moe_last_error(void) { return g_last_error.c_str(); }

int fp4moe_e2m1_decode(const uint8_t* codes, size_t n, float* out) {
  return map_codec(codes, n, out, fp4moe::e2m1_to_float, "fp4moe_e2m1_decode");
}
int fp4moe_e4m3_decode(const uint8_t* codes, size_t n, float* out) {
  return map_codec(codes, n, out, fp4moe::e4m3_to_float, "fp4moe_e4m3_decode");
}
int fp4moe_e8m0_decode(const uint8_t* codes, size_t n, float* out) {
  return map_codec(codes, n, out, fp4moe::e8m0_to_float, "fp4moe_e8m0_decode");
}
int fp4moe_bf16_decode(const uint16_t* bits, size_t n, float* out) {
  return map_codec(bits, n, out, fp4moe::bf16_to_float, "fp4moe_bf16_decode");
}
int fp4moe_e2m1_encode(const float* values, size_t n, uint8_t* out) {
  return map_codec(values, n, out, fp4moe::float_to_e2m1, "fp4moe_e2m1_encode");
}
int fp4moe_e4m3_encode(const float* values, size_t n, uint8_t* out) {
  return map_codec(values, n, out, fp4moe::float_to_e4m3, "fp4moe_e4m3_encode");
}
int fp4moe_e8m0_encode(const float* values, size_t n, uint8_t* out) {
  return map_codec(values, n, out, fp4moe::float_to_e8m0, "fp4moe_e8m0_encode");
}
int fp4moe_bf16_encode(const float* values, size_t n, uint16_t* out) {
  return map_codec(values, n, out, fp4moe::float_to_bf16, "fp4moe_bf16_encode");
}

int fp4moe_nvfp4_global_scale(float amax, float* out) {
  return guarded([&] {
    check_ptr(out, 1, "out", "fp4moe_nvfp4_global_scale");
    *out = fp4moe::nvfp4_global_scale(amax);
  });
}

int fp4moe_quantize_nvfp4(const float* x, int64_t rows, int64_t cols, float global_scale,
                          int direction, uint8_t* data, uint8_t* scales,
                          float* global_scale_decode) {
  return guarded([&] {
    const char* fn = "fp4moe_quantize_nvfp4";
    const int64_t n = element_count(rows, cols, fn);
    check_ptr(x, static_cast<size_t>(n), "x", fn);
    check_ptr(data, static_cast<size_t>(n / 2), "data", fn);
    check_ptr(scales, static_cast<size_t>(n / 16), "scales", fn);
    const fp4moe::QuantizedMatrix m =
        fp4moe::quantize_nvfp4(x, rows, cols, global_scale, to_direction(direction));
    write_quantized(m, data, scales);
    if (global_scale_decode != nullptr) *global_scale_decode = m.global_scale;
  });
}

int fp4moe_quantize_mxfp4(const float* x, int64_t rows, int64_t cols, uint8_t* data,
                          uint8_t* scales) {
  return guarded([&] {
    const char* fn = "fp4moe_quantize_mxfp4";
    const int64_t n = element_count(rows, cols, fn);
    check_ptr(x, static_cast<size_t>(n), "x", fn);
    check_ptr(data, static_cast<size_t>(n / 2), "data", fn);
    check_ptr(scales, static_cast<size_t>(n / 32), "scales", fn);
    write_quantized(fp4moe::quantize_mxfp4(x, rows, cols), data, scales);
  });
}

int fp4moe_dequantize(int format, int64_t rows, int64_t cols, const uint8_t* data,
                      const uint8_t* scales, float global_scale, float* out) {
  return guarded([&] {
    const char* fn = "fp4moe_dequantize";
    fp4moe::QuantizedMatrix m;
    m.format = to_format(format);
    const int64_t n = element_count(rows, cols, fn);
    FP4MOE_CHECK(cols % m.block() == 0, fn << ": cols = " << cols
                                           << " is not a multiple of the block size " << m.block()
                                           << ".");
    m.rows = rows;
    m.cols = cols;
    m.global_scale = global_scale;
    const size_t data_bytes = static_cast<size_t>(n / 2);
    const size_t scale_bytes = static_cast<size_t>(n / m.block());
    check_ptr(data, data_bytes, "data", fn);
    check_ptr(scales, scale_bytes, "scales", fn);
    check_ptr(out, static_cast<size_t>(n), "out", fn);
    m.data.assign(data, data + data_bytes);
    m.scales.assign(scales, scales + scale_bytes);
    fp4moe::dequantize(m, out);
  });
}

int fp4moe_swizzled_128x4_size(int64_t rows, int64_t kcols, size_t* out_bytes) {
  return guarded([&] {
    check_ptr(out_bytes, 1, "out_bytes", "fp4moe_swizzled_128x4_size");
    *out_bytes = fp4moe::swizzled_128x4_size(rows, kcols);
  });
}

int fp4moe_swizzle_scales_128x4(const uint8_t* linear, int64_t rows, int64_t kcols, uint8_t* out,
                                size_t out_bytes) {
  return guarded([&] {
    const char* fn = "fp4moe_swizzle_scales_128x4";
    const size_t n = static_cast<size_t>(element_count(rows, kcols, fn));
    check_ptr(linear, n, "linear", fn);
    const size_t want = fp4moe::swizzled_128x4_size(rows, kcols);
    FP4MOE_CHECK(out_bytes == want, fn << ": the output needs " << want << " bytes for [" << rows
                                       << ", " << kcols << "], got " << out_bytes << ".");
    check_ptr(out, want, "out", fn);
    const auto s = fp4moe::swizzle_scales_128x4(std::span<const uint8_t>(linear, n), rows, kcols);
    std::copy(s.begin(), s.end(), out);
  });
}

int fp4moe_unswizzle_scales_128x4(const uint8_t* swizzled, size_t swizzled_bytes, int64_t rows,
                                  int64_t kcols, uint8_t* out) {
  return guarded([&] {
    const char* fn = "fp4moe_unswizzle_scales_128x4";
    const size_t n = static_cast<size_t>(element_count(rows, kcols, fn));
    check_ptr(swizzled, swizzled_bytes, "swizzled", fn);
    check_ptr(out, n, "out", fn);
    const auto l = fp4moe::unswizzle_scales_128x4(
        std::span<const uint8_t>(swizzled, swizzled_bytes), rows, kcols);
    std::copy(l.begin(), l.end(), out);
  });
}

}  // extern "C"
