// Workspace of one prefill pass (up to PrefillTactic::token_chunk tokens), shared by the host (sizing,
// tensor maps) and the kernels (indexing), so the two cannot drift apart.
//
//   ids, tw     [C * k]            routing output (or the caller's top-k, copied) per slot t * k + j
//   hist        [chunks][E_local]  slots per local expert in each list chunk of kListChunk slots,
//                                  turned in place into each chunk's first sorted row per expert
//   count       [E_local]          slots per local expert
//   start       [E_local + 1]      first sorted row of each local expert (start[E_local] = local slots)
//   tiles       [max_tiles]        token tiles: (local expert, first sorted row, rows), expert order
//   misc        [4]                0: number of tiles
//   row_slot    [C * k]            sorted row -> slot
//   slot_row    [C * k]            slot -> sorted row (-1: routed to another rank / dropped)
//   xs          [C * k, h_pad]     bf16 GEMM1 B: the slot's token row, K permuted per 64 columns
//                                  (W4A4: quantized with the slot's expert input scale)
//   act         [C * k, i_pad]     bf16 GEMM2 B: the activation, K permuted per 64 columns
//   y           [C * k, H]         fp32 GEMM2 output per sorted row (scales applied, no bias)
#pragma once
#include <cstdint>

#include "fp4moe/layout.h"

namespace fp4moe::kernels {

constexpr int kListChunk = 256;  // slots per block of the list kernels (8 warps x 32)

struct PrefillTile {
  int expert;  // local expert
  int row0;    // first sorted row
  int rows;    // rows of this tile (<= kPrefillTileMax)
  int pad;
};

struct PrefillWorkspace {
  int64_t slots = 0;  // C * k
  int chunks = 0, experts = 0, max_tiles = 0, h_pad = 0, i_pad = 0, hidden = 0;
  int64_t ids_off = 0, tw_off = 0, hist_off = 0, count_off = 0, start_off = 0, tiles_off = 0, misc_off = 0,
          row_slot_off = 0, slot_row_off = 0, xs_off = 0, act_off = 0, y_off = 0, total = 0;

  static FP4MOE_HD PrefillWorkspace make(int64_t tokens, int k, int local_experts, int hidden, int intermediate,
                                         int tile_base) {
    PrefillWorkspace w;
    if (tokens <= 0) return w;
    w.slots = tokens * k;
    w.chunks = int(ceil_div(w.slots, kListChunk));
    w.experts = local_experts;
    w.max_tiles = int(ceil_div(w.slots, tile_base)) + local_experts;
    w.h_pad = int(ceil_div(hidden, kTileCols) * kTileCols);
    w.i_pad = int(ceil_div(intermediate, kTileCols) * kTileCols);
    w.hidden = hidden;
    auto take = [&](int64_t& off, int64_t bytes) {
      off = w.total;
      w.total += (bytes + 1023) / 1024 * 1024;  // 1 KB: TMA boxes and 128-byte swizzle atoms
    };
    take(w.ids_off, w.slots * 4);
    take(w.tw_off, w.slots * 4);
    take(w.hist_off, int64_t(w.chunks) * local_experts * 4);
    take(w.count_off, int64_t(local_experts) * 4);
    take(w.start_off, int64_t(local_experts + 1) * 4);
    take(w.tiles_off, int64_t(w.max_tiles) * int64_t(sizeof(PrefillTile)));
    take(w.misc_off, 16);
    take(w.row_slot_off, w.slots * 4);
    take(w.slot_row_off, w.slots * 4);
    take(w.xs_off, w.slots * w.h_pad * 2);
    take(w.act_off, w.slots * w.i_pad * 2);
    take(w.y_off, w.slots * int64_t(hidden) * 4);
    return w;
  }
};

}  // namespace fp4moe::kernels
