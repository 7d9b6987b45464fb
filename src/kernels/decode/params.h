// Parameters of one launch of the decode kernel (one chunk of up to kTokenChunk tokens).
#pragma once
#include <cuda_bf16.h>
#include <cstdint>

#include "fp4moe/layout.h"
#include "fp4moe/types.h"

namespace fp4moe::kernels {

constexpr int kDecodeThreads = 256;
constexpr int kDecodeWarps = kDecodeThreads / 32;
constexpr int kMaxRoutedExperts = 512;  // device routing keeps two score rows per warp in shared memory
constexpr int kTimelinePoints = 6;
constexpr int kTask2Tiles = 2;  // m-tiles (of 16 rows of H) per GEMM2 task
constexpr int kGroups = 1;              // token groups of 8 per pass over an expert's weights

struct DecodeParams {
  PackedLayout L;
  const uint8_t* wts;
  int T, H, E, k, local_offset, num_local;
  const __nv_bfloat16* x;     // [T, H]
  __nv_bfloat16* out;         // [T, H]
  const void* logits;         // [T, E]
  const float* router_bias;   // [E] or null
  int32_t* ids;               // [T, k]: routing output (workspace) or the caller's precomputed ids
  float* tw;                  // [T, k]
  __nv_bfloat16* act;         // [T * k, L.i_pad] intermediate activations (workspace)
  float* y;                   // [T * k, H] GEMM2 output per slot, before weights and bias (workspace)
  __nv_bfloat16* xq;          // W4A4: [T * k, H] quantized x per slot, read by GEMM1 only (aliases y)
  RoutingMethod method;
  bool route_on_device, renormalize, has_router_bias, logits_bf16;
  int n_group, topk_group;
  float routed_scaling_factor;
  Activation act_kind;
  float alpha, limit;
  int team1, team2;  // warps splitting K of one GEMM1 / GEMM2 task
  int64_t l2_prefetch_bytes;  // GEMM2 weights prefetched into L2 during GEMM1 (0: none)
  uint64_t* timeline;         // diagnostics: [gridDim.x][kTimelinePoints] phase timestamps, or null
};

// Shared memory of one block: expert lists, then a union of the per-phase scratch.
struct SmemLayout {
  int cnt_off, start_off, active_off, slots_off, rows_off, ids_off, tw_off, misc_off, scratch_off, total;
  static __host__ __device__ SmemLayout make(int num_local, int slots, int E) {
    SmemLayout s;
    int off = 0;
    s.cnt_off = off; off += 4 * num_local;
    s.start_off = off; off += 4 * num_local;
    s.active_off = off; off += 4 * num_local;
    s.slots_off = off; off += 4 * slots;
    s.rows_off = off; off += 4 * (num_local + slots / (8 * kGroups) + 1);
    s.ids_off = off; off += 4 * slots;
    s.tw_off = off; off += 4 * slots;
    s.misc_off = off; off += 16;
    off = (off + 15) / 16 * 16;
    s.scratch_off = off;
    int routing = kDecodeWarps * 2 * E * 4;
    int gemm = kDecodeWarps * 2 * 4 * 32 * 4;  // team reduction: [warp][m-tile][4][lane]
    int lists = kDecodeWarps * num_local * 4;  // per-warp expert counts while the lists are built
    int m = routing > gemm ? routing : gemm;
    m = m > lists ? m : lists;
    s.total = off + m;
    return s;
  }
};

}  // namespace fp4moe::kernels
