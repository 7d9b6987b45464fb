// Register-level building blocks of the decode kernels: FP4 -> bf16 dequantization into
// mma.m16n8k16 A fragments, the block-scale multiplier, and the mma itself.
//
// NOTES: the packed layout (include/fp4moe/layout.h) permutes K inside a 64-column tile so that lane
// (g = lane / 4, q = lane % 4) needs columns [16q, 16q + 16) of rows g and g + 8: one 16-byte load of
// weights, one scale per row, and 32 contiguous bytes of each activation row. Step j of the four
// mma steps of a tile treats columns 16q + 4j + {0, 1} as mma rows 2q + {0, 1} of K and
// 16q + 4j + {2, 3} as 2q + 8 + {0, 1}; the activations (B) use the same map, so the product is the
// plain dot product.
#pragma once
#include <cuda_bf16.h>
#include <cstdint>

#include "fp4moe/layout.h"
#include "fp4moe/types.h"

namespace fp4moe::kernels {

// bf16 block-scale multipliers of rows g (lo) and g + 8 (hi), both halves equal, from the lane's two
// packed scale bytes: one byte permute and one multiply-add each.
template <Format F>
__device__ __forceinline__ void scale_pairs(uint32_t bytes, uint32_t& lo, uint32_t& hi) {
  const uint32_t b0 = __byte_perm(bytes, 0, 0x4040), b1 = __byte_perm(bytes, 0, 0x4141);  // (b, 0, b, 0)
  if constexpr (F == Format::nvfp4) {
    lo = b0 * 16u + 0x73007300u;  // e4m3 * 2^119
    hi = b1 * 16u + 0x73007300u;
  } else {
    lo = b0 << 7;  // 2^(s - 127 + c)
    hi = b1 << 7;
  }
}

__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

// A fragment of step j from the packed word: a0 (row g, k 2q..), a1 (row g+8), a2 (row g, k 2q+8..),
// a3 (row g+8, k 2q+8..), each multiplied by its row's scale.
__device__ __forceinline__ void dequant_word(uint32_t w, uint32_t s_lo, uint32_t s_hi, uint32_t a[4]) {
  a[0] = bf16x2_mul(unpack_pair<0>(w), s_lo);
  a[1] = bf16x2_mul(unpack_pair<1>(w), s_hi);
  a[2] = bf16x2_mul(unpack_pair<2>(w), s_lo);
  a[3] = bf16x2_mul(unpack_pair<3>(w), s_hi);
}

// The lane's four A fragments (k16 steps 0..3) of one packed (m-tile, k-tile): its 16 weight bytes
// and its two scale bytes (read at lane_scale_offset).
template <Format F>
__device__ __forceinline__ void dequant_tile(const uint4& w, uint32_t scale_bytes, uint32_t (&a)[4][4]) {
  uint32_t s_lo, s_hi;
  scale_pairs<F>(scale_bytes, s_lo, s_hi);
  dequant_word(w.x, s_lo, s_hi, a[0]);
  dequant_word(w.y, s_lo, s_hi, a[1]);
  dequant_word(w.z, s_lo, s_hi, a[2]);
  dequant_word(w.w, s_lo, s_hi, a[3]);
}

__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// L2 policy for data read exactly once (the weight stream): evicted before anything else, so it does
// not push out what was prefetched for the next phase.
// NOTES: the policy is the value createpolicy.fractional.L2::evict_first.b64 (fraction 1.0) returns,
// as a constant: ptxas then keeps it in uniform registers, where a createpolicy result costs two
// R2UR per load in the weight loop. tests/gpu/test_device_bits.cu checks that the two agree.
constexpr uint64_t kEvictFirstPolicy = 0x12F0000000000000ull;
__device__ __forceinline__ uint64_t evict_first_policy() { return kEvictFirstPolicy; }
__device__ __forceinline__ uint64_t created_evict_first_policy() {
  uint64_t pol;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
  return pol;
}

__device__ __forceinline__ uint4 ldg_stream(const void* p, uint64_t pol) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::cache_hint.v4.u32 {%0,%1,%2,%3}, [%4], %5;"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p), "l"(pol));
  return v;
}

// Asynchronous bulk prefetch of `bytes` (a multiple of 16) into L2.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
}

__device__ __forceinline__ uint32_t ldg_u16(const void* p) {
  unsigned short v;
  asm volatile("ld.global.nc.L1::no_allocate.u16 %0, [%1];" : "=h"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ uint4 ldg_cached(const void* p) {
  return __ldg(reinterpret_cast<const uint4*>(p));
}

// ---- NVFP4 activation quantization (W4A4), ModelOpt recipe --------------------------------------
__device__ __forceinline__ float e2m1_round(float v) {
  const float a = fabsf(v);
  float r;
  if (a <= 0.25f) r = 0.0f;
  else if (a < 0.75f) r = 0.5f;
  else if (a <= 1.25f) r = 1.0f;
  else if (a < 1.75f) r = 1.5f;
  else if (a <= 2.5f) r = 2.0f;
  else if (a < 3.5f) r = 3.0f;
  else if (a <= 5.0f) r = 4.0f;
  else r = 6.0f;
  return copysignf(r, v);
}

__device__ __forceinline__ float e4m3_round(float v) {
  unsigned short packed;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(packed) : "f"(0.0f), "f"(v));
  __half2_raw h;
  asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(*reinterpret_cast<uint32_t*>(&h)) : "h"(packed));
  return __half2float(__half(__half_raw{h.x}));
}

// Block scale of 16 values with amax `amax` and global scale g (decode direction).
__device__ __forceinline__ float nvfp4_block_scale(float amax, float g) {
  if (amax == 0.0f) return 1.0f;
  float s = amax / (6.0f * g);
  s = fmaxf(s, 0.001953125f);  // 2^-9
  return e4m3_round(s);
}

// W4A4: quantize-dequantize the lane's 16 activations (one NVFP4 block) in place, leaving
// e2m1 * e4m3 (exact in bf16); the global scale g is applied in the epilogue.
__device__ __forceinline__ void fake_quant_block(uint4 (&v)[2], float g) {
  float f[16];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const uint4& vv = v[i / 4];
    const uint32_t w = i % 4 == 0 ? vv.x : i % 4 == 1 ? vv.y : i % 4 == 2 ? vv.z : vv.w;
    f[2 * i] = __uint_as_float(w << 16);
    f[2 * i + 1] = __uint_as_float(w & 0xffff0000u);
  }
  float amax = 0.0f;
#pragma unroll
  for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(f[i]));
  const float s = nvfp4_block_scale(amax, g);
  const float denom = s * g;
  uint32_t o[8];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    __nv_bfloat162 h = __floats2bfloat162_rn(e2m1_round(f[2 * i] / denom) * s,
                                             e2m1_round(f[2 * i + 1] / denom) * s);
    o[i] = *reinterpret_cast<uint32_t*>(&h);
  }
  v[0] = make_uint4(o[0], o[1], o[2], o[3]);
  v[1] = make_uint4(o[4], o[5], o[6], o[7]);
}

}  // namespace fp4moe::kernels
