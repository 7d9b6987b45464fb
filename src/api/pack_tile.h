// The per-tile packing math of the packed kernel layout (include/fp4moe/layout.h), shared by the
// host prepack (src/api/prepack.cpp) and the device prepack (src/api/prepack_device.cu) so the two
// cannot drift apart: the bit placement of the E2M1 pairs, the block-scale re-encoding and the
// epilogue factors. Change the layout here (and in the kernels that read it), nowhere else.
#pragma once
#include <cstdint>

#include "fp4moe/layout.h"

#if defined(__CUDA_ARCH__)
#define FP4MOE_PACK_UNROLL _Pragma("unroll")
#else
#define FP4MOE_PACK_UNROLL
#endif

namespace fp4moe::pack {

// The bits of pair p in a packed word from one checkpoint byte (low nibble = low element): the XOR of
// one basis word per set nibble bit, where basis word (p, n) is the word that unpack_pair (layout.h)
// decodes to nibble bit n of pair p alone (bf16 bit 15, 8, 7, 6 for nibble bits 3..0 of the low
// element, 16 higher for the high element) and to zero in the other pairs. The words are the columns
// of the inverse of unpack_pair's linear map; tests/cpu/test_prepack.cpp checks every one of them.
// Pair p of word j of a lane holds (row, columns): p0 (g, 4j+0/1), p1 (g+8, 4j+0/1), p2 (g, 4j+2/3),
// p3 (g+8, 4j+2/3), i.e. source byte 2j + (p >> 1) of row g + 8 (p & 1): a checkpoint byte is exactly
// one pair (element 2c in the low nibble, 2c + 1 in the high one).
FP4MOE_HD uint32_t pair_basis(int p, int nibble_bit) {
  constexpr uint32_t kBasis[4][8] = {
      {0x40000055u, 0x00002280u, 0x00000100u, 0x00228000u, 0x00554000u, 0x22800000u, 0x01000000u, 0x80000022u},
      {0x04000000u, 0x08000000u, 0x10000000u, 0x00000008u, 0x00000400u, 0x00000800u, 0x00001000u, 0x00080000u},
      {0x40000010u, 0x00000002u, 0x00000004u, 0x00000200u, 0x00104000u, 0x00020000u, 0x00040000u, 0x02000000u},
      {0x40000000u, 0x00000022u, 0x40000011u, 0x00002200u, 0x00004000u, 0x00220000u, 0x00114000u, 0x22000000u}};
  return kBasis[p][nibble_bit];
}

FP4MOE_HD uint32_t place_pair(int p, uint8_t byte) {
  uint32_t w = 0;
FP4MOE_PACK_UNROLL
  for (int n = 0; n < 8; ++n)
    if ((byte >> n) & 1) w ^= pair_basis(p, n);
  return w;
}

// Word j of a lane from the 8 checkpoint bytes of its two rows (lo: row g, hi: row g + 8; columns
// 16 q .. 16 q + 15 of the k-tile), after the scale fix-ups (fix_bytes). `place(p, byte)` is
// place_pair or a table of it; the pairs overlap in the word's bits and combine by XOR.
template <class Place>
FP4MOE_HD uint32_t lane_word(const uint8_t* lo, const uint8_t* hi, int j, Place place) {
  return place(0, lo[2 * j]) ^ place(1, hi[2 * j]) ^ place(2, lo[2 * j + 1]) ^ place(3, hi[2 * j + 1]);
}

// Re-encoded scale byte and the nibble fix-up it implies for the elements it covers.
struct ScaleCode {
  uint8_t byte = 0;
  bool zero = false;  // zero scale: clear its nibbles (the kernel's bf16 multiplier has no zero)
  bool flip = false;  // negative scale: flip the sign of its nibbles
  bool nan = false;   // E4M3 0x7F / 0xFF: the caller rejects the weights
};

// NVFP4: S = e4m3 * 2^119 is a normal bf16 with exponent in [237, 254] and 3 mantissa bits;
// byte = ((exponent - 230) << 3) | mantissa. Integer arithmetic, exact: an E4M3 normal 2^(E-7) (1 + M/8)
// has bf16 exponent E + 239; a subnormal M * 2^-9 is normalized first.
FP4MOE_HD ScaleCode encode_nvfp4_scale(uint8_t e4m3) {
  ScaleCode c;
  int mag = e4m3 & 0x7F;
  c.nan = mag == 0x7F;
  c.flip = (e4m3 & 0x80) != 0;
  if (mag == 0) {
    c.zero = true;
    c.byte = 1 << 3;
    return c;
  }
  int E = mag >> 3, M = mag & 7;
  if (E == 0) {  // subnormal: shift the leading 1 of M into the implicit bit
    const int shift = M >= 4 ? 1 : M >= 2 ? 2 : 3;
    M = (M << shift) & 7;
    E = 1 - shift;
  }
  c.byte = uint8_t(((E + 9) << 3) | M);
  return c;
}

// MXFP4: S = 2^(s - 127 + c) with the per-matrix offset c (mxfp4_offset); byte = s + c, which must
// be a normal bf16 exponent in [1, 254] (mxfp4_byte_ok).
FP4MOE_HD int mxfp4_offset(int max_scale_code) { return max_scale_code > 128 ? 254 - max_scale_code : 126; }
FP4MOE_HD bool mxfp4_byte_ok(int code, int offset) { return code + offset >= 1 && code + offset <= 254; }

// The 8 bytes (16 elements) one scale covers, after its fix-up.
FP4MOE_HD void fix_bytes(const ScaleCode& sc, uint8_t* b) {
FP4MOE_PACK_UNROLL
  for (int i = 0; i < 8; ++i) b[i] = uint8_t((sc.zero ? 0 : b[i]) ^ (sc.flip ? 0x88 : 0));
}

// The fp32 factor that undoes the scale re-encoding, applied in the epilogue (MatrixScales).
FP4MOE_HD float nvfp4_epilogue_factor(float global_scale_decode) { return global_scale_decode * 128.0f; }
FP4MOE_HD float mxfp4_epilogue_factor(int offset) {
  // 2^(126 - offset), offset in [0, 126]: a normal fp32 built from its exponent bits.
  const uint32_t bits = uint32_t(126 - offset + 127) << 23;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits);
#else
  float f;
  static_assert(sizeof f == sizeof bits, "fp32 is 32 bits");
  __builtin_memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

// Where packed row pr (m_tile * 16 + r) of W13 comes from: gated activations put gate rows
// i = 16 b + 8 h + {0..7} in packed rows 0..7 of m-tile 2b + h and the matching up rows in 8..15.
// Returns the intermediate index i (or -1 past I) and whether it is a gate row.
FP4MOE_HD int w13_source_row(int pr, bool gated, int I, bool* is_gate) {
  const int mt = pr / 16, r = pr % 16;
  int i;
  if (gated) {
    i = 16 * (mt / 2) + 8 * (mt % 2) + (r % 8);
    *is_gate = r < 8;
  } else {
    i = pr;
    *is_gate = false;
  }
  return i < I ? i : -1;
}

}  // namespace fp4moe::pack
