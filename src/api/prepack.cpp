// prepack: standard (checkpoint) layout -> the packed kernel layout of include/fp4moe/layout.h, on
// the host. The per-tile math is api/pack_tile.h (shared with the device prepack); here it runs on
// every core over (expert, matrix) units, a checkpoint byte at a time through lookup tables.
#include <array>
#include <cstring>
#include <vector>

#include "api/pack_tile.h"
#include "api/prepack_common.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/moe.h"
#include "fp4moe/weights.h"
#include "reference/parallel.h"

namespace fp4moe {
namespace pack {

const char* matrix_name(int kind) {
  switch (kind) {
    case kGate: return "gate";
    case kUp: return "up";
    default: return "down";
  }
}

int check_scales(Format f, const ScaleStats& s, int expert, int kind, int64_t blocks_per_row) {
  if (s.first_nan >= 0) {
    // The words of check_block_scales (src/reference/weights.cpp), which the host path runs first.
    const int64_t r = s.first_nan / blocks_per_row, b = s.first_nan % blocks_per_row, blk = block_size(f);
    FP4MOE_FAIL("expert " << expert << " " << matrix_name(kind) << ": block scale of row " << r << ", block " << b
                          << " (columns " << b * blk << ".." << (b + 1) * blk - 1 << ") is NaN ("
                          << (f == Format::nvfp4 ? "E4M3" : "E8M0") << " code " << detail::hex_byte(s.nan_code)
                          << "); NaN block scales are not accepted");
  }
  if (f == Format::nvfp4) return 0;
  const int offset = mxfp4_offset(s.max_code);
  FP4MOE_CHECK(s.min_code > s.max_code || mxfp4_byte_ok(s.min_code, offset),
               "expert " << expert << " " << matrix_name(kind) << ": MXFP4 block scales span 2^"
                         << s.min_code - 127 << " .. 2^" << s.max_code - 127
                         << ", more than the 2^253 one matrix supports");
  return offset;
}

MatrixScales matrix_scales(Format f, bool gated, const float global[3], const int offset[3], float in13,
                           float in2) {
  auto factor = [&](int k) {
    return f == Format::nvfp4 ? nvfp4_epilogue_factor(global[k]) : mxfp4_epilogue_factor(offset[k]);
  };
  MatrixScales ms{};
  ms.gate = gated ? factor(kGate) : 0.0f;
  ms.up = factor(kUp);
  ms.down = factor(kDown);
  ms.in13 = in13;
  ms.in2 = in2;
  return ms;
}

}  // namespace pack

namespace {

using pack::ScaleCode;

// place_pair for every (pair, byte), and the NVFP4 scale re-encoding for every E4M3 code: the
// shared functions evaluated once, so the host's inner loop is table lookups.
struct Tables {
  std::array<std::array<uint32_t, 256>, 4> place{};
  std::array<ScaleCode, 256> nvfp4{};
  Tables() {
    for (int p = 0; p < 4; ++p)
      for (int b = 0; b < 256; ++b) place[p][b] = pack::place_pair(p, uint8_t(b));
    for (int c = 0; c < 256; ++c) nvfp4[c] = pack::encode_nvfp4_scale(uint8_t(c));
  }
};
const Tables& tables() {
  static const Tables t;
  return t;
}

pack::ScaleStats scan_scales(const QuantizedMatrix& m) {
  pack::ScaleStats s;
  const int64_t n = int64_t(m.scales.size());
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t c = m.scales[size_t(i)];
    const bool nan = m.format == Format::nvfp4 ? (c & 0x7F) == 0x7F : c == 0xFF;
    if (nan) {
      s.first_nan = i;
      s.nan_code = c;
      return s;
    }
    s.min_code = std::min<int>(s.min_code, c);
    s.max_code = std::max<int>(s.max_code, c);
  }
  return s;
}

// A source row of a packed row: the matrix row's bytes and block scales, or nothing (padding).
struct RowSource {
  const uint8_t* data = nullptr;
  const uint8_t* scales = nullptr;
  int mx_offset = 0;
};

// Packs one matrix [N, K] of one expert: m_tiles x k_tiles tiles; row_of(pr) gives packed row pr's
// source.
template <class RowOf>
void pack_matrix(int m_tiles, int k_tiles, int64_t K, Format fmt, RowOf row_of, uint8_t* w_out,
                 uint8_t* s_out) {
  const Tables& tb = tables();
  const int blk = block_size(fmt);
  const int stile = scale_tile_bytes(fmt);
  auto place = [&](int p, uint8_t b) { return tb.place[size_t(p)][b]; };
  for (int mt = 0; mt < m_tiles; ++mt) {
    RowSource src[16];
    for (int r = 0; r < 16; ++r) src[r] = row_of(mt * 16 + r);
    for (int kt = 0; kt < k_tiles; ++kt) {
      uint8_t* wt = w_out + (int64_t(mt) * k_tiles + kt) * kTileBytes;
      uint8_t* st = s_out + (int64_t(mt) * k_tiles + kt) * stile;
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        const int64_t c0 = int64_t(kt) * kTileCols + 16 * q;
        uint8_t bytes[2][8] = {};  // rows g and g + 8, columns c0 .. c0 + 15, after the fix-ups
        for (int h = 0; h < 2; ++h) {
          const RowSource& rs = src[g + 8 * h];
          uint8_t sbyte = 0;
          if (rs.data != nullptr && c0 < K) {
            const uint8_t code = rs.scales[c0 / blk];
            ScaleCode sc;
            if (fmt == Format::nvfp4) {
              sc = tb.nvfp4[code];
            } else {
              sc.byte = uint8_t(code + rs.mx_offset);  // in range: check_scales
            }
            sbyte = sc.byte;
            std::memcpy(bytes[h], rs.data + c0 / 2, 8);
            pack::fix_bytes(sc, bytes[h]);
          }
          st[lane_scale_offset(fmt, lane) + h] = sbyte;  // MXFP4: lanes 2b and 2b + 1 write the same byte
        }
        uint32_t words[4];
        for (int j = 0; j < 4; ++j) words[j] = pack::lane_word(bytes[0], bytes[1], j, place);
        std::memcpy(wt + lane * 16, words, 16);
      }
    }
  }
}

}  // namespace

PackedWeights prepack(const MoeProblem& p, const MoeWeights& w) {
  p.validate();
  check_block_scales(p, w);  // validate() and no NaN block scale, named by expert, row and block
  PackedWeights out;
  const int E = p.local_experts();
  const PackedLayout L =
      PackedLayout::make(p.hidden, p.intermediate, E, p.format, p.gated(), p.has_bias);
  detail::check_host_bytes(L.total_bytes, "prepack (the packed layer)");
  detail::check_host_bytes(L.total_bytes, "prepack (the packed layer)");
  out.layout = L;
  const int I = p.intermediate, H = p.hidden;

  // Scale checks first, in (expert, matrix) order, so the error reported is the first one whatever
  // the thread count (and the same as the device prepack's).
  std::vector<pack::ScaleStats> stats(size_t(E) * 3);
  detail::parallel_for(int64_t(E) * 3, 0, [&](int64_t u) {
    const ExpertWeights& x = w.experts[size_t(u / 3)];
    const int kind = int(u % 3);
    if (kind == pack::kGate && !p.gated()) return;
    stats[size_t(u)] = scan_scales(kind == pack::kGate ? x.gate : kind == pack::kUp ? x.up : x.down);
  });
  std::vector<std::array<int, 3>> offsets(size_t(E), {0, 0, 0});
  for (int e = 0; e < E; ++e)
    for (int kind = 0; kind < 3; ++kind) {
      if (kind == pack::kGate && !p.gated()) continue;
      const int64_t blocks = (kind == pack::kDown ? I : H) / block_size(p.format);
      offsets[size_t(e)][size_t(kind)] =
          pack::check_scales(p.format, stats[size_t(e) * 3 + kind], p.local_expert_offset + e, kind, blocks);
    }

  out.bytes.assign(size_t(L.total_bytes), 0);
  uint8_t* base = out.bytes.data();
  // Units: (expert, W13) and (expert, W2), claimed dynamically by every core.
  detail::parallel_for(int64_t(E) * 2, 0, [&](int64_t u) {
    const int e = int(u / 2);
    const ExpertWeights& x = w.experts[size_t(e)];
    const auto& off = offsets[size_t(e)];
    if (u % 2 == 0) {
      auto row13 = [&](int pr) -> RowSource {
        bool is_gate = false;
        const int i = pack::w13_source_row(pr, p.gated(), I, &is_gate);
        if (i < 0) return {};
        const QuantizedMatrix& m = is_gate ? x.gate : x.up;
        return {m.data.data() + int64_t(i) * (H / 2), m.scales.data() + int64_t(i) * m.scale_cols(),
                is_gate ? off[pack::kGate] : off[pack::kUp]};
      };
      pack_matrix(L.m_tiles13, L.k_tiles13, H, p.format, row13, base + L.w13_off + e * L.w13_expert_bytes(),
                  base + L.s13_off + e * L.s13_expert_bytes());
    } else {
      auto row2 = [&](int pr) -> RowSource {
        if (pr >= H) return {};
        return {x.down.data.data() + int64_t(pr) * (I / 2), x.down.scales.data() + int64_t(pr) * x.down.scale_cols(),
                off[pack::kDown]};
      };
      pack_matrix(L.m_tiles2, L.k_tiles2, I, p.format, row2, base + L.w2_off + e * L.w2_expert_bytes(),
                  base + L.s2_off + e * L.s2_expert_bytes());
    }
  });

  for (int e = 0; e < E; ++e) {
    const ExpertWeights& x = w.experts[size_t(e)];
    const float global[3] = {p.gated() ? x.gate.global_scale : 0.0f, x.up.global_scale, x.down.global_scale};
    const MatrixScales ms =
        pack::matrix_scales(p.format, p.gated(), global, offsets[size_t(e)].data(), x.input_scale13, x.input_scale2);
    std::memcpy(base + L.scales_off + e * int64_t(sizeof(MatrixScales)), &ms, sizeof ms);
    if (p.has_bias) {
      float* b13 = reinterpret_cast<float*>(base + L.b13_off) + e * L.b13_expert_floats();
      const int half = 16 * L.i_blocks;
      if (p.gated()) std::copy(x.gate_bias.begin(), x.gate_bias.end(), b13);
      std::copy(x.up_bias.begin(), x.up_bias.end(), b13 + half);
      float* b2 = reinterpret_cast<float*>(base + L.b2_off) + int64_t(e) * H;
      std::copy(x.down_bias.begin(), x.down_bias.end(), b2);
    }
  }
  return out;
}

}  // namespace fp4moe
