// The prefill path around the two grouped GEMMs: routing, per-expert token lists, the gather of token
// rows into GEMM1's operand, and the finalize. One pass covers up to PrefillTactic::token_chunk tokens:
//
//   route     one warp per token (routing.cuh), unless the caller passed top-k ids     -> ids, tw
//   count     slots per local expert in each chunk of kListChunk slots                  -> hist
//   scan      one block: per-expert totals and starts, each chunk's first row per
//             expert, and the token tiles (expert, first row, rows) in expert order      -> tiles
//   place     stable sort of the slots by (local expert, slot index)                   -> row_slot, slot_row
//   gather    xs[row] = the slot's token row, K permuted per 64 columns like the packed
//             weights (W4A4: quantized to NVFP4 with the slot's expert input scale)
//   finalize  out[t, h] = sum over the token's local slots, in slot order, of w * (y + b2)
//
// Every list is deterministic (counts, prefix sums and a stable fill; the only atomics are shared-
// memory counters whose final values do not depend on order), so the rows each expert's GEMM sees,
// and the order of every sum, depend on the routing only.
#pragma once
#include <cub/block/block_scan.cuh>
#include <cuda_bf16.h>

#include "kernels/common/fragments.cuh"
#include "kernels/common/routing.cuh"
#include "kernels/prefill/params.h"

namespace fp4moe::kernels {

template <class T>
__device__ __forceinline__ T* ws_ptr(const PrefillParams& p, int64_t off) {
  return reinterpret_cast<T*>(p.ws + off);
}

// Local expert of slot s, or -1 when it is routed to another rank or out of range.
__device__ __forceinline__ int local_expert(const PrefillParams& p, int64_t s) {
  const int e = p.ids[s] - p.local_offset;
  return (e >= 0 && e < p.num_local) ? e : -1;
}

// ---- route: one warp per token --------------------------------------------------------------------
__global__ void __launch_bounds__(kPrefillRouteWarps * 32) prefill_route_kernel(const __grid_constant__ PrefillParams p) {
  extern __shared__ float route_smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int t = blockIdx.x * kPrefillRouteWarps + warp;
  if (t >= p.T) return;
  float* sel = route_smem + warp * 2 * p.E;
  route_token(p, t, sel, sel + p.E, lane, p.ids_out, p.tw_out);
}

// ---- count: slots per local expert of each chunk --------------------------------------------------
__global__ void __launch_bounds__(kListChunk) prefill_count_kernel(const __grid_constant__ PrefillParams p) {
  extern __shared__ int cnt[];
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) cnt[e] = 0;
  __syncthreads();
  const int64_t s = int64_t(blockIdx.x) * kListChunk + threadIdx.x;
  if (s < int64_t(p.T) * p.k) {
    const int e = local_expert(p, s);
    if (e >= 0) atomicAdd(&cnt[e], 1);
  }
  __syncthreads();
  int* hist = ws_ptr<int>(p, p.W.hist_off) + int64_t(blockIdx.x) * p.num_local;
  for (int e = threadIdx.x; e < p.num_local; e += blockDim.x) hist[e] = cnt[e];
}

// ---- scan: totals, starts, chunk bases and the token tiles (one block) -----------------------------
constexpr int kScanThreads = 1024;

// Tiles of an expert with n rows (params.h): tiles of `base` rows, a remainder of up to max - base rows
// joining the last one.
__host__ __device__ __forceinline__ int tiles_of(int n, int base, int max) {
  if (n <= max) return n > 0 ? 1 : 0;
  const int full = n / base, r = n % base;
  return full + ((r != 0 && r > max - base) ? 1 : 0);
}

__global__ void __launch_bounds__(kScanThreads) prefill_scan_kernel(const __grid_constant__ PrefillParams p) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage scan_rows, scan_tiles;
  const int NL = p.num_local, chunks = p.W.chunks;
  int* hist = ws_ptr<int>(p, p.W.hist_off);
  int* count = ws_ptr<int>(p, p.W.count_off);
  int* start = ws_ptr<int>(p, p.W.start_off);
  PrefillTile* tiles = ws_ptr<PrefillTile>(p, p.W.tiles_off);
  int* misc = ws_ptr<int>(p, p.W.misc_off);
  // Per expert: each chunk's offset among the expert's slots (in place), and the total.
  // NOTES: eight loads in flight per round; a plain read-modify-write loop waits one L2 latency per chunk.
  for (int e = threadIdx.x; e < NL; e += blockDim.x) {
    int run = 0;
    for (int b0 = 0; b0 < chunks; b0 += 8) {
      int h[8];
#pragma unroll
      for (int u = 0; u < 8; ++u) h[u] = b0 + u < chunks ? hist[int64_t(b0 + u) * NL + e] : 0;
#pragma unroll
      for (int u = 0; u < 8; ++u) {
        if (b0 + u < chunks) hist[int64_t(b0 + u) * NL + e] = run;
        run += h[u];
      }
    }
    count[e] = run;
  }
  __syncthreads();
  // Experts [e0, e1) per thread, in order: rows and tiles before them by two block scans.
  const int per = (NL + kScanThreads - 1) / kScanThreads;
  const int e0 = min(NL, int(threadIdx.x) * per), e1 = min(NL, e0 + per);
  int rows = 0, ntiles = 0;
  for (int e = e0; e < e1; ++e) {
    rows += count[e];
    ntiles += tiles_of(count[e], p.tile_base, p.tile_max);
  }
  int rows_before, tiles_before, rows_total, tiles_total;
  Scan(scan_rows).ExclusiveSum(rows, rows_before, rows_total);
  Scan(scan_tiles).ExclusiveSum(ntiles, tiles_before, tiles_total);
  for (int e = e0; e < e1; ++e) {
    start[e] = rows_before;
    const int n = count[e], nt = tiles_of(n, p.tile_base, p.tile_max);
    for (int j = 0; j < nt; ++j) {
      const int r0 = j * p.tile_base, rows_j = j + 1 < nt ? p.tile_base : n - r0;
      tiles[tiles_before++] = PrefillTile{e, rows_before + r0, rows_j, 0};
    }
    rows_before += n;
  }
  if (threadIdx.x == 0) {
    start[NL] = rows_total;
    misc[0] = tiles_total;
  }
}

// ---- place: stable fill of the sorted rows ---------------------------------------------------------
// Block b sorts its chunk: warp w takes slots [32 w, 32 w + 32) of the chunk; a slot's row is the
// expert's start + the chunk's offset for the expert + the expert's slots in earlier warps + its rank
// among equal experts in its own warp.
__global__ void __launch_bounds__(kListChunk) prefill_place_kernel(const __grid_constant__ PrefillParams p) {
  extern __shared__ int warp_hist[];  // [kListChunk / 32][num_local]
  constexpr int W = kListChunk / 32;
  const int NL = p.num_local, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int i = threadIdx.x; i < W * NL; i += blockDim.x) warp_hist[i] = 0;
  __syncthreads();
  const int64_t nslots = int64_t(p.T) * p.k;
  const int64_t s = int64_t(blockIdx.x) * kListChunk + threadIdx.x;
  const int e = s < nslots ? local_expert(p, s) : -1;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank = __popc(peers & ((1u << lane) - 1));
  if (e >= 0 && rank == 0) warp_hist[warp * NL + e] = __popc(peers);
  __syncthreads();
  int* slot_row = ws_ptr<int>(p, p.W.slot_row_off);
  if (e >= 0) {
    int before = 0;
    for (int w = 0; w < warp; ++w) before += warp_hist[w * NL + e];
    const int row = ws_ptr<int>(p, p.W.start_off)[e] + ws_ptr<int>(p, p.W.hist_off)[int64_t(blockIdx.x) * NL + e] +
                    before + rank;
    ws_ptr<int>(p, p.W.row_slot_off)[row] = int(s);
    slot_row[s] = row;
  } else if (s < nslots) {
    slot_row[s] = -1;
  }
}

// ---- gather: GEMM1's B operand ---------------------------------------------------------------------
// Column c = 16 q + 4 j + r of a 64-column tile goes to position 16 j + (r < 2 ? 2 q + r : 8 + 2 q + r - 2):
// k-step j of the packed weights (fragments.cuh) holds columns 16 q + 4 j + {0, 1} as mma k 2q, 2q + 1
// and + {2, 3} as 2q + 8, 2q + 9. In 32-bit words (column pairs) of a tile: output word 4 u + r (16-byte
// chunk u, word r) is input word 8 r + u, i.e. word u % 4 of input chunk 2 r + u / 4.
// A warp moves 4 tiles (512 bytes) of one sorted row: lane l loads chunk l % 8 of tile l / 8 coalesced,
// (W4A4: quantizes its NVFP4 block with the neighbouring lane), and stores chunk l % 8 of the permuted
// tile, collecting its four words through shared memory.
constexpr int kGatherWarps = 8;

__global__ void __launch_bounds__(kGatherWarps * 32) prefill_gather_kernel(const __grid_constant__ PrefillParams p) {
  __shared__ uint4 stage[kGatherWarps][4][9];  // [warp][tile][chunk], padded against bank conflicts
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tl = lane / 8, u = lane % 8;
  const int KT = p.W.h_pad / kTileCols, groups = (KT + 3) / 4;
  const int64_t seg = int64_t(blockIdx.x) * kGatherWarps + warp;
  const int64_t row = seg / groups;
  const int kt = int(seg % groups) * 4 + tl;
  if (row >= ws_ptr<int>(p, p.W.start_off)[p.num_local]) return;  // whole warps leave together
  const int slot = ws_ptr<int>(p, p.W.row_slot_off)[row];
  const int col = kt * kTileCols + 8 * u;
  uint4 v = (kt < KT && col < p.H) ? ldg_cached(p.x + int64_t(slot / p.k) * p.H + col) : make_uint4(0, 0, 0, 0);
  if (p.w4a4) {
    const int e = local_expert(p, slot);
    const float g = reinterpret_cast<const MatrixScales*>(p.wts + p.L.scales_off)[e].in13;
    uint4 blk[2];
    const uint4 other = make_uint4(__shfl_xor_sync(0xffffffffu, v.x, 1), __shfl_xor_sync(0xffffffffu, v.y, 1),
                                   __shfl_xor_sync(0xffffffffu, v.z, 1), __shfl_xor_sync(0xffffffffu, v.w, 1));
    blk[0] = (u & 1) ? other : v;  // the block's first 8 columns, then its second 8
    blk[1] = (u & 1) ? v : other;
    fake_quant_block(blk, g);
    v = blk[u & 1];
  }
  stage[warp][tl][u] = v;
  __syncwarp();
  const uint32_t* words = reinterpret_cast<const uint32_t*>(stage[warp][tl]);
  uint32_t o[4];
#pragma unroll
  for (int r = 0; r < 4; ++r) o[r] = words[(2 * r + u / 4) * 4 + u % 4];
  if (kt < KT)
    reinterpret_cast<uint4*>(ws_ptr<__nv_bfloat16>(p, p.W.xs_off) + row * p.W.h_pad + kt * kTileCols)[u] =
        make_uint4(o[0], o[1], o[2], o[3]);
}

// Position of intermediate index i in a K-permuted activation row (the same map as the gather).
__device__ __forceinline__ int permuted_col(int i) {
  const int c = i % kTileCols, q = c / 16, j = (c % 16) / 4, r = c % 4;
  return i - c + 16 * j + (r < 2 ? 2 * q + r : 8 + 2 * q + r - 2);
}

// ---- finalize ----------------------------------------------------------------------------------------
// out[t, h..h+3] = sum over the token's local slots j, in slot order, of w_j * (y[row_j, h] + b2[e_j, h]).
__global__ void __launch_bounds__(256) prefill_finalize_kernel(const __grid_constant__ PrefillParams p) {
  const int H4 = p.H / 4;
  const int64_t n = int64_t(p.T) * H4;
  const float* y = ws_ptr<float>(p, p.W.y_off);
  const int* slot_row = ws_ptr<int>(p, p.W.slot_row_off);
  const float* b2 = p.L.has_bias ? reinterpret_cast<const float*>(p.wts + p.L.b2_off) : nullptr;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < n; idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t t = idx / H4;
    const int h = int(idx % H4) * 4;
    float v[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int j = 0; j < p.k; ++j) {
      const int64_t slot = t * p.k + j;
      const int row = slot_row[slot];
      if (row < 0) continue;
      const float w = p.method == RoutingMethod::llama4 ? 1.0f : p.tw[slot];
      float4 yv = __ldcg(reinterpret_cast<const float4*>(y + int64_t(row) * p.H + h));
      if (b2 != nullptr) {
        const float4 bv = *reinterpret_cast<const float4*>(b2 + int64_t(local_expert(p, slot)) * p.H + h);
        yv.x += bv.x;
        yv.y += bv.y;
        yv.z += bv.z;
        yv.w += bv.w;
      }
      v[0] += w * yv.x;
      v[1] += w * yv.y;
      v[2] += w * yv.z;
      v[3] += w * yv.w;
    }
    __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]), hi = __floats2bfloat162_rn(v[2], v[3]);
    uint2 o;
    o.x = *reinterpret_cast<uint32_t*>(&lo);
    o.y = *reinterpret_cast<uint32_t*>(&hi);
    *reinterpret_cast<uint2*>(p.out + t * p.H + h) = o;
  }
}

}  // namespace fp4moe::kernels
