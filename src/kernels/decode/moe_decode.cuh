// The decode kernel: one persistent cooperative launch per chunk of up to kTokenChunk tokens.
//
//   routing  one warp per token (every block routes chunks of up to 8 tokens itself; larger chunks
//            are routed once and shared through a grid barrier), unless the caller passed top-k ids
//   lists    every block sorts the chunk's slots by local expert in shared memory (deterministic)
//            and starts L2 prefetches of the GEMM2 weights it will read first
//   phase 1  GEMM1 + activation: task = (active expert, 16 intermediate rows); a team of warps
//            splits K = H, reduces in shared memory, applies scales, bias, activation, writes `act`
//   grid barrier
//   phase 2  GEMM2: task = (expert and up to 8 of its slots, 32 rows of H), same team GEMM; each
//            slot's y goes to its own row of the workspace
//   grid barrier
//   phase 3  finalize: out[t] = sum over the token's slots, in slot order, of w * (y + b2)
//
// Every output element is written exactly once, without atomics, and a token's result depends only on
// its own data (K splits fixed by the shape, sums in the token's slot order): runs are bitwise
// reproducible and batch invariant. Weights stream through 16-byte non-caching loads, four k-tiles
// ahead, with an evict-first L2 policy.
#pragma once
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include "kernels/common/epilogue.cuh"
#include "kernels/common/fragments.cuh"
#include "kernels/common/routing.cuh"
#include "kernels/decode/params.h"

namespace fp4moe::kernels {

constexpr int kPrefetch = 4;  // k-tiles of weights in flight per warp

struct Lists {
  int* cnt;     // [num_local] slots per local expert
  int* start;   // [num_local] first position in `slots`
  int* active;  // [n_active] local experts with slots, increasing
  int* slots;   // [T * k] slot indices (t * k + j) sorted by expert, then slot
  int* rows;    // [n_rows] GEMM2 work rows: (local expert << 8) | first slot of a pass of 8 * kGroups
  const int* ids;    // [T * k] routed expert ids of the chunk (shared-memory copy)
  const float* tw;   // [T * k] routing weights
  int n_active, n_rows;
};

__device__ __forceinline__ void team_sync(int team, int team_warps) {
  if (team_warps == kDecodeWarps) {
    __syncthreads();
  } else if (team_warps > 1) {
    asm volatile("bar.sync %0, %1;" ::"r"(team + 1), "r"(team_warps * 32) : "memory");
  } else {
    __syncwarp();
  }
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Diagnostics: with p.timeline set, thread 0 of each block records the global timer (ns) at the
// phase boundaries: [block][0 start, 1 routed, 2 lists, 3 GEMM1 done, 4 after the barrier, 5 end],
// then [block][2] SM clock counts at start and end (the clock rate the call ran at).
__device__ __forceinline__ void mark(const DecodeParams& p, int point) {
  if (p.timeline != nullptr && threadIdx.x == 0) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    p.timeline[blockIdx.x * kTimelinePoints + point] = t;
    if (point == 0 || point == 5) p.timeline[gridDim.x * kTimelinePoints + blockIdx.x * 2 + point / 5] = clock64();
  }
}

// ---- expert lists ---------------------------------------------------------------------------------
// Expects the chunk's routing in shared memory (sl.ids_off / sl.tw_off).
__device__ inline Lists build_lists(const DecodeParams& p, uint8_t* smem, const SmemLayout& sl) {
  Lists ls;
  ls.ids = reinterpret_cast<const int*>(smem + sl.ids_off);
  ls.tw = reinterpret_cast<const float*>(smem + sl.tw_off);
  ls.cnt = reinterpret_cast<int*>(smem + sl.cnt_off);
  ls.start = reinterpret_cast<int*>(smem + sl.start_off);
  ls.active = reinterpret_cast<int*>(smem + sl.active_off);
  ls.slots = reinterpret_cast<int*>(smem + sl.slots_off);
  ls.rows = reinterpret_cast<int*>(smem + sl.rows_off);
  int* misc = reinterpret_cast<int*>(smem + sl.misc_off);
  const int nslots = p.T * p.k;
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) ls.cnt[e] = 0;
  __syncthreads();
  for (int s = threadIdx.x; s < nslots; s += blockDim.x) {
    int e = ls.ids[s] - p.local_offset;
    if (e >= 0 && e < p.num_local) atomicAdd(&ls.cnt[e], 1);
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int run = 0, nact = 0;
    for (int base = 0; base < p.num_local; base += 32) {
      int e = base + lane;
      int c = e < p.num_local ? ls.cnt[e] : 0;
      int incl = c;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      unsigned act = __ballot_sync(0xffffffffu, c > 0);
      if (e < p.num_local) {
        ls.start[e] = run + incl - c;
        if (c > 0) ls.active[nact + __popc(act & ((1u << lane) - 1))] = e;
      }
      run += __shfl_sync(0xffffffffu, incl, 31);
      nact += __popc(act);
    }
    __syncwarp();
    for (int e = lane; e < p.num_local; e += 32) ls.cnt[e] = 0;  // reused as fill counters
    __syncwarp();
    // Stable fill, 32 slots at a time: rank among equal experts inside the chunk of 32.
    for (int base = 0; base < nslots; base += 32) {
      int s = base + lane;
      int e = -1;
      if (s < nslots) {
        e = ls.ids[s] - p.local_offset;
        if (e < 0 || e >= p.num_local) e = -1;
      }
      unsigned peers = __match_any_sync(0xffffffffu, e);
      int rank = __popc(peers & ((1u << lane) - 1));
      if (e >= 0) ls.slots[ls.start[e] + ls.cnt[e] + rank] = s;
      __syncwarp();
      if (e >= 0 && rank == 0) ls.cnt[e] += __popc(peers);
      __syncwarp();
    }
    // GEMM2 rows: one per pass of 8 * kGroups slots of each active expert, in expert order.
    int nrows = 0;
    for (int base = 0; base < nact; base += 32) {
      const int ai = base + lane;
      const int e = ai < nact ? ls.active[ai] : 0;
      const int np = ai < nact ? (ls.cnt[e] + 8 * kGroups - 1) / (8 * kGroups) : 0;
      int incl = np;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int v = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += v;
      }
      for (int r = 0; r < np; ++r) ls.rows[nrows + incl - np + r] = (e << 8) | (r * 8 * kGroups);
      nrows += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) { misc[0] = nact; misc[1] = nrows; }
  }
  __syncthreads();
  ls.n_active = misc[0];
  ls.n_rows = misc[1];
  return ls;
}

// ---- shared pieces of the two GEMM phases ---------------------------------------------------------
// The lane's B operand for one k-tile: 16 bf16 of `row` at column `col` (zero when absent).
template <bool L2_ONLY>
__device__ __forceinline__ void load_b(uint4 (&xb)[2], const __nv_bfloat16* row, int col, bool in_range) {
  xb[0] = xb[1] = make_uint4(0, 0, 0, 0);
  if (row != nullptr && in_range) {
    if constexpr (L2_ONLY) {  // written earlier in this launch: must bypass the incoherent L1
      xb[0] = __ldcg(reinterpret_cast<const uint4*>(row + col));
      xb[1] = __ldcg(reinterpret_cast<const uint4*>(row + col + 8));
    } else {
      xb[0] = ldg_cached(row + col);
      xb[1] = ldg_cached(row + col + 8);
    }
  }
}

// One k-tile of MT m-tiles against one group of 8 tokens: dequantize, scale, four mma steps each.
template <Format F, int MT>
__device__ __forceinline__ void tile_mma(float (&acc)[MT][4], const uint4 (&a)[MT], const uint32_t (&s)[MT],
                                         const uint4 (&xb)[2]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    uint32_t slo, shi;
    scale_pairs<F>(s[mt], slo, shi);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      uint32_t af[4];
      dequant_word(word(a[mt], j), slo, shi, af);
      mma_bf16(acc[mt], af, word(xb[j / 2], (2 * j) % 4), word(xb[j / 2], (2 * j) % 4 + 1));
    }
  }
}

// ---- the team GEMM shared by both phases -----------------------------------------------------------
// A team of TW warps computes MT m-tiles (16 rows each) of one expert against one group of 8 B rows:
// warp wt streams k-tiles [k0, k1) (a fixed split, so the order of the fp32 sums depends on the shape
// only), four k-tiles of weights in flight, and the team's partial sums are added in warp order into
// the accumulators of warp wt == 0, which alone holds the result afterwards.
//   wbase / sbase: the lane's first weight / scale tile of m-tile 0 (k-tile 0); mstride_*: m-tile step
//   brow: this lane's B row (token column g) or null; b_cols: valid columns of B
template <Format F, int MT, bool B_FROM_L2, bool QUANT_B>
__device__ __forceinline__ void team_gemm(float (&acc)[MT][4], const uint8_t* wbase, const uint8_t* sbase,
                                          int64_t mstride_w, int64_t mstride_s, const __nv_bfloat16* brow,
                                          int b_cols, float b_scale, int k0, int k1, int team, int TW, int wt,
                                          float* red, uint64_t policy) {
  constexpr int U = kPrefetch;
  static_assert(U % 2 == 0, "the B operand ping-pongs between two buffers across the unrolled k-tiles");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[mt][r] = 0.0f;
  uint4 abuf[U][MT];
  uint32_t sbuf[U][MT];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (k0 + u < k1)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        abuf[u][mt] = ldg_stream(wbase + mt * mstride_w + int64_t(k0 + u) * kTileBytes, policy);
        sbuf[u][mt] = ldg_u16(sbase + mt * mstride_s + int64_t(k0 + u) * scale_tile_bytes(F));
      }
  uint4 xa[2], xb[2];
  load_b<B_FROM_L2>(xa, brow, k0 * kTileCols + 16 * q, k0 < k1 && k0 * kTileCols + 16 * q < b_cols);
  // One k-tile: consume A from the ring and refill it U tiles ahead; B from `cur`, the next tile's B
  // into `nxt`.
  auto step = [&](int u, int kt, uint4 (&cur)[2], uint4 (&nxt)[2]) {
    uint4 a[MT];
    uint32_t sc[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) { a[mt] = abuf[u][mt]; sc[mt] = sbuf[u][mt]; }
    if (kt + U < k1)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        abuf[u][mt] = ldg_stream(wbase + mt * mstride_w + int64_t(kt + U) * kTileBytes, policy);
        sbuf[u][mt] = ldg_u16(sbase + mt * mstride_s + int64_t(kt + U) * scale_tile_bytes(F));
      }
    const int ncol = (kt + 1) * kTileCols + 16 * q;
    load_b<B_FROM_L2>(nxt, brow, ncol, kt + 1 < k1 && ncol < b_cols);
    if constexpr (QUANT_B) fake_quant_block(cur, b_scale);
    tile_mma<F, MT>(acc, a, sc, cur);
  };
  for (int base = k0; base < k1; base += U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int kt = base + u;
      if (kt < k1) {
        if (u % 2 == 0) step(u, kt, xa, xb);
        else step(u, kt, xb, xa);
      }
    }
  }
  if (TW > 1) {
    if (wt > 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 4; ++r) red[(((warp * 2 + mt) * 4 + r) * 32) + lane] = acc[mt][r];
    }
    team_sync(team, TW);
    if (wt == 0) {
      for (int w = 1; w < TW; ++w)
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int r = 0; r < 4; ++r) acc[mt][r] += red[((((warp + w) * 2 + mt) * 4 + r) * 32) + lane];
    }
    team_sync(team, TW);
  }
}

// ---- phase 1: GEMM1 + activation ------------------------------------------------------------------
// Task = (active expert, 16 intermediate rows); one pass per 8 of the expert's slots.
template <Format F, bool GATED, bool W4A4>
__device__ inline void gemm1(const DecodeParams& p, const Lists& ls, float* red) {
  constexpr int MT = GATED ? 2 : 1;
  const PackedLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int TW = p.team1, teams = kDecodeWarps / TW, team = warp / TW, wt = warp % TW;
  const int KT = L.k_tiles13;
  const int k0 = wt * KT / TW, k1 = (wt + 1) * KT / TW;
  const int g = lane >> 2, q = lane & 3;
  const int ntasks = ls.n_active * L.i_blocks;
  const int64_t mstride_w = int64_t(KT) * kTileBytes, mstride_s = int64_t(KT) * scale_tile_bytes(F);
  const uint64_t policy = evict_first_policy();

  for (int task = team * gridDim.x + blockIdx.x; task < ntasks; task += gridDim.x * teams) {
    const int ai = task / L.i_blocks, b = task % L.i_blocks;
    const int e = ls.active[ai];
    const int n = ls.cnt[e], s0 = ls.start[e];
    const uint8_t* wbase = p.wts + L.w13_off + e * L.w13_expert_bytes() + MT * b * mstride_w + lane * 16;
    const uint8_t* sbase = p.wts + L.s13_off + e * L.s13_expert_bytes() + MT * b * mstride_s + lane_scale_offset(F, lane);
    const MatrixScales ms = *reinterpret_cast<const MatrixScales*>(p.wts + L.scales_off + e * sizeof(MatrixScales));

    for (int pass = 0; pass < n; pass += 8) {
      const int np = min(n - pass, 8);
      const __nv_bfloat16* xrow = g < np ? p.x + int64_t(ls.slots[s0 + pass + g] / p.k) * p.H : nullptr;
      float acc[MT][4];
      team_gemm<F, MT, false, W4A4>(acc, wbase, sbase, mstride_w, mstride_s, xrow, p.H, ms.in13, k0, k1, team, TW,
                                    wt, red, policy);
      if (wt != 0) continue;

      // Epilogue: scales, bias, activation, (W4A4) quantization of a, store.
      const float* b13 = p.L.has_bias ? reinterpret_cast<const float*>(p.wts + L.b13_off) + e * L.b13_expert_floats() : nullptr;
      const int half = 16 * L.i_blocks;
      const float in13 = W4A4 ? ms.in13 : 1.0f;
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int colx = 2 * q + c;
        const bool valid = colx < np;
        const int slot = valid ? ls.slots[s0 + pass + colx] : 0;
        const float wtok = (valid && p.method == RoutingMethod::llama4) ? ls.tw[slot] : 1.0f;
        float av[2];
        int iv[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int i = 16 * b + 8 * h + g;
          float gate = 0.0f, up;
          if constexpr (GATED) {
            gate = acc[h][c] * ms.gate * in13 * wtok + (b13 ? b13[i] : 0.0f);
            up = acc[h][2 + c] * ms.up * in13 * wtok + (b13 ? b13[half + i] : 0.0f);
          } else {
            up = acc[0][2 * h + c] * ms.up * in13 * wtok + (b13 ? b13[half + i] : 0.0f);
          }
          iv[h] = i;
          av[h] = __bfloat162float(__float2bfloat16_rn(activation(p.act_kind, p.alpha, p.limit, gate, up)));
        }
        if constexpr (W4A4) {
          float amax = fmaxf(fabsf(av[0]), fabsf(av[1]));
          amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 4));
          amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 8));
          amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 16));
          const float sb = nvfp4_block_scale(amax, ms.in2), denom = sb * ms.in2;
#pragma unroll
          for (int h = 0; h < 2; ++h) av[h] = e2m1_round(av[h] / denom) * sb;
        }
        if (valid) {
#pragma unroll
          for (int h = 0; h < 2; ++h) p.act[int64_t(slot) * L.i_pad + iv[h]] = __float2bfloat16_rn(av[h]);
        }
      }
    }
  }
}

// ---- phase 2: GEMM2 -------------------------------------------------------------------------------
// Task = (work row: an expert and up to 8 of its slots, 32 rows of H), the same team GEMM as phase 1.
// Each slot's y = W2 a (times the expert's scales) lands in its own row of `y`, so the finalize can
// add a token's experts in its own slot order, whatever else shares the batch.
template <Format F, bool W4A4>
__device__ inline void gemm2(const DecodeParams& p, const Lists& ls, float* red) {
  constexpr int MT = kTask2Tiles;
  const PackedLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int TW = p.team2, teams = kDecodeWarps / TW, team = warp / TW, wt = warp % TW;
  const int KT = L.k_tiles2;
  const int k0 = wt * KT / TW, k1 = (wt + 1) * KT / TW;
  const int g = lane >> 2, q = lane & 3;
  const int htiles = L.m_tiles2 / MT;
  const int ntasks = ls.n_rows * htiles;
  const int64_t mstride_w = int64_t(KT) * kTileBytes, mstride_s = int64_t(KT) * scale_tile_bytes(F);
  const uint64_t policy = evict_first_policy();

  for (int task = team * gridDim.x + blockIdx.x; task < ntasks; task += gridDim.x * teams) {
    const int r = task / htiles, ht = task % htiles;
    const int info = ls.rows[r], e = info >> 8, pass = info & 0xff;
    const int n = min(ls.cnt[e] - pass, 8), s0 = ls.start[e] + pass;
    const uint8_t* wbase = p.wts + L.w2_off + e * L.w2_expert_bytes() + MT * ht * mstride_w + lane * 16;
    const uint8_t* sbase = p.wts + L.s2_off + e * L.s2_expert_bytes() + MT * ht * mstride_s + lane_scale_offset(F, lane);
    const __nv_bfloat16* brow = g < n ? p.act + int64_t(ls.slots[s0 + g]) * L.i_pad : nullptr;
    float acc[MT][4];
    team_gemm<F, MT, true, false>(acc, wbase, sbase, mstride_w, mstride_s, brow, 16 * L.i_blocks, 1.0f, k0, k1,
                                  team, TW, wt, red, policy);
    if (wt != 0) continue;
    const MatrixScales ms = *reinterpret_cast<const MatrixScales*>(p.wts + L.scales_off + e * sizeof(MatrixScales));
    const float f = ms.down * (W4A4 ? ms.in2 : 1.0f);
#pragma unroll
    for (int c = 0; c < 2; ++c) {
      const int colx = 2 * q + c;
      if (colx >= n) continue;
      float* yrow = p.y + int64_t(ls.slots[s0 + colx]) * p.H;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int h = ht * 16 * MT + 16 * mt + g;
        if (h < p.H) yrow[h] = acc[mt][c] * f;
        if (h + 8 < p.H) yrow[h + 8] = acc[mt][2 + c] * f;
      }
    }
  }
}

// ---- L2 prefetch of GEMM2's weights -----------------------------------------------------------------
// Issued right after the expert lists exist, so GEMM2's bytes stream from HBM while GEMM1 runs and the
// second phase starts from L2 instead of paying the memory latency again after the grid barrier.
// Each warp prefetches, within its share of the budget, the tiles it reads first in phase 2 (same
// task and K-range mapping as gemm2).
__device__ inline void prefetch_gemm2(const DecodeParams& p, const Lists& ls) {
  constexpr int MT = kTask2Tiles;
  const PackedLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int TW = p.team2, teams = kDecodeWarps / TW, team = warp / TW, wt = warp % TW;
  const int KT = L.k_tiles2;
  const int k0 = wt * KT / TW, k1 = (wt + 1) * KT / TW;
  if (lane != 0 || k1 <= k0) return;
  const int64_t budget = p.l2_prefetch_bytes / (int64_t(gridDim.x) * kDecodeWarps);
  const uint32_t wbytes = uint32_t(k1 - k0) * kTileBytes, sbytes = uint32_t(k1 - k0) * L.scale_tile_bytes();
  const int htiles = L.m_tiles2 / MT, ntasks = ls.n_rows * htiles;
  int64_t used = 0;
  for (int task = team * gridDim.x + blockIdx.x; task < ntasks; task += gridDim.x * teams) {
    const int info = ls.rows[task / htiles], ht = task % htiles;
    if ((info & 0xff) != 0) continue;  // a second pass over the same expert reads the same weights
    if (used + MT * (wbytes + sbytes) > budget) return;
    const int e = info >> 8;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int64_t tile = int64_t(MT * ht + mt) * KT + k0;
      prefetch_l2(p.wts + L.w2_off + e * L.w2_expert_bytes() + tile * kTileBytes, wbytes);
      prefetch_l2(p.wts + L.s2_off + e * L.s2_expert_bytes() + tile * L.scale_tile_bytes(), sbytes);
    }
    used += MT * (wbytes + sbytes);
  }
}

// ---- phase 3: finalize ----------------------------------------------------------------------------
// out[t, h] = sum over the token's local slots j, in slot order, of w_j * (y[t, j, h] + b2[e_j, h]):
// every output element written once, from the token's own data only.
__device__ inline void finalize(const DecodeParams& p, const Lists& ls) {
  const float* b2 = p.L.has_bias ? reinterpret_cast<const float*>(p.wts + p.L.b2_off) : nullptr;
  const int64_t n = int64_t(p.T) * p.H;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int t = int(idx / p.H), h = int(idx % p.H);
    float v = 0.0f;
    for (int j = 0; j < p.k; ++j) {
      const int slot = t * p.k + j;
      const int e = ls.ids[slot] - p.local_offset;
      if (e < 0 || e >= p.num_local) continue;
      const float w = p.method == RoutingMethod::llama4 ? 1.0f : ls.tw[slot];
      float y = __ldcg(p.y + int64_t(slot) * p.H + h);
      if (b2 != nullptr) y += b2[int64_t(e) * p.H + h];
      v += w * y;
    }
    p.out[idx] = __float2bfloat16_rn(v);
  }
}

// NOTES: two blocks per SM (128 registers) for the weight-streaming variants; W4A4 quantizes the
// activations in registers too and gets the register file of one block instead of spilling.
template <Format F, bool GATED, bool W4A4>
__global__ void __launch_bounds__(kDecodeThreads, W4A4 ? 1 : 2) moe_decode_kernel(const __grid_constant__ DecodeParams p) {
  extern __shared__ __align__(16) uint8_t smem[];
  const SmemLayout sl = SmemLayout::make(p.num_local, p.T * p.k, p.E);
  float* scratch = reinterpret_cast<float*>(smem + sl.scratch_off);
  cooperative_groups::grid_group grid = cooperative_groups::this_grid();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int* ids = reinterpret_cast<int*>(smem + sl.ids_off);
  float* tw = reinterpret_cast<float*>(smem + sl.tw_off);
  // NOTES: up to one token per warp, every block routes the chunk itself: that costs each block one
  // routing time but saves a grid-wide barrier on the critical path of the smallest layers.
  mark(p, 0);
  const bool route_here = p.route_on_device && p.T <= kDecodeWarps;
  if (p.route_on_device && !route_here) {
    float* sel = scratch + warp * 2 * p.E;
    for (int t = blockIdx.x * kDecodeWarps + warp; t < p.T; t += gridDim.x * kDecodeWarps)
      route_token(p, t, sel, sel + p.E, lane, p.ids, p.tw);
    grid.sync();
  }
  if (route_here) {
    if (warp < p.T) route_token(p, warp, scratch + warp * 2 * p.E, scratch + warp * 2 * p.E + p.E, lane, ids, tw);
  } else {
    for (int s = threadIdx.x; s < p.T * p.k; s += blockDim.x) {
      ids[s] = __ldcg(p.ids + s);
      tw[s] = __ldcg(p.tw + s);
    }
  }
  __syncthreads();
  mark(p, 1);
  const Lists ls = build_lists(p, smem, sl);
  if (p.l2_prefetch_bytes > 0) prefetch_gemm2(p, ls);
  mark(p, 2);
  gemm1<F, GATED, W4A4>(p, ls, scratch);
  mark(p, 3);
  grid.sync();
  mark(p, 4);
  gemm2<F, W4A4>(p, ls, scratch);
  grid.sync();
  finalize(p, ls);
  mark(p, 5);
}

}  // namespace fp4moe::kernels
