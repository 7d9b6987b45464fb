// The prefill grouped GEMM on Hopper's warpgroup MMA: both expert GEMMs of the layer, FP4 weights
// dequantized in registers as the A operand of wgmma.mma_async (register-A form, SASS HGMMA), token
// tiles as B from shared memory.
//
//   work item  (token tile, m-block): a token tile is up to BN sorted rows of one local expert
//              (prefill_scan_kernel), an m-block 256 weight rows = 16 packed m-tiles of that expert.
//              Items are numbered tile-major (the m-blocks of one tile, then the next tile of the same
//              expert), so the blocks running at the same time share weights through L2; every item
//              costs the same (K is fixed), so a static stride over the persistent grid balances skewed
//              routings too.
//   warpgroup 0    producer: one thread issues, per k-tile of 64 columns, three TMA copies into a
//                  stage of the shared-memory ring: the 16 weight tiles (8 KB, one box of the packed
//                  tiles seen as [m-tile][k-tile][512 B]), their scale tiles, and the B tile (BN rows
//                  x 128 B, 128-byte swizzle), completing on the stage's transaction barrier.
//   warpgroups 1-2 consumers: warp w of consumer c owns m-tiles 8 c + w and 8 c + 4 + w of the
//                  block, i.e. rows 16 w..16 w + 15 of its warpgroup's two m64 wgmmas; per k-tile each
//                  lane reads its 16 bytes of weights and 2 scale bytes of both from shared memory,
//                  dequantizes them into the A fragments of the four k16 steps (fragments.cuh: the
//                  same layout as mma.m16n8k16's A), issues 2 x 4 wgmma m64nNk16 against the stage's
//                  B tile (N = BN, or 32 / 64 for an expert's last, narrower tile), waits for them and
//                  releases the stage. The two consumer warpgroups overlap each other: one
//                  dequantizes while the other's wgmmas run.
// NOTES: dequantizing the next k-tile while this warpgroup's own wgmmas are in flight (a second A
// register buffer, wgmma.wait_group 1) makes ptxas serialize every wgmma (C7513: non-wgmma
// instructions define wgmma input registers inside the pipeline stage), so each k-tile waits for its
// wgmmas to complete.
//   epilogue   GEMM1: global scales, Llama-4 token weight, bias, activation (gate and up rows of
//              one i land in the same thread, layout.h), bf16 rounding, W4A4 quantization of a,
//              stored K-permuted at the tile's sorted rows of `act`; GEMM2: y = acc * scales at the
//              sorted rows of `y`. Every element of a row is written by exactly one item.
//
// The B tiles follow the packed weights' K permutation (the gather and GEMM1's epilogue apply it), so
// k16 step j of a tile is the 32 bytes at 32 j of each B row, and the product is the plain dot product.
#pragma once
#include <cuda.h>
#include <cuda_bf16.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/arch/mma_sm90_desc.hpp>
#include <cute/arch/mma_sm90_gmma.hpp>
#include <cute/arch/mma_sm90_gmma_ext.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <utility>

#include "kernels/common/epilogue.cuh"
#include "kernels/common/fragments.cuh"
#include "kernels/prefill/lists.cuh"
#include "kernels/prefill/params.h"

namespace fp4moe::kernels {

namespace gmma = cute::SM90::GMMA;

template <int N>
struct GmmaAtom;
#define FP4MOE_GMMA_ATOM(N)                                                                  \
  template <>                                                                                \
  struct GmmaAtom<N> {                                                                       \
    using type = gmma::MMA_64x##N##x16_F32BF16BF16_RS<gmma::Major::K, gmma::Major::K>;        \
  };
FP4MOE_GMMA_ATOM(32)
FP4MOE_GMMA_ATOM(64)
FP4MOE_GMMA_ATOM(96)
FP4MOE_GMMA_ATOM(128)
FP4MOE_GMMA_ATOM(144)
FP4MOE_GMMA_ATOM(160)
#undef FP4MOE_GMMA_ATOM
static_assert(kPrefillWidths[5] == kPrefillTileMax, "the widest wgmma holds the widest tile");

// wgmma m64nNWk16 (register A) on the first NW / 2 accumulators of d.
template <int NW, size_t... I>
__device__ __forceinline__ void gmma_rs_impl(float* d, const uint32_t (&a)[4], uint64_t desc, std::index_sequence<I...>) {
  GmmaAtom<NW>::type::fma(a[0], a[1], a[2], a[3], desc, d[I]...);
}
template <int NW>
__device__ __forceinline__ void gmma_rs(float* d, const uint32_t (&a)[4], uint64_t desc) {
  gmma_rs_impl<NW>(d, a, desc, std::make_index_sequence<NW / 2>{});
}

// Shared-memory descriptor of a B tile: BN rows of 128 bytes, K-major, 128-byte swizzle, 1 KB aligned;
// 8-row groups 1 KB apart. k16 step j starts 32 j bytes into the rows.
__device__ __forceinline__ uint64_t b_desc(const void* tile, int j) {
  cute::GmmaDescriptor d;
  d.bitfield.start_address_ = uint16_t((cute::cast_smem_ptr_to_uint(tile) + 32 * j) >> 4);
  d.bitfield.leading_byte_offset_ = 1;  // unused with swizzling
  d.bitfield.stride_byte_offset_ = 1024 >> 4;
  d.bitfield.base_offset_ = 0;
  d.bitfield.layout_type_ = uint8_t(gmma::LayoutType::B128);
  return d.desc_;
}

template <int N>
__device__ __forceinline__ void fence_acc(float* acc) {
#pragma unroll
  for (int i = 0; i < N; ++i) cute::warpgroup_fence_operand(acc[i]);
}

constexpr uint64_t kTmaEvictNormal = uint64_t(cute::TMA::CacheHintSm90::EVICT_NORMAL);

// Named barrier among the 128 threads of consumer warpgroup c (ids 1, 2; 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync(int c) { asm volatile("bar.sync %0, 128;" ::"r"(c + 1) : "memory"); }

// ---- epilogues --------------------------------------------------------------------------------------
// The accumulator of one warp's m-tile `mt` (within the expert) against the tile's BN tokens: thread
// (g, q) holds rows g (acc[4 cg + cc]) and g + 8 (acc[4 cg + 2 + cc]) of token column 8 cg + 2 q + cc.

// GEMM1: scales, token weight (Llama-4), bias, activation, bf16, W4A4 quantization; `a` stored
// K-permuted at the tile's sorted rows. m-tiles past the expert's end (mt >= MT) store zeros.
template <int BN, Activation ACT>
__device__ __forceinline__ void epilogue_gemm1(const PrefillParams& p, const PrefillTile& tile, int mt, int MT,
                                               const MatrixScales& ms, float (&acc)[BN / 2], float* xch, int c,
                                               int w) {
  constexpr bool GATED = ACT != Activation::relu2;
  const PackedLayout& L = p.L;
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  const int* row_slot = ws_ptr<const int>(p, p.W.row_slot_off);
  const bool real = mt < MT;
  const float* b13 = (L.has_bias && real)
                         ? reinterpret_cast<const float*>(p.wts + L.b13_off) + int64_t(tile.expert) * L.b13_expert_floats()
                         : nullptr;
  const int half = 16 * L.i_blocks, i_pad = p.W.i_pad;
  const float in13 = p.w4a4 ? ms.in13 : 1.0f;
  __nv_bfloat16* act = ws_ptr<__nv_bfloat16>(p, p.W.act_off);
  int i_lo, i_hi;  // intermediate index of accumulator rows g and g + 8
  if constexpr (GATED) {
    i_lo = i_hi = 16 * (mt / 2) + 8 * (mt % 2) + g;  // gate row g, up row g + 8 of the same i
  } else {
    i_lo = 16 * mt + g;
    i_hi = i_lo + 8;
  }
  // The results replace the accumulators in place (no second array: the register file is full):
  // acc[4 cg + cc] holds a of row g's i, acc[4 cg + 2 + cc] that of row g + 8 (non-gated) or, gated
  // W4A4, the warp's block amax.
#pragma unroll
  for (int cg = 0; cg < BN / 8; ++cg)
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int col = 8 * cg + 2 * q + cc;
      float wtok = 1.0f;
      if (p.method == RoutingMethod::llama4 && col < tile.rows) wtok = p.tw[row_slot[tile.row0 + col]];
      const float lo = acc[4 * cg + cc], hi = acc[4 * cg + 2 + cc];
      if constexpr (GATED) {
        const float gate = lo * ms.gate * in13 * wtok + (b13 ? b13[i_lo] : 0.0f);
        const float up = hi * ms.up * in13 * wtok + (b13 ? b13[half + i_lo] : 0.0f);
        acc[4 * cg + cc] = real ? __bfloat162float(__float2bfloat16_rn(activation(ACT, p.alpha, p.limit, gate, up))) : 0.0f;
        acc[4 * cg + 2 + cc] = 0.0f;
      } else {
        const float up0 = lo * ms.up * in13 * wtok + (b13 ? b13[half + i_lo] : 0.0f);
        const float up1 = hi * ms.up * in13 * wtok + (b13 ? b13[half + i_hi] : 0.0f);
        acc[4 * cg + cc] = real ? __bfloat162float(__float2bfloat16_rn(activation(ACT, p.alpha, p.limit, 0.0f, up0))) : 0.0f;
        acc[4 * cg + 2 + cc] = real ? __bfloat162float(__float2bfloat16_rn(activation(ACT, p.alpha, p.limit, 0.0f, up1))) : 0.0f;
      }
    }
  if (p.w4a4) {
    // NVFP4 blocks of 16 consecutive i: gated, the 8 g of this warp and the 8 of its partner warp
    // (m-tile mt ^ 1, warp w ^ 1); non-gated, the 8 g of both rows of this warp.
#pragma unroll
    for (int cg = 0; cg < BN / 8; ++cg)
#pragma unroll
      for (int cc = 0; cc < 2; ++cc) {
        float m = fmaxf(fabsf(acc[4 * cg + cc]), fabsf(acc[4 * cg + 2 + cc]));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 4));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 8));
        m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 16));
        if constexpr (GATED) {
          acc[4 * cg + 2 + cc] = m;
          if (g == 0) xch[(c * 4 + w) * BN + 8 * cg + 2 * q + cc] = m;
        } else {
          const float sbk = nvfp4_block_scale(m, ms.in2), den = sbk * ms.in2;
          acc[4 * cg + cc] = e2m1_round(acc[4 * cg + cc] / den) * sbk;
          acc[4 * cg + 2 + cc] = e2m1_round(acc[4 * cg + 2 + cc] / den) * sbk;
        }
      }
    if constexpr (GATED) {
      consumer_sync(c);
#pragma unroll
      for (int cg = 0; cg < BN / 8; ++cg)
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const float m = fmaxf(acc[4 * cg + 2 + cc], xch[(c * 4 + (w ^ 1)) * BN + 8 * cg + 2 * q + cc]);
          const float sbk = nvfp4_block_scale(m, ms.in2), den = sbk * ms.in2;
          acc[4 * cg + cc] = e2m1_round(acc[4 * cg + cc] / den) * sbk;
        }
      consumer_sync(c);  // the exchange buffer is reused by the next m-tile
    }
  }
  const int pc_lo = permuted_col(i_lo), pc_hi = permuted_col(i_hi);
#pragma unroll
  for (int cg = 0; cg < BN / 8; ++cg)
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int col = 8 * cg + 2 * q + cc;
      if (col >= tile.rows) continue;
      __nv_bfloat16* arow = act + int64_t(tile.row0 + col) * i_pad;
      if (i_lo < i_pad) arow[pc_lo] = __float2bfloat16_rn(acc[4 * cg + cc]);
      if (!GATED && i_hi < i_pad) arow[pc_hi] = __float2bfloat16_rn(acc[4 * cg + 2 + cc]);
    }
}

// GEMM2: y = acc * scales at the tile's sorted rows (rows of H past the end are skipped).
template <int BN>
__device__ __forceinline__ void epilogue_gemm2(const PrefillParams& p, const PrefillTile& tile, int mt,
                                               const MatrixScales& ms, const float (&acc)[BN / 2]) {
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  const float f = ms.down * (p.w4a4 ? ms.in2 : 1.0f);
  const int h_lo = mt * kTileRows + g, h_hi = h_lo + 8;
  float* y = ws_ptr<float>(p, p.W.y_off);
#pragma unroll
  for (int cg = 0; cg < BN / 8; ++cg)
#pragma unroll
    for (int cc = 0; cc < 2; ++cc) {
      const int col = 8 * cg + 2 * q + cc;
      if (col >= tile.rows) continue;
      float* yrow = y + int64_t(tile.row0 + col) * p.H;
      if (h_lo < p.H) yrow[h_lo] = acc[4 * cg + cc] * f;
      if (h_hi < p.H) yrow[h_hi] = acc[4 * cg + 2 + cc] * f;
    }
}

// B operands of one GEMM: the same rows as boxes of 32, 64 and kPrefillTileMax rows (a tile loads the
// smallest box that holds it).
struct BMaps {
  CUtensorMap b32, b64, bmax;
};

template <Format F, int PHASE>
__global__ void __launch_bounds__(kPrefillThreads, 1)
    prefill_gemm_kernel(const __grid_constant__ PrefillParams p, const __grid_constant__ CUtensorMap tm_a,
                        const __grid_constant__ CUtensorMap tm_s, const __grid_constant__ BMaps tm_b, int stages) {
  constexpr int BN = kPrefillTileMax;
  static_assert(PHASE == 1 || PHASE == 2, "PHASE 1: W13 + activation, PHASE 2: W2");
  static_assert(kPrefillBlockM == 256 && kPrefillConsumers == 2, "two consumer warpgroups of 2 x 64 weight rows");
  constexpr int STILE = scale_tile_bytes(F);
  constexpr int MTB = kPrefillBlockM / kTileRows;  // m-tiles per block: 16
  constexpr uint32_t kStageTxA = uint32_t(MTB * (kTileBytes + STILE));

  extern __shared__ uint8_t smem_raw[];
  uint8_t* base = reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint8_t* sB = base;
  uint8_t* sA = sB + size_t(stages) * BN * 128;
  uint8_t* sS = sA + size_t(stages) * MTB * kTileBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(sS + size_t(stages) * MTB * STILE);
  uint64_t* empty = full + stages;
  float* xch = reinterpret_cast<float*>(empty + stages);  // W4A4 epilogue: [2][4 warps][BN] amax

  const PackedLayout& L = p.L;
  const int MT = PHASE == 1 ? L.m_tiles13 : L.m_tiles2;
  const int KT = PHASE == 1 ? L.k_tiles13 : L.k_tiles2;
  const int MB = (MT + MTB - 1) / MTB;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, wg = warp / 4;
  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      cutlass::arch::ClusterTransactionBarrier::init(&full[s], 1);
      cutlass::arch::ClusterBarrier::init(&empty[s], 4 * kPrefillConsumers);  // one arrival per consumer warp
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();

  if (wg == 0) {
    // ---- producer ----
    cutlass::arch::warpgroup_reg_dealloc<40>();
    if (threadIdx.x == 0) {
      // NOTES: values live across setmaxnreg are spilled; each role reads what it needs after it.
      const PrefillTile* tiles = ws_ptr<const PrefillTile>(p, p.W.tiles_off);
      const int64_t n_items = int64_t(ws_ptr<const int>(p, p.W.misc_off)[0]) * MB;
      cute::prefetch_tma_descriptor(&tm_a);
      cute::prefetch_tma_descriptor(&tm_s);
      cute::prefetch_tma_descriptor(&tm_b.b32);
      cute::prefetch_tma_descriptor(&tm_b.b64);
      cute::prefetch_tma_descriptor(&tm_b.bmax);
      int stage = 0;
      uint32_t phase = 0;
      for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
        const PrefillTile tile = tiles[item / MB];
        const int m0 = tile.expert * MT + int(item % MB) * MTB;
        const int box = tile.rows <= 32 ? 32 : tile.rows <= 64 ? 64 : BN;
        const CUtensorMap* bmap = box == 32 ? &tm_b.b32 : box == 64 ? &tm_b.b64 : &tm_b.bmax;
        for (int kt = 0; kt < KT; ++kt) {
          cutlass::arch::ClusterBarrier::wait(&empty[stage], phase ^ 1);
          cutlass::arch::ClusterTransactionBarrier::arrive_and_expect_tx(&full[stage], kStageTxA + uint32_t(box) * 128);
          cute::SM90_TMA_LOAD_3D::copy(&tm_a, &full[stage], kTmaEvictNormal, sA + size_t(stage) * MTB * kTileBytes, 0,
                                       kt, m0);
          cute::SM90_TMA_LOAD_3D::copy(&tm_s, &full[stage], kTmaEvictNormal, sS + size_t(stage) * MTB * STILE, 0, kt,
                                       m0);
          cute::SM90_TMA_LOAD_2D::copy(bmap, &full[stage], kTmaEvictNormal, sB + size_t(stage) * BN * 128,
                                       kt * kTileCols, tile.row0);
          if (++stage == stages) {
            stage = 0;
            phase ^= 1;
          }
        }
      }
    }
    return;
  }

  // ---- consumers ----
  cutlass::arch::warpgroup_reg_alloc<232>();
  const PrefillTile* tiles = ws_ptr<const PrefillTile>(p, p.W.tiles_off);
  const int64_t n_items = int64_t(ws_ptr<const int>(p, p.W.misc_off)[0]) * MB;
  const int c = wg - 1, w = warp % 4;
  // This warp's two m-tiles within the block: rows 16 w.. of the warpgroup's two m64 wgmmas.
  const int mt_lo = c * 8 + w, mt_hi = mt_lo + 4;
  int stage = 0;
  uint32_t phase = 0;
  for (int64_t item = blockIdx.x; item < n_items; item += gridDim.x) {
    const PrefillTile tile = tiles[item / MB];
    const int mb = int(item % MB);
    float acc_lo[BN / 2], acc_hi[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) acc_lo[i] = acc_hi[i] = 0.0f;
    // The wgmma width follows the tile: a tile of r rows runs at the narrowest compiled width >= r (the
    // accumulators past it stay zero and are never stored).
    auto mainloop = [&](auto width) {
      constexpr int NW = decltype(width)::value;
      for (int kt = 0; kt < KT; ++kt) {
        cutlass::arch::ClusterTransactionBarrier::wait(&full[stage], phase);
        const uint8_t* at = sA + size_t(stage) * MTB * kTileBytes + lane * 16;
        const uint8_t* st = sS + size_t(stage) * MTB * STILE + lane_scale_offset(F, lane);
        uint32_t a_lo[4][4], a_hi[4][4];
        dequant_tile<F>(*reinterpret_cast<const uint4*>(at + mt_lo * kTileBytes),
                        *reinterpret_cast<const uint16_t*>(st + mt_lo * STILE), a_lo);
        dequant_tile<F>(*reinterpret_cast<const uint4*>(at + mt_hi * kTileBytes),
                        *reinterpret_cast<const uint16_t*>(st + mt_hi * STILE), a_hi);
        const uint8_t* btile = sB + size_t(stage) * BN * 128;
        // NOTES: the fences pin the dequantization before wgmma.fence; an instruction that defines an A
        // register between the fence and the wgmma makes ptxas serialize every wgmma (C7513).
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            cute::warpgroup_fence_operand(a_lo[j][r]);
            cute::warpgroup_fence_operand(a_hi[j][r]);
          }
        fence_acc<NW / 2>(acc_lo);
        fence_acc<NW / 2>(acc_hi);
        cute::warpgroup_arrive();
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint64_t desc = b_desc(btile, j);
          gmma_rs<NW>(acc_lo, a_lo[j], desc);
          gmma_rs<NW>(acc_hi, a_hi[j], desc);
        }
        cute::warpgroup_commit_batch();
        cute::warpgroup_wait<0>();
        fence_acc<NW / 2>(acc_lo);
        fence_acc<NW / 2>(acc_hi);
        __syncwarp();
        if (lane == 0) cutlass::arch::ClusterBarrier::arrive(&empty[stage]);
        if (++stage == stages) {
          stage = 0;
          phase ^= 1;
        }
      }
    };
    if (tile.rows <= 32)
      mainloop(std::integral_constant<int, 32>{});
    else if (tile.rows <= 64)
      mainloop(std::integral_constant<int, 64>{});
    else if (tile.rows <= 96)
      mainloop(std::integral_constant<int, 96>{});
    else if (tile.rows <= 128)
      mainloop(std::integral_constant<int, 128>{});
    else if (tile.rows <= 144)
      mainloop(std::integral_constant<int, 144>{});
    else
      mainloop(std::integral_constant<int, 160>{});
    const MatrixScales ms = reinterpret_cast<const MatrixScales*>(p.wts + L.scales_off)[tile.expert];
    if constexpr (PHASE == 1) {
      // NOTES: one activation per instantiation: the unrolled epilogue with every activation inlined
      // was ~500 KB of code, and instruction fetch stalled the warps (ncu: 31% of stall cycles).
      auto epilogue = [&](auto act) {
        constexpr Activation A = decltype(act)::value;
        epilogue_gemm1<BN, A>(p, tile, mb * MTB + mt_lo, MT, ms, acc_lo, xch, c, w);
        epilogue_gemm1<BN, A>(p, tile, mb * MTB + mt_hi, MT, ms, acc_hi, xch, c, w);
      };
      switch (p.act_kind) {
        case Activation::swiglu: epilogue(std::integral_constant<Activation, Activation::swiglu>{}); break;
        case Activation::swiglu_oai: epilogue(std::integral_constant<Activation, Activation::swiglu_oai>{}); break;
        case Activation::relu2: epilogue(std::integral_constant<Activation, Activation::relu2>{}); break;
        case Activation::geglu_tanh: epilogue(std::integral_constant<Activation, Activation::geglu_tanh>{}); break;
      }
    } else {
      epilogue_gemm2<BN>(p, tile, mb * MTB + mt_lo, ms, acc_lo);
      epilogue_gemm2<BN>(p, tile, mb * MTB + mt_hi, ms, acc_hi);
    }
  }
}

}  // namespace fp4moe::kernels
