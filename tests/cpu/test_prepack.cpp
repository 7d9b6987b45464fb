// The packed kernel layout, decoded on the host with the same bit formulas the kernels use
// (unpack_pair in include/fp4moe/layout.h, which kernels/common/fragments.cuh calls), must reproduce every weight of the standard layout exactly.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>

#include "api/pack_tile.h"
#include "fp4moe/fp4moe.h"

namespace fp4moe {
namespace {

float bf16_bits(uint32_t b) { return bf16_to_float(uint16_t(b)); }

// The kernels' pair decode (unpack_pair in layout.h, called by dequant_word); scale_bits mirrors scale_pairs<F>.
uint32_t pair_bits(uint32_t w, int p) { return unpack_pair(w, p); }
uint32_t scale_bits(uint8_t b, Format f) { return f == Format::nvfp4 ? (uint32_t(b) << 4) + 0x7300u : uint32_t(b) << 7; }

// Decodes one packed matrix of expert e into [m_tiles * 16, k_tiles * 64] values (before the
// per-matrix epilogue factor), in packed-row order.
std::vector<float> decode(const PackedWeights& pw, int64_t w_off, int64_t s_off, int m_tiles, int k_tiles) {
  const Format f = pw.layout.format;
  std::vector<float> out(size_t(m_tiles) * 16 * k_tiles * 64);
  const int64_t K = int64_t(k_tiles) * 64;
  for (int mt = 0; mt < m_tiles; ++mt)
    for (int kt = 0; kt < k_tiles; ++kt)
      for (int lane = 0; lane < 32; ++lane) {
        const int g = lane / 4, q = lane % 4;
        const uint8_t* wt = pw.bytes.data() + w_off + (int64_t(mt) * k_tiles + kt) * kTileBytes + lane * 16;
        const uint8_t* st = pw.bytes.data() + s_off + (int64_t(mt) * k_tiles + kt) * scale_tile_bytes(f) +
                             lane_scale_offset(f, lane);
        const float s_lo = bf16_bits(scale_bits(st[0], f)), s_hi = bf16_bits(scale_bits(st[1], f));
        for (int j = 0; j < 4; ++j) {
          uint32_t w;
          std::memcpy(&w, wt + 4 * j, 4);
          for (int p = 0; p < 4; ++p) {
            const uint32_t bits = pair_bits(w, p);
            const int row = mt * 16 + g + 8 * (p & 1);
            const int64_t col = int64_t(kt) * 64 + 16 * q + 4 * j + 2 * (p >> 1);
            const float s = (p & 1) ? s_hi : s_lo;
            out[size_t(row * K + col)] = bf16_bits(bits & 0xffff) * s;
            out[size_t(row * K + col + 1)] = bf16_bits(bits >> 16) * s;
          }
        }
      }
  return out;
}

void check_layer(const MoeProblem& p, uint64_t seed) {
  const MoeWeights w = random_weights(p, seed);
  const PackedWeights pw = prepack(p, w);
  const PackedLayout& L = pw.layout;
  const int I = p.intermediate, H = p.hidden;
  for (int e = 0; e < p.local_experts(); ++e) {
    MatrixScales ms;
    std::memcpy(&ms, pw.bytes.data() + L.scales_off + e * int64_t(sizeof ms), sizeof ms);
    const ExpertWeights& x = w.experts[size_t(e)];
    const auto w13 = decode(pw, L.w13_off + e * L.w13_expert_bytes(), L.s13_off + e * L.s13_expert_bytes(),
                            L.m_tiles13, L.k_tiles13);
    const int64_t K13 = int64_t(L.k_tiles13) * 64;
    for (int pr = 0; pr < L.m_tiles13 * 16; ++pr) {
      const int mt = pr / 16, r = pr % 16;
      const bool gate = p.gated() && r < 8;
      const int i = p.gated() ? 16 * (mt / 2) + 8 * (mt % 2) + r % 8 : pr;
      for (int64_t c = 0; c < K13; ++c) {
        const float got = w13[size_t(pr * K13 + c)] * (gate ? ms.gate : ms.up);
        const float want = (i < I && c < H) ? (gate ? x.gate : x.up).element(i, c) : 0.0f;
        ASSERT_EQ(got, want) << "expert " << e << " W13 packed row " << pr << " (i " << i << ") col " << c;
      }
    }
    const auto w2 = decode(pw, L.w2_off + e * L.w2_expert_bytes(), L.s2_off + e * L.s2_expert_bytes(),
                           L.m_tiles2, L.k_tiles2);
    const int64_t K2 = int64_t(L.k_tiles2) * 64;
    for (int pr = 0; pr < L.m_tiles2 * 16; ++pr)
      for (int64_t c = 0; c < K2; ++c) {
        const float got = w2[size_t(pr * K2 + c)] * ms.down;
        const float want = (pr < H && c < I) ? x.down.element(pr, c) : 0.0f;
        ASSERT_EQ(got, want) << "expert " << e << " W2 row " << pr << " col " << c;
      }
  }
}

MoeProblem small(Format f, Activation a) {
  MoeProblem p;
  p.tokens = 1;
  p.hidden = 320;
  p.intermediate = 96;
  p.num_experts = 3;
  p.top_k = 2;
  p.format = f;
  p.activation.kind = a;
  return p;
}

TEST(Prepack, NvfpGatedDecodesExactly) { check_layer(small(Format::nvfp4, Activation::swiglu), 1); }
TEST(Prepack, NvfpNonGatedDecodesExactly) { check_layer(small(Format::nvfp4, Activation::relu2), 2); }
TEST(Prepack, MxfpGatedDecodesExactly) { check_layer(small(Format::mxfp4, Activation::swiglu), 3); }

TEST(Prepack, NegativeAndZeroScalesAreFoldedIntoNibbles) {
  MoeProblem p = small(Format::nvfp4, Activation::swiglu);
  MoeWeights w = random_weights(p, 4);
  w.experts[0].gate.scales[0] = 0x00;                                // zero block
  w.experts[0].gate.scales[1] = uint8_t(w.experts[0].gate.scales[1] | 0x80);  // negative scale
  const PackedWeights pw = prepack(p, w);
  const PackedLayout& L = pw.layout;
  MatrixScales ms;
  std::memcpy(&ms, pw.bytes.data() + L.scales_off, sizeof ms);
  const auto w13 = decode(pw, L.w13_off, L.s13_off, L.m_tiles13, L.k_tiles13);
  for (int c = 0; c < 32; ++c)  // gate row 0 is packed row 0; blocks 0 and 1
    ASSERT_EQ(w13[size_t(c)] * ms.gate, w.experts[0].gate.element(0, c)) << "col " << c;
}

std::string error_of(const MoeProblem& p, const MoeWeights& w) {
  try {
    prepack(p, w);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(Prepack, RejectsNaNScalesNamingTheFirst) {
  MoeProblem p = small(Format::nvfp4, Activation::swiglu);
  p.num_experts = 6;
  p.local_expert_offset = 2;
  p.num_local_experts = 3;
  MoeWeights w = random_weights(p, 5);
  const int64_t kc = w.experts[1].down.scale_cols();
  w.experts[1].down.scales[size_t(2 * kc + 1)] = 0x7F;  // local expert 1 = expert 3, row 2, block 1
  w.experts[1].down.scales[size_t(5 * kc)] = 0xFF;     // later in the same matrix
  w.experts[2].gate.scales[0] = 0x7F;                  // a later expert
  const std::string msg = error_of(p, w);
  EXPECT_NE(msg.find("expert 3 down: block scale of row 2, block 1 (columns 16..31) is NaN (E4M3 code 0x7F)"), std::string::npos)
      << msg;
  MoeProblem m = small(Format::mxfp4, Activation::swiglu);
  MoeWeights mw = random_weights(m, 6);
  mw.experts[0].up.scales[1] = 0xFF;
  EXPECT_NE(error_of(m, mw).find("expert 0 up: block scale of row 0, block 1 (columns 32..63) is NaN (E8M0 code 0xFF)"),
            std::string::npos)
      << error_of(m, mw);
  mw = random_weights(m, 6);
  mw.experts[0].gate.scales[0] = 0;
  mw.experts[0].gate.scales[1] = 254;
  EXPECT_NE(error_of(m, mw).find("expert 0 gate: MXFP4 block scales span 2^-127 .. 2^127"), std::string::npos)
      << error_of(m, mw);
}

// The integer re-encoding of api/pack_tile.h against its definition: S = e4m3 * 2^119 as bf16,
// byte = ((exponent - 230) << 3) | mantissa3, for every code.
TEST(Prepack, Nvfp4ScaleReencodingMatchesItsDefinition) {
  for (int c = 0; c < 256; ++c) {
    const pack::ScaleCode sc = pack::encode_nvfp4_scale(uint8_t(c));
    const int mag = c & 0x7F;
    EXPECT_EQ(sc.nan, mag == 0x7F) << c;
    EXPECT_EQ(sc.flip, (c & 0x80) != 0) << c;
    EXPECT_EQ(sc.zero, mag == 0) << c;
    if (mag == 0 || mag == 0x7F) continue;
    const uint16_t bits = float_to_bf16(std::ldexp(e4m3_to_float(uint8_t(mag)), 119));
    ASSERT_EQ(bits & 0xF, 0) << c;
    EXPECT_EQ(int(sc.byte), (((bits >> 7) - 230) << 3) | ((bits >> 4) & 7)) << "code " << c;
    // What the kernel multiplies by (bf16 bits (byte << 4) + 0x7300) is the scale times 2^119.
    EXPECT_EQ(bf16_to_float(uint16_t((sc.byte << 4) + 0x7300)), std::ldexp(e4m3_to_float(uint8_t(mag)), 119)) << c;
  }
}

// place_pair puts every nibble bit where the kernels' decode finds it: basis word (p, n) decodes to
// bf16 bit {6, 7, 8, 15}[n % 4] (+16 for the high nibble) of pair p and to nothing in the other pairs.
TEST(Prepack, PairPlacementFollowsTheLayout) {
  const int bf16_bit[4] = {6, 7, 8, 15};  // nibble bits m, e0, e1, sign
  for (int p = 0; p < 4; ++p)
    for (int n = 0; n < 8; ++n) {
      const uint32_t w = pack::place_pair(p, uint8_t(1u << n));
      for (int d = 0; d < 4; ++d) {
        const uint32_t want = d == p ? 1u << (bf16_bit[n % 4] + (n >= 4 ? 16 : 0)) : 0u;
        EXPECT_EQ(pair_bits(w, d), want) << "pair " << p << " nibble bit " << n << " decoded as pair " << d;
      }
    }
}

// Every combination of four checkpoint bytes survives packing into a word and decoding (random words,
// plus every byte value in every pair position).
TEST(Prepack, PackedWordsDecodeToTheirBytes) {
  std::mt19937 rng(20261204u);
  auto nibble_bits = [](uint8_t b) {  // the bf16x2 bits a checkpoint byte must decode to
    uint32_t v = 0;
    const int bf16_bit[4] = {6, 7, 8, 15};
    for (int n = 0; n < 8; ++n)
      if ((b >> n) & 1) v |= 1u << (bf16_bit[n % 4] + (n >= 4 ? 16 : 0));
    return v;
  };
  auto check = [&](const uint8_t lo[8], const uint8_t hi[8]) {
    for (int j = 0; j < 4; ++j) {
      const uint32_t w = pack::lane_word(lo, hi, j, [](int p, uint8_t b) { return pack::place_pair(p, b); });
      const uint8_t src[4] = {lo[2 * j], hi[2 * j], lo[2 * j + 1], hi[2 * j + 1]};
      for (int p = 0; p < 4; ++p) ASSERT_EQ(pair_bits(w, p), nibble_bits(src[p])) << "word " << j << " pair " << p;
    }
  };
  uint8_t lo[8], hi[8];
  for (int it = 0; it < 20000; ++it) {
    for (int i = 0; i < 8; ++i) { lo[i] = uint8_t(rng()); hi[i] = uint8_t(rng()); }
    check(lo, hi);
  }
  for (int v = 0; v < 256; ++v)
    for (int pos = 0; pos < 16; ++pos) {
      for (int i = 0; i < 8; ++i) lo[i] = hi[i] = uint8_t(rng());
      (pos < 8 ? lo : hi)[pos % 8] = uint8_t(v);
      check(lo, hi);
    }
}

}  // namespace
}  // namespace fp4moe
