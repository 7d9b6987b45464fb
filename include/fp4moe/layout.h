// The library's packed weight layout, shared by the host (sizing, prepack) and the kernels
// (indexing), so the two cannot drift apart.
//
// A weight matrix [N, K] of one expert is cut into m-tiles of 16 rows and k-tiles of 64 columns.
// One (m-tile, k-tile) is 512 bytes: lane l = 4 * g + q of a warp owns 16 bytes at l * 16 holding
// packed rows g and g + 8, columns [16 q, 16 q + 16) of the k-tile, which is exactly what the lane needs
// for four mma.m16n8k16 steps after permuting K (see kernels/decode/fragments.cuh). Word j of the
// 16 bytes carries columns 16 q + 4 j + {0..3} as four pairs:
//   p = 0: row g,     columns +0, +1      p = 1: row g + 8, columns +0, +1
//   p = 2: row g,     columns +2, +3      p = 3: row g + 8, columns +2, +3
// A pair is decoded by one AND with M = 0x81C081C0 (the bf16 sign, exponent bits 8-7 and mantissa
// bit 6 of both halves) of a view of the word, 8 integer operations for the 4 pairs (unpack_pair):
//   p0 = w & M     p1 = rotl(w, 12) & M     p2 = ((w << 2) ^ (w << 6)) & M     p3 = ((w << 2) ^ rotl(w, 8)) & M
// The map from the word's 32 bits to the pairs' 32 bits is linear over GF(2) and invertible, so the
// packer places a pair by XOR-ing one basis word per set nibble bit (src/api/pack_tile.h).
// Block scales of the same tile, each stored once, re-encoded so that a bf16 multiplier is one shift
// and add away. NVFP4 (a scale per 16 columns): 64 bytes, lane l owns bytes 2l (row g) and 2l + 1
// (row g + 8), the scale of its 16 columns. MXFP4 (a scale per 32 columns): 32 bytes, block
// b = q / 2 of rows g and g + 8 at bytes 4g + 2b and 4g + 2b + 1, read by lanes q = 2b and 2b + 1 alike
// (lane_scale_offset). The bytes:
//   nvfp4: S = e4m3 * 2^119 as bf16; byte = ((exponent - 230) << 3) | mantissa3, bf16 bits = (b << 4) + 0x7300
//   mxfp4: S = 2^(s - 127 + c) with a per-matrix offset c; byte = s + c, bf16 bits = b << 7
// Weight nibbles sit in bf16 as e2m1 * 2^-126 (exponent bits only), so S * w = e2m1 * scale * 2^-7
// (nvfp4) or e2m1 * scale * 2^(c - 126) (mxfp4); the per-matrix factor that undoes it is folded into
// the fp32 epilogue scale (MatrixScales).
// Tiles are ordered expert -> m-tile -> k-tile, so a warp streaming a k-range reads contiguous bytes.
// Rows and columns past N, K are zero. For gated activations W13 m-tile 2b + h holds gate rows
// i = 16 b + 8 h + {0..7} as packed rows 0..7 and the matching up rows as packed rows 8..15, so gate
// and up of one i land in the same thread of the mma result.
#pragma once
#include <cstdint>

#include "fp4moe/types.h"

#if defined(__CUDACC__)
#define FP4MOE_HD __host__ __device__ __forceinline__
#else
#define FP4MOE_HD inline
#endif

namespace fp4moe {

constexpr int kTileRows = 16;
constexpr int kTileCols = 64;
constexpr int kTileBytes = kTileRows * kTileCols / 2;  // 512
constexpr int kTokenChunk = 64;  // tokens per launch of the decode kernel

// Pair P of a packed weight word as a bf16x2 holding e2m1 * 2^-126 per half: sign, exponent and
// mantissa bits land in bf16 position (exact, the e2m1 subnormal 0.5 included). The one decode
// formula of the layout: the kernels and the host tests both call it.
FP4MOE_HD uint32_t rotl32(uint32_t w, int s) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_l(w, w, s);
#else
  return (w << s) | (w >> (32 - s));
#endif
}
constexpr uint32_t kPairMask = 0x81C081C0u;
template <int P>
FP4MOE_HD uint32_t unpack_pair(uint32_t w) {
  static_assert(P >= 0 && P < 4, "a word holds four pairs");
  if constexpr (P == 0) return w & kPairMask;
  if constexpr (P == 1) return rotl32(w, 12) & kPairMask;
  if constexpr (P == 2) return ((w << 2) ^ (w << 6)) & kPairMask;
  return ((w << 2) ^ rotl32(w, 8)) & kPairMask;
}
FP4MOE_HD uint32_t unpack_pair(uint32_t w, int p) {
  return p == 0 ? unpack_pair<0>(w) : p == 1 ? unpack_pair<1>(w) : p == 2 ? unpack_pair<2>(w) : unpack_pair<3>(w);
}

FP4MOE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Block-scale bytes of one (m-tile, k-tile): one byte per (row, block of the format's size).
FP4MOE_HD constexpr int scale_tile_bytes(Format f) { return f == Format::nvfp4 ? 64 : 32; }
// Where lane l = 4 g + q finds its two scale bytes (row g, then row g + 8) inside a scale tile.
FP4MOE_HD constexpr int lane_scale_offset(Format f, int lane) {
  return f == Format::nvfp4 ? 2 * lane : 4 * (lane >> 2) + 2 * ((lane & 3) >> 1);
}

// Per-expert fp32 factors applied in the epilogue.
struct MatrixScales {
  float gate;  // W13 gate half (or the whole W1 when non-gated)
  float up;    // W13 up half
  float down;  // W2
  float in13;  // W4A4: input_scale of GEMM1 (decode direction)
  float in2;   // W4A4: input_scale of GEMM2
  float pad[3];
};

struct PackedLayout {
  int hidden = 0, intermediate = 0, experts = 0;
  Format format = Format::nvfp4;
  bool gated = true, has_bias = false;

  int i_blocks = 0;   // ceil(I / 16): GEMM1 tasks per expert
  int m_tiles13 = 0;  // 2 * i_blocks (gated) or i_blocks
  int k_tiles13 = 0;  // ceil(H / 64)
  int m_tiles2 = 0;   // 2 * ceil(H / 32): GEMM2 tasks take two m-tiles
  int k_tiles2 = 0;   // ceil(I / 64)
  int i_pad = 0;      // 64 * k_tiles2: row stride of the intermediate activations

  int64_t w13_off = 0, s13_off = 0, w2_off = 0, s2_off = 0, scales_off = 0, b13_off = 0, b2_off = 0;
  int64_t total_bytes = 0;

  FP4MOE_HD int64_t w13_expert_bytes() const { return int64_t(m_tiles13) * k_tiles13 * kTileBytes; }
  FP4MOE_HD int64_t w2_expert_bytes() const { return int64_t(m_tiles2) * k_tiles2 * kTileBytes; }
  FP4MOE_HD int scale_tile_bytes() const { return ::fp4moe::scale_tile_bytes(format); }
  FP4MOE_HD int64_t s13_expert_bytes() const { return int64_t(m_tiles13) * k_tiles13 * scale_tile_bytes(); }
  FP4MOE_HD int64_t s2_expert_bytes() const { return int64_t(m_tiles2) * k_tiles2 * scale_tile_bytes(); }
  // b13: [E][2][16 * i_blocks] (gate then up; only the first half when non-gated); b2: [E][H]
  FP4MOE_HD int64_t b13_expert_floats() const { return 2 * 16 * int64_t(i_blocks); }

  static FP4MOE_HD PackedLayout make(int hidden, int intermediate, int experts, Format format,
                                     bool gated, bool has_bias) {
    PackedLayout l;
    l.hidden = hidden;
    l.intermediate = intermediate;
    l.experts = experts;
    l.format = format;
    l.gated = gated;
    l.has_bias = has_bias;
    l.i_blocks = int(ceil_div(intermediate, 16));
    l.m_tiles13 = gated ? 2 * l.i_blocks : l.i_blocks;
    l.k_tiles13 = int(ceil_div(hidden, kTileCols));
    l.m_tiles2 = 2 * int(ceil_div(hidden, 2 * kTileRows));
    l.k_tiles2 = int(ceil_div(intermediate, kTileCols));
    l.i_pad = l.k_tiles2 * kTileCols;
    auto align = [](int64_t v) { return (v + 255) / 256 * 256; };
    int64_t off = 0;
    l.w13_off = off; off = align(off + experts * l.w13_expert_bytes());
    l.s13_off = off; off = align(off + experts * l.s13_expert_bytes());
    l.w2_off = off;  off = align(off + experts * l.w2_expert_bytes());
    l.s2_off = off;  off = align(off + experts * l.s2_expert_bytes());
    l.scales_off = off; off = align(off + experts * int64_t(sizeof(MatrixScales)));
    l.b13_off = off; off = align(off + (has_bias ? experts * l.b13_expert_floats() * 4 : 0));
    l.b2_off = off;  off = align(off + (has_bias ? int64_t(experts) * hidden * 4 : 0));
    l.total_bytes = off;
    return l;
  }

  // FP4 weight + scale (+ bias) bytes of one expert as a checkpoint stores them: the least a layer
  // touching that expert must read.
  FP4MOE_HD int64_t checkpoint_bytes_per_expert() const {
    int blk = format == Format::nvfp4 ? 16 : 32;
    int64_t rows13 = gated ? 2 * int64_t(intermediate) : intermediate;
    int64_t e13 = rows13 * hidden, e2 = int64_t(hidden) * intermediate;
    int64_t b = (e13 + e2) / 2 + (e13 + e2) / blk;
    if (has_bias) b += 2 * (rows13 + hidden);  // bf16 biases
    return b;
  }
};

}  // namespace fp4moe
