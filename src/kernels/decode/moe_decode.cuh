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

constexpr int kPrefetch = 4;  // k-tiles of weights in flight per warp with two m-tiles (eight with one)

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
// The lists' view of shared memory, rebuilt from the launch parameters wherever a phase needs it
// (a few integer operations), so no list pointer stays live in registers across the weight streams.
__device__ __forceinline__ Lists lists_view(const DecodeParams& p, uint8_t* smem) {
  const SmemLayout sl = SmemLayout::make(p.num_local, p.T * p.k, p.E);
  Lists ls;
  ls.ids = reinterpret_cast<const int*>(smem + sl.ids_off);
  ls.tw = reinterpret_cast<const float*>(smem + sl.tw_off);
  ls.cnt = reinterpret_cast<int*>(smem + sl.cnt_off);
  ls.start = reinterpret_cast<int*>(smem + sl.start_off);
  ls.active = reinterpret_cast<int*>(smem + sl.active_off);
  ls.slots = reinterpret_cast<int*>(smem + sl.slots_off);
  ls.rows = reinterpret_cast<int*>(smem + sl.rows_off);
  const int* misc = reinterpret_cast<const int*>(smem + sl.misc_off);
  ls.n_active = misc[0];
  ls.n_rows = misc[1];
  return ls;
}

// The lists of a chunk of at most 32 slots, built by one warp in registers: a bitonic sort of the
// lanes' (local expert, slot) keys; runs of equal experts give cnt, start and active, and a scan over
// the run heads gives the GEMM2 rows. Only active experts get cnt and start (nothing reads the
// others' entries). The same lists as the general path.
// NOTES: for T * k <= 32 (T = 1..4 at k = 8) this replaces three block barriers, shared-memory atomics
// and loops over all E experts with about 150 instructions of one warp (H200, qwen3-30b-a3b, T = 1:
// the lists phase from 2.6 to 2.0 us; PERFLOG v15).
__device__ inline void build_lists_small(const DecodeParams& p, const Lists& ls, int* misc, int lane) {
  const int nslots = p.T * p.k;
  int e = -1;
  if (lane < nslots) {
    e = ls.ids[lane] - p.local_offset;
    if (e < 0 || e >= p.num_local) e = -1;
  }
  unsigned key = e >= 0 ? (unsigned(e) << 5) | unsigned(lane) : 0xffffffffu;  // absent slots sort last
#pragma unroll
  for (int size = 2; size <= 32; size *= 2)
#pragma unroll
    for (int stride = size / 2; stride > 0; stride /= 2) {
      const unsigned other = __shfl_xor_sync(0xffffffffu, key, stride);
      const bool up = (lane & size) == 0, low = (lane & stride) == 0;
      key = (low == up) ? min(key, other) : max(key, other);
    }
  const int n = __popc(__ballot_sync(0xffffffffu, e >= 0));
  const int se = int(key >> 5);
  const int prev = __shfl_up_sync(0xffffffffu, se, 1);
  const bool valid = lane < n, head = valid && (lane == 0 || prev != se);
  const unsigned heads = __ballot_sync(0xffffffffu, head);
  if (valid) ls.slots[lane] = int(key & 31u);
  const unsigned later = heads & ~(0xffffffffu >> (31 - lane));  // heads after this lane
  const int run_end = later ? __ffs(later) - 1 : n;
  const int c = run_end - lane;
  const int np = head ? (c + 8 * kGroups - 1) / (8 * kGroups) : 0;  // GEMM2 rows of this expert
  int incl = np;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, incl, o);
    if (lane >= o) incl += v;
  }
  if (head) {
    ls.cnt[se] = c;
    ls.start[se] = lane;
    ls.active[__popc(heads & ((1u << lane) - 1))] = se;
    for (int r = 0; r < np; ++r) ls.rows[incl - np + r] = (se << 8) | (r * 8 * kGroups);
  }
  if (lane == 31) {
    misc[0] = __popc(heads);
    misc[1] = incl;
  }
}

// Builds the lists in shared memory (read them afterwards through lists_view).
__device__ inline void build_lists(const DecodeParams& p, uint8_t* smem) {
  Lists ls = lists_view(p, smem);  // its counts are not written yet (dead loads, removed by the compiler)
  const SmemLayout sl = SmemLayout::make(p.num_local, p.T * p.k, p.E);
  int* misc = reinterpret_cast<int*>(smem + sl.misc_off);
  const int nslots = p.T * p.k;
  if (nslots <= 32) {
    if (threadIdx.x < 32) build_lists_small(p, ls, misc, threadIdx.x);
    __syncthreads();
    return;
  }
  // Larger chunks: a stable counting sort with every warp on its own contiguous range of slots.
  // wcnt[w][e] counts warp w's slots of expert e, then becomes the exclusive prefix over warps, so
  // warp w places its slots of e after those of warps 0..w-1: slot order within an expert.
  // NOTES: the block-wide scratch (routing rows, later the team reductions) is free here and holds
  // kDecodeWarps * num_local ints (<= the routing rows' 2 * kDecodeWarps * E floats). A single warp
  // ranking 32 slots per dependent round cost about 3 us of the lists phase at T * k = 512.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int* wcnt = reinterpret_cast<int*>(smem + sl.scratch_off);
  int* mine = wcnt + warp * p.num_local;
  const int per_warp = (nslots + 32 * kDecodeWarps - 1) / (32 * kDecodeWarps) * 32;
  const int s_lo = warp * per_warp, s_hi = min(s_lo + per_warp, nslots);
  auto local_expert = [&](int s) {
    if (s >= s_hi) return -1;
    const int e = ls.ids[s] - p.local_offset;
    return (e >= 0 && e < p.num_local) ? e : -1;
  };
  for (int i = threadIdx.x; i < kDecodeWarps * p.num_local; i += blockDim.x) wcnt[i] = 0;
  __syncthreads();
  for (int base = s_lo; base < s_hi; base += 32) {
    const int e = local_expert(base + lane);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && __ffs(peers) - 1 == lane) mine[e] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) {
    int run = 0;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) {
      const int c = wcnt[w * p.num_local + e];
      wcnt[w * p.num_local + e] = run;
      run += c;
    }
    ls.cnt[e] = run;
  }
  __syncthreads();
  if (threadIdx.x < 32) {
    // Each lane owns a contiguous segment of experts: one pass sums its slots and active experts
    // (packed as slots << 16 | experts), one warp scan gives every segment its offsets, and a second
    // pass writes start and the active list (increasing expert order).
    // NOTES: one scan for the whole range instead of a dependent scan per 32 experts (about 1 us for
    // E = 256 at T = 1). Slots per chunk (64 * k) and experts (<= 512) fit 16 bits each.
    const int per = (p.num_local + 31) / 32;
    const int e_lo = min(lane * per, p.num_local), e_hi = min(e_lo + per, p.num_local);
    uint32_t seg = 0;
    for (int e = e_lo; e < e_hi; ++e) {
      const int c = ls.cnt[e];
      seg += (uint32_t(c) << 16) | uint32_t(c > 0);
    }
    uint32_t seg_incl = seg;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint32_t v = __shfl_up_sync(0xffffffffu, seg_incl, o);
      if (lane >= o) seg_incl += v;
    }
    const uint32_t excl = seg_incl - seg;
    int run = int(excl >> 16), at = int(excl & 0xffffu);
    for (int e = e_lo; e < e_hi; ++e) {
      const int c = ls.cnt[e];
      ls.start[e] = run;
      run += c;
      if (c > 0) ls.active[at++] = e;
    }
    const int nact = int(__shfl_sync(0xffffffffu, seg_incl, 31) & 0xffffu);
    __syncwarp();
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
  // Stable placement: rank among equal experts inside each round of 32, after the warp's earlier
  // rounds (its running count in wcnt) and the earlier warps (the prefix).
  for (int base = s_lo; base < s_hi; base += 32) {
    const int s = base + lane;
    const int e = local_expert(s);
    const unsigned peers = __match_any_sync(0xffffffffu, e);
    if (e >= 0) ls.slots[ls.start[e] + mine[e] + __popc(peers & ((1u << lane) - 1))] = s;
    __syncwarp();
    if (e >= 0 && __ffs(peers) - 1 == lane) mine[e] += __popc(peers);
    __syncwarp();
  }
  __syncthreads();
}

// ---- shared pieces of the two GEMM phases ---------------------------------------------------------
// The lane's B operand for one k-tile: 16 bf16 of `row` from `p` (columns 16 q .. of the k-tile).
template <bool L2_ONLY>
__device__ __forceinline__ void load_b(uint4 (&xb)[2], const __nv_bfloat16* p) {
  if constexpr (L2_ONLY) {  // written earlier in this launch: must bypass the incoherent L1
    xb[0] = __ldcg(reinterpret_cast<const uint4*>(p));
    xb[1] = __ldcg(reinterpret_cast<const uint4*>(p + 8));
  } else {
    xb[0] = ldg_cached(p);
    xb[1] = ldg_cached(p + 8);
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
// only), U k-tiles of weights in flight (kPrefetch with two m-tiles), and the team's partial sums are added in warp
// order into the accumulators of warp wt == 0, which alone holds the result afterwards.
//   wbase / sbase: the lane's first weight / scale tile of m-tile 0 (k-tile 0); mstride_*: m-tile step
//   brow: this lane's B row (token column g); lanes of absent tokens pass any valid row (an mma column
//         depends on its own B column only, and absent columns are never stored)
//   b_cols: valid columns of B (a multiple of 16; only the k-tile holding column b_cols - 1 can
//         reach past it, and only the checked tail reads that tile)
// NOTES: the steady-state loop runs whole groups of U k-tiles while at least 2U remain, so every
// refill and every B load in it is in range without a check; a refill goes into the ring slot the
// step has just consumed (no register copies) at a fixed immediate offset from pointers bumped once
// per group. The last U..2U-1 k-tiles (or a short range) run in the checked, fully unrolled tail.
template <Format F, int MT, bool B_FROM_L2>
__device__ __forceinline__ void team_gemm(float (&acc)[MT][4], const uint8_t* wbase, const uint8_t* sbase,
                                          int64_t mstride_w, int64_t mstride_s, const __nv_bfloat16* brow,
                                          int b_cols, int k0, int k1, int team, int TW, int wt, float* red,
                                          uint64_t policy) {
  constexpr int U = kPrefetch * 2 / MT;  // the same bytes (and ring registers) in flight for MT = 1 and 2
  constexpr int SB = scale_tile_bytes(F);
  static_assert(U % 2 == 0, "the B operand ping-pongs between two buffers across the unrolled k-tiles");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, q = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[mt][r] = 0.0f;
  const uint8_t* wp[MT];
  const uint8_t* sp[MT];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    wp[mt] = wbase + mt * mstride_w + int64_t(k0) * kTileBytes;
    sp[mt] = sbase + mt * mstride_s + int64_t(k0) * SB;
  }
  const __nv_bfloat16* bp = brow + k0 * kTileCols + 16 * q;
  int left = k1 - k0;  // k-tiles not yet consumed
  uint4 abuf[U][MT];
  uint32_t sbuf[U][MT];
#pragma unroll
  for (int u = 0; u < U; ++u)
    if (u < left)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        abuf[u][mt] = ldg_stream(wp[mt] + u * kTileBytes, policy);
        sbuf[u][mt] = ldg_u16(sp[mt] + u * SB);
      }
  uint4 xa[2], xb[2];
  if (left > 0) {
    if (k0 * kTileCols + 16 * q < b_cols) load_b<B_FROM_L2>(xa, bp);
    else xa[0] = xa[1] = make_uint4(0, 0, 0, 0);
  }
  // Steady state: consume ring slot u (k-tile u of the group), then refill it with k-tile U + u.
  auto step = [&](int u, uint4 (&cur)[2], uint4 (&nxt)[2]) {
    load_b<B_FROM_L2>(nxt, bp + (u + 1) * kTileCols);
    tile_mma<F, MT>(acc, abuf[u], sbuf[u], cur);
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      abuf[u][mt] = ldg_stream(wp[mt] + (U + u) * kTileBytes, policy);
      sbuf[u][mt] = ldg_u16(sp[mt] + (U + u) * SB);
    }
  };
  for (; left >= 2 * U; left -= U) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (u % 2 == 0) step(u, xa, xb);
      else step(u, xb, xa);
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      wp[mt] += U * kTileBytes;
      sp[mt] += U * SB;
    }
    bp += U * kTileCols;
  }
  // Tail: the last left < 2U k-tiles, every load checked.
  const int col_end = b_cols - (k1 - left) * kTileCols - 16 * q;  // columns of B left to this lane
  auto tail_step = [&](int u, uint4 (&cur)[2], uint4 (&nxt)[2]) {
    if (u + 1 < left) {
      if ((u + 1) * kTileCols < col_end) load_b<B_FROM_L2>(nxt, bp + (u + 1) * kTileCols);
      else nxt[0] = nxt[1] = make_uint4(0, 0, 0, 0);
    }
    tile_mma<F, MT>(acc, abuf[u % U], sbuf[u % U], cur);
    if (u + U < left)
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        abuf[u % U][mt] = ldg_stream(wp[mt] + (U + u) * kTileBytes, policy);
        sbuf[u % U][mt] = ldg_u16(sp[mt] + (U + u) * SB);
      }
  };
#pragma unroll
  for (int u = 0; u < 2 * U - 1; ++u) {
    if (u < left) {
      if (u % 2 == 0) tail_step(u, xa, xb);
      else tail_step(u, xb, xa);
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

// GEMM1's epilogue: scales, bias, activation, (W4A4) quantization of a, store. The task's expert and
// slots and the expert's factors are read here, not kept from before the weight stream.
template <Format F, bool GATED, bool W4A4>
__device__ __forceinline__ void gemm1_epilogue(const DecodeParams& p, const Lists& ls, int task, int pass,
                                               const float (&acc)[GATED ? 2 : 1][4]) {
  asm volatile("" ::: "memory");
  const PackedLayout& L = p.L;
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  const int b = task % L.i_blocks, e = ls.active[task / L.i_blocks];
  const int s0 = ls.start[e], np = min(ls.cnt[e] - pass, 8);
  const MatrixScales ms = *reinterpret_cast<const MatrixScales*>(p.wts + L.scales_off + e * sizeof(MatrixScales));
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

// ---- phase 1: GEMM1 + activation ------------------------------------------------------------------
// Task = (active expert, 16 intermediate rows); one pass per 8 of the expert's slots.
template <Format F, bool GATED, bool W4A4>
__device__ inline void gemm1(const DecodeParams& p, uint8_t* smem, float* red) {
  const Lists ls = lists_view(p, smem);
  constexpr int MT = GATED ? 2 : 1;
  const PackedLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int TW = p.team1, teams = kDecodeWarps / TW, team = warp / TW, wt = warp % TW;
  const int KT = L.k_tiles13;
  const int k0 = wt * KT / TW, k1 = (wt + 1) * KT / TW;
  const int g = lane >> 2;
  const int ntasks = ls.n_active * L.i_blocks;
  const int64_t mstride_w = int64_t(KT) * kTileBytes, mstride_s = int64_t(KT) * scale_tile_bytes(F);
  const uint64_t policy = evict_first_policy();

  const int stride = gridDim.x * teams;
  for (int task = team * gridDim.x + blockIdx.x; task < ntasks; task += stride) {
    const int n = ls.cnt[ls.active[task / L.i_blocks]];
    for (int pass = 0; pass < n; pass += 8) {
      // The task's expert, block and slots, read from shared memory again for every pass and after the
      // weight stream (a compiler barrier), so they hold no registers while it runs.
      asm volatile("" ::: "memory");
      const int b = task % L.i_blocks, e = ls.active[task / L.i_blocks];
      const int s0 = ls.start[e], np = min(n - pass, 8);
      const uint8_t* wbase = p.wts + L.w13_off + e * L.w13_expert_bytes() + MT * b * mstride_w + lane * 16;
      const uint8_t* sbase = p.wts + L.s13_off + e * L.s13_expert_bytes() + MT * b * mstride_s + lane_scale_offset(F, lane);
      // Lanes past the pass's last token read that token's row (never stored).
      const int slot_g = ls.slots[s0 + pass + min(g, np - 1)];
      const __nv_bfloat16* xrow = W4A4 ? p.xq + int64_t(slot_g) * p.H : p.x + int64_t(slot_g / p.k) * p.H;
      float acc[MT][4];
      team_gemm<F, MT, W4A4>(acc, wbase, sbase, mstride_w, mstride_s, xrow, p.H, k0, k1, team, TW, wt, red,
                             policy);
      if (wt != 0) continue;
      gemm1_epilogue<F, GATED, W4A4>(p, ls, task, pass, acc);
    }
  }
}

// ---- phase 2: GEMM2 -------------------------------------------------------------------------------
// Task = (work row: an expert and up to 8 of its slots, 32 rows of H), the same team GEMM as phase 1.
// Each slot's y = W2 a (times the expert's scales) lands in its own row of `y`, so the finalize can
// add a token's experts in its own slot order, whatever else shares the batch.

// GEMM2's epilogue: the task's expert and slots are read again from shared memory here (after a
// compiler barrier) rather than kept in registers across the weight stream.
template <Format F, bool W4A4>
__device__ __forceinline__ void epilogue2(const DecodeParams& p, const Lists& ls, int task,
                                          const float (&acc)[kTask2Tiles][4]) {
  asm volatile("" ::: "memory");
  constexpr int MT = kTask2Tiles;
  const PackedLayout& L = p.L;
  const int lane = threadIdx.x % 32, g = lane >> 2, q = lane & 3;
  const int htiles = L.m_tiles2 / MT;
  const int r = task / htiles, ht = task % htiles;
  const int info = ls.rows[r], e = info >> 8, pass = info & 0xff;
  const int n = min(ls.cnt[e] - pass, 8), s0 = ls.start[e] + pass;
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

template <Format F, bool W4A4>
__device__ inline void gemm2(const DecodeParams& p, uint8_t* smem, float* red) {
  const Lists ls = lists_view(p, smem);
  constexpr int MT = kTask2Tiles;
  const PackedLayout& L = p.L;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int TW = p.team2, teams = kDecodeWarps / TW, team = warp / TW, wt = warp % TW;
  const int KT = L.k_tiles2;
  const int k0 = wt * KT / TW, k1 = (wt + 1) * KT / TW;
  const int g = lane >> 2;
  const int htiles = L.m_tiles2 / MT;
  const int ntasks = ls.n_rows * htiles;
  const int64_t mstride_w = int64_t(KT) * kTileBytes, mstride_s = int64_t(KT) * scale_tile_bytes(F);
  const uint64_t policy = evict_first_policy();

  const int stride = gridDim.x * teams;
  for (int task = team * gridDim.x + blockIdx.x; task < ntasks; task += stride) {
    const int r = task / htiles, ht = task % htiles;
    const int info = ls.rows[r], e = info >> 8, pass = info & 0xff;
    const int n = min(ls.cnt[e] - pass, 8), s0 = ls.start[e] + pass;
    const uint8_t* wbase = p.wts + L.w2_off + e * L.w2_expert_bytes() + MT * ht * mstride_w + lane * 16;
    const uint8_t* sbase = p.wts + L.s2_off + e * L.s2_expert_bytes() + MT * ht * mstride_s + lane_scale_offset(F, lane);
    const __nv_bfloat16* brow = p.act + int64_t(ls.slots[s0 + min(g, n - 1)]) * L.i_pad;  // absent: never stored
    float acc[MT][4];
    team_gemm<F, MT, true>(acc, wbase, sbase, mstride_w, mstride_s, brow, 16 * L.i_blocks, k0, k1, team, TW, wt,
                           red, policy);
    if (wt != 0) continue;
    epilogue2<F, W4A4>(p, ls, task, acc);
  }
}

// ---- L2 prefetch of GEMM2's weights -----------------------------------------------------------------
// Issued right after the expert lists exist, so GEMM2's bytes stream from HBM while GEMM1 runs and the
// second phase starts from L2 instead of paying the memory latency again after the grid barrier.
// Each warp prefetches, within its share of the budget, the tiles it reads first in phase 2 (same
// task and K-range mapping as gemm2).
__device__ inline void prefetch_gemm2(const DecodeParams& p, uint8_t* smem) {
  const Lists ls = lists_view(p, smem);
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

// ---- W4A4: the activations of every slot quantized once -----------------------------------------
// xq[s] = x[s / k] quantized and dequantized in NVFP4 blocks of 16 with the GEMM1 input scale of the
// slot's expert (the reference's numerics), for the local slots of the chunk; GEMM1 reads it after a
// grid barrier instead of quantizing its B operand per task and k-tile.
__device__ inline void quantize_slots(const DecodeParams& p, const int* ids) {
  const int bpr = p.H / 16;
  const int64_t n = int64_t(p.T) * p.k * bpr;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int s = int(idx / bpr), blk = int(idx % bpr);
    const int e = ids[s] - p.local_offset;
    if (e < 0 || e >= p.num_local) continue;
    const float g = reinterpret_cast<const MatrixScales*>(p.wts + p.L.scales_off)[e].in13;
    const __nv_bfloat16* src = p.x + int64_t(s / p.k) * p.H + 16 * blk;
    uint4 v[2] = {ldg_cached(src), ldg_cached(src + 8)};
    fake_quant_block(v, g);
    uint4* dst = reinterpret_cast<uint4*>(p.xq + int64_t(s) * p.H + 16 * blk);
    __stcg(dst, v[0]);
    __stcg(dst + 1, v[1]);
  }
}

// ---- phase 3: finalize ----------------------------------------------------------------------------
// out[t, h] = sum over the token's local slots j, in slot order, of w_j * (y[t, j, h] + b2[e_j, h]):
// every output element written once, from the token's own data only.
__device__ inline void finalize(const DecodeParams& p, uint8_t* smem) {
  const Lists ls = lists_view(p, smem);
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

// NOTES: two blocks per SM (128 registers) for every variant: W4A4 quantizes the activations before
// the weight stream, so its loop is the W4A16 loop reading xq.
template <Format F, bool GATED, bool W4A4>
__global__ void __launch_bounds__(kDecodeThreads, 2) moe_decode_kernel(const __grid_constant__ DecodeParams p) {
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
  if constexpr (W4A4) quantize_slots(p, ids);
  build_lists(p, smem);
  if (p.l2_prefetch_bytes > 0) prefetch_gemm2(p, smem);
  if constexpr (W4A4) grid.sync();  // every slot's xq before any GEMM1 task reads it
  mark(p, 2);
  gemm1<F, GATED, W4A4>(p, smem, scratch);
  mark(p, 3);
  grid.sync();
  mark(p, 4);
  gemm2<F, W4A4>(p, smem, scratch);
  grid.sync();
  finalize(p, smem);
  mark(p, 5);
}

}  // namespace fp4moe::kernels
