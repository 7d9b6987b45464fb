// Shapes and launch parameters of the prefill kernels (src/kernels/prefill), shared with the planner.
#pragma once
#include <cuda_bf16.h>
#include <cstddef>
#include <cstdint>

#include "fp4moe/layout.h"
#include "fp4moe/types.h"
#include "kernels/prefill/workspace.h"

namespace fp4moe::kernels {

constexpr int kPrefillBlockM = 256;         // weight rows per tile: 16 m-tiles, 2 x 64 per consumer warpgroup
constexpr int kPrefillConsumers = 2;        // consumer warpgroups
constexpr int kPrefillThreads = 128 * (1 + kPrefillConsumers);
// Token tiles: an expert's sorted rows are cut into tiles of kPrefillTileBase rows; a remainder of up to
// kPrefillTileMax - kPrefillTileBase rows joins the last full tile, and an expert with at most
// kPrefillTileMax rows is one tile. The GEMM runs each tile at the narrowest compiled wgmma width that
// holds it (kPrefillWidths), so padding stays under 32 rows and no tile repeats a dequantization for a few
// leftover rows.
constexpr int kPrefillTileBase = 128;
constexpr int kPrefillTileMax = 160;
constexpr int kPrefillWidths[6] = {32, 64, 96, 128, 144, 160};
constexpr int kPrefillMaxStages = 16;
constexpr size_t kPrefillSmemReserve = 6144;  // 1 KB alignment slack, barriers (2 x 16 x 8 B), the W4A4 epilogue exchange (4 KB)
constexpr int kPrefillRouteWarps = 8;       // tokens routed per block of the routing kernel

// Shared-memory bytes of one pipeline stage (one k-tile of 64 columns): the B tile (block_n rows of
// 128 bytes, 128-byte swizzled), the weight tiles and their scale tiles of block_m / 16 m-tiles.
FP4MOE_HD constexpr size_t prefill_stage_bytes(int block_m, int block_n, Format f) {
  return size_t(block_n) * 128 + size_t(block_m / kTileRows) * (kTileBytes + scale_tile_bytes(f));
}

struct PrefillParams {
  PackedLayout L;
  const uint8_t* wts;
  int T, H, E, k, local_offset, num_local;  // T: tokens of this pass
  const __nv_bfloat16* x;    // [T, H] of this pass
  __nv_bfloat16* out;        // [T, H]
  // routing (the fields route_token reads)
  const void* logits;        // [T, E]
  const float* router_bias;  // [E] or null
  RoutingMethod method;
  bool route_on_device, renormalize, has_router_bias, logits_bf16;
  int n_group, topk_group;
  float routed_scaling_factor;
  const int32_t* ids;        // [T, k]: the workspace's routing output or the caller's top-k
  const float* tw;           // [T, k]
  int32_t* ids_out;          // workspace routing output (device routing)
  float* tw_out;
  Activation act_kind;
  float alpha, limit;
  bool w4a4;
  int tile_base, tile_max;  // token tiles (kPrefillTileBase / kPrefillTileMax)
  PrefillWorkspace W;
  uint8_t* ws;               // workspace base (PrefillWorkspace offsets)
};

}  // namespace fp4moe::kernels
