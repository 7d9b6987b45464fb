// prepack: standard (checkpoint) layout -> the packed kernel layout of include/fp4moe/layout.h.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <exception>
#include <thread>
#include <vector>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/moe.h"
#include "fp4moe/weights.h"

namespace fp4moe {
namespace {

// Re-encoded scale byte and the nibble fix-up it implies for the 16 elements it covers.
struct ScaleCode {
  uint8_t byte = 0;
  bool zero = false;  // the block is all zeros: clear its nibbles
  bool flip = false;  // negative scale: flip the sign of its nibbles
};

ScaleCode encode_nvfp4_scale(uint8_t e4m3) {
  ScaleCode c;
  uint8_t mag = e4m3 & 0x7F;
  FP4MOE_CHECK(mag != 0x7F, "NVFP4 block scale is NaN (E4M3 code " << detail::hex_byte(e4m3) << ")");
  c.flip = (e4m3 & 0x80) != 0;
  if (mag == 0) {
    c.zero = true;
    c.byte = 1 << 3;
    return c;
  }
  // S = scale * 2^119 is a normal bf16 with exponent in [237, 254] and 3 mantissa bits.
  float s = std::ldexp(e4m3_to_float(mag), 119);
  uint16_t bits = float_to_bf16(s);
  int exponent = bits >> 7, mantissa = (bits >> 4) & 7;
  FP4MOE_CHECK(exponent >= 230 && exponent <= 254 && (bits & 0xF) == 0,
               "internal: E4M3 scale re-encoding out of range");
  c.byte = uint8_t(((exponent - 230) << 3) | mantissa);
  return c;
}

// Bias c of an MXFP4 matrix: S = 2^(s - 127 + c) must be a normal bf16 for every block.
int mxfp4_offset(const QuantizedMatrix& m) {
  int smax = 0;
  for (uint8_t s : m.scales) {
    FP4MOE_CHECK(s != 0xFF, "MXFP4 block scale is NaN (E8M0 code 0xFF)");
    smax = std::max<int>(smax, s);
  }
  return std::min(126, 254 - smax);
}

// Bit positions (sign, e1, e0, m) of the low element of pair p inside a packed word; the high element
// sits 16 bits above. Pairs 0-2 are the bf16 geometry (sign 15, exponent bits 8-7, mantissa 6) shifted
// left by 0, 3 and 6 bits; pair 3 fills the remaining bits (see layout.h).
constexpr int kPairBits[4][4] = {{15, 8, 7, 6}, {12, 5, 4, 3}, {9, 2, 1, 0}, {14, 11, 10, 13}};

uint32_t place_pair(int p, uint8_t lo, uint8_t hi) {
  uint32_t w = 0;
  for (int b = 0; b < 4; ++b) {
    const int bit = 3 - b;  // nibble bit of role b: sign (3), e1 (2), e0 (1), m (0)
    w |= uint32_t((lo >> bit) & 1) << kPairBits[p][b];
    w |= uint32_t((hi >> bit) & 1) << (kPairBits[p][b] + 16);
  }
  return w;
}

uint8_t nibble(const QuantizedMatrix& m, int64_t r, int64_t c) {
  uint8_t b = m.data[(r * m.cols + c) / 2];
  return (c & 1) ? (b >> 4) : (b & 0xF);
}

// Packs one matrix of one expert. row_of(pr_global) maps a packed row (m_tile * 16 + r) to a source
// (matrix, row); rows past the end map to nullptr.
struct RowSource {
  const QuantizedMatrix* m;
  int64_t row;
  int mx_offset;
};

template <class RowOf>
void pack_matrix(int m_tiles, int k_tiles, int64_t K, Format fmt, RowOf row_of, uint8_t* w_out,
                 uint8_t* s_out) {
  const int blk = block_size(fmt);
  for (int mt = 0; mt < m_tiles; ++mt) {
    RowSource src[16];
    for (int r = 0; r < 16; ++r) src[r] = row_of(mt * 16 + r);
    for (int kt = 0; kt < k_tiles; ++kt) {
      uint8_t* wt = w_out + (int64_t(mt) * k_tiles + kt) * kTileBytes;
      uint8_t* st = s_out + (int64_t(mt) * k_tiles + kt) * scale_tile_bytes(fmt);
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        const int64_t c0 = int64_t(kt) * kTileCols + 16 * q;
        uint8_t nib[2][16] = {};  // [row g / g+8][16 columns], after sign / zero fix-ups
        for (int h = 0; h < 2; ++h) {
          const RowSource& rs = src[g + 8 * h];
          uint8_t byte = 0;
          if (rs.m != nullptr && c0 < K) {
            uint8_t code = rs.m->scales[rs.row * (K / blk) + c0 / blk];
            ScaleCode sc;
            if (fmt == Format::nvfp4) {
              sc = encode_nvfp4_scale(code);
            } else {
              int b = code + rs.mx_offset;
              FP4MOE_CHECK(b >= 1 && b <= 254,
                           "MXFP4 block scales of one matrix span more than 2^253; not supported");
              sc.byte = uint8_t(b);
            }
            byte = sc.byte;
            for (int c = 0; c < 16; ++c) {
              uint8_t v = nibble(*rs.m, rs.row, c0 + c);
              if (sc.zero) v = 0;
              if (sc.flip) v ^= 0x8;
              nib[h][c] = v;
            }
          }
          st[lane_scale_offset(fmt, lane) + h] = byte;  // MXFP4: lanes 2b and 2b + 1 write the same byte
        }
        for (int j = 0; j < 4; ++j) {
          // Pair p: (row, columns) = p0 (g, 4j+0/1), p1 (g+8, 4j+0/1), p2 (g, 4j+2/3), p3 (g+8, 4j+2/3).
          uint32_t w = 0;
          for (int p = 0; p < 4; ++p) {
            const int h = p & 1, col = 4 * j + 2 * (p >> 1);
            w |= place_pair(p, nib[h][col], nib[h][col + 1]);
          }
          std::memcpy(wt + lane * 16 + j * 4, &w, 4);
        }
      }
    }
  }
}

float epilogue_factor(const QuantizedMatrix& m, int mx_offset) {
  if (m.format == Format::nvfp4) return m.global_scale * 128.0f;  // undo S = scale * 2^119
  return std::ldexp(1.0f, 126 - mx_offset);
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
  out.layout = L;
  out.bytes.assign(size_t(L.total_bytes), 0);
  uint8_t* base = out.bytes.data();
  const int I = p.intermediate, H = p.hidden;

  auto pack_expert = [&](int e) {
    const ExpertWeights& x = w.experts[size_t(e)];
    const bool mx = p.format == Format::mxfp4;
    const int off_gate = (mx && p.gated()) ? mxfp4_offset(x.gate) : 0;
    const int off_up = mx ? mxfp4_offset(x.up) : 0;
    const int off_down = mx ? mxfp4_offset(x.down) : 0;
    auto row13 = [&](int pr) -> RowSource {
      const int mt = pr / 16, r = pr % 16;
      int i;
      bool is_gate;
      if (p.gated()) {
        i = 16 * (mt / 2) + 8 * (mt % 2) + (r % 8);
        is_gate = r < 8;
      } else {
        i = pr;
        is_gate = false;
      }
      if (i >= I) return {nullptr, 0, 0};
      return is_gate ? RowSource{&x.gate, i, off_gate} : RowSource{&x.up, i, off_up};
    };
    auto row2 = [&](int pr) -> RowSource {
      if (pr >= H) return {nullptr, 0, 0};
      return {&x.down, pr, off_down};
    };
    pack_matrix(L.m_tiles13, L.k_tiles13, H, p.format, row13,
                base + L.w13_off + e * L.w13_expert_bytes(), base + L.s13_off + e * L.s13_expert_bytes());
    pack_matrix(L.m_tiles2, L.k_tiles2, I, p.format, row2,
                base + L.w2_off + e * L.w2_expert_bytes(), base + L.s2_off + e * L.s2_expert_bytes());
    MatrixScales ms{};
    ms.gate = p.gated() ? epilogue_factor(x.gate, off_gate) : 0.0f;
    ms.up = epilogue_factor(x.up, off_up);
    ms.down = epilogue_factor(x.down, off_down);
    ms.in13 = x.input_scale13;
    ms.in2 = x.input_scale2;
    std::memcpy(base + L.scales_off + e * int64_t(sizeof(MatrixScales)), &ms, sizeof ms);
    if (p.has_bias) {
      float* b13 = reinterpret_cast<float*>(base + L.b13_off) + e * L.b13_expert_floats();
      const int half = 16 * L.i_blocks;
      if (p.gated()) std::copy(x.gate_bias.begin(), x.gate_bias.end(), b13);
      std::copy(x.up_bias.begin(), x.up_bias.end(), b13 + half);
      float* b2 = reinterpret_cast<float*>(base + L.b2_off) + int64_t(e) * H;
      std::copy(x.down_bias.begin(), x.down_bias.end(), b2);
    }
  };

  const int nthreads = std::max(1, std::min<int>(E, int(std::thread::hardware_concurrency())));
  std::vector<std::thread> pool;
  std::vector<std::exception_ptr> errors(static_cast<size_t>(nthreads));
  for (int t = 0; t < nthreads; ++t) {
    pool.emplace_back([&, t] {
      try {
        for (int e = t; e < E; e += nthreads) pack_expert(e);
      } catch (...) {
        errors[size_t(t)] = std::current_exception();
      }
    });
  }
  for (auto& th : pool) th.join();
  for (auto& err : errors)
    if (err) std::rethrow_exception(err);
  return out;
}

}  // namespace fp4moe
