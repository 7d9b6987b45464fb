// prepack_device: checkpoint-layout tensors in device memory -> DeviceWeights, with the per-tile math
// of api/pack_tile.h (the host prepack's, so the bytes are the same).
//
// Three launches on the caller's stream: (1) a scan of every block scale (NaN codes, E8M0 range) per
// (expert, matrix), read back so the host reports the first bad scale exactly as the host prepack
// does; (2) the packing, one warp per 512-byte tile (each lane reads 8 bytes of two rows and writes its
// 16 bytes, so reads use whole 32-byte sectors and writes are contiguous); (3) the biases. The
// epilogue factors are computed on the host from the scan and copied in.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "api/pack_tile.h"
#include "api/prepack_common.h"
#include "common/cuda_check.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/prepack_device.h"

namespace fp4moe {
namespace {

// A logical matrix (gate, up or down of one expert): physical row of logical row i is
// row_off + i * row_step of the tensor at `data` (fused gate_up tensors map both halves).
struct MatDesc {
  const uint8_t* data;
  const uint8_t* scales;
  int row_step, row_off;
};

struct BiasDesc {
  const void* data;
  int bf16, row_step, row_off;
};

struct DevStats {
  unsigned long long first_nan;  // ULLONG_MAX: none
  unsigned min_code, max_code;
};

struct Geometry {
  int E, H, I;
  Format format;
  bool gated, swizzled;
};

__device__ __forceinline__ int64_t scale_index(const Geometry& g, int64_t prow, int64_t block, int64_t kcols) {
  if (!g.swizzled) return prow * kcols + block;
  const int64_t kt = (kcols + 3) / 4;
  return (prow / 128) * kt * 512 + (block / 4) * 512 + (prow % 32) * 16 + ((prow % 128) / 32) * 4 + block % 4;
}

__device__ __forceinline__ bool is_nan_code(Format f, unsigned c) {
  return f == Format::nvfp4 ? (c & 0x7F) == 0x7F : c == 0xFF;
}

// Kernel 1: block = (matrix m of 3E); threads stride over its rows x blocks scale codes.
__global__ void scan_scales_kernel(Geometry g, const MatDesc* mats, DevStats* stats) {
  const int m = blockIdx.x;
  const int kind = m % 3;
  if (kind == pack::kGate && !g.gated) return;
  const MatDesc d = mats[m];
  const int64_t rows = kind == pack::kDown ? g.H : g.I;
  const int64_t K = kind == pack::kDown ? g.I : g.H;
  const int64_t kcols = K / (g.format == Format::nvfp4 ? 16 : 32);
  const int64_t n = rows * kcols;
  unsigned long long first = ULLONG_MAX;
  unsigned mn = 255, mx = 0;
  for (int64_t idx = threadIdx.x; idx < n; idx += blockDim.x) {
    const int64_t r = idx / kcols, b = idx % kcols;
    const unsigned c = d.scales[scale_index(g, d.row_off + r * d.row_step, b, kcols)];
    if (is_nan_code(g.format, c)) {
      if (first == ULLONG_MAX) first = (unsigned long long)idx;  // strided: the thread's first is its least
    } else {
      mn = min(mn, c);
      mx = max(mx, c);
    }
  }
  if (first != ULLONG_MAX) atomicMin(&stats[m].first_nan, first);
  atomicMin(&stats[m].min_code, mn);
  atomicMax(&stats[m].max_code, mx);
}

// Kernel 2: a warp per tile; tiles of expert e: W13 (m_tiles13 x k_tiles13) then W2.
__global__ void pack_kernel(Geometry g, PackedLayout L, const MatDesc* mats, const int* offsets, uint8_t* out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = int64_t(gridDim.x) * (blockDim.x / 32);
  const int64_t t13 = int64_t(L.m_tiles13) * L.k_tiles13, t2 = int64_t(L.m_tiles2) * L.k_tiles2;
  const int64_t total = int64_t(g.E) * (t13 + t2);
  const int blk = g.format == Format::nvfp4 ? 16 : 32;
  const int stile = scale_tile_bytes(g.format);
  const int gl = lane / 4, q = lane % 4;
  for (int64_t tile = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32; tile < total; tile += warps) {
    const int e = int(tile / (t13 + t2));
    const int64_t r = tile % (t13 + t2);
    const bool w13 = r < t13;
    const int k_tiles = w13 ? L.k_tiles13 : L.k_tiles2;
    const int64_t local = w13 ? r : r - t13;
    const int mt = int(local / k_tiles), kt = int(local % k_tiles);
    const int64_t K = w13 ? g.H : g.I;
    uint8_t* wt = out + (w13 ? L.w13_off + e * L.w13_expert_bytes() : L.w2_off + e * L.w2_expert_bytes()) +
                  local * kTileBytes;
    uint8_t* st = out + (w13 ? L.s13_off + e * L.s13_expert_bytes() : L.s2_off + e * L.s2_expert_bytes()) +
                  local * stile;
    const int64_t c0 = int64_t(kt) * kTileCols + 16 * q;
    alignas(8) uint8_t bytes[2][8];
    for (int h = 0; h < 2; ++h) {
      const int pr = mt * 16 + gl + 8 * h;
      int kind = pack::kDown, row = pr;
      if (w13) {
        bool is_gate = false;
        row = pack::w13_source_row(pr, g.gated, g.I, &is_gate);
        kind = is_gate ? pack::kGate : pack::kUp;
      } else if (pr >= g.H) {
        row = -1;
      }
      uint8_t sbyte = 0;
      *reinterpret_cast<uint2*>(bytes[h]) = make_uint2(0, 0);
      if (row >= 0 && c0 < K) {
        const MatDesc& d = mats[e * 3 + kind];
        const int64_t prow = d.row_off + int64_t(row) * d.row_step;
        const uint8_t code = d.scales[scale_index(g, prow, c0 / blk, K / blk)];
        pack::ScaleCode sc;
        if (g.format == Format::nvfp4) {
          sc = pack::encode_nvfp4_scale(code);
        } else {
          sc.byte = uint8_t(code + offsets[e * 3 + kind]);
        }
        sbyte = sc.byte;
        *reinterpret_cast<uint2*>(bytes[h]) = __ldg(reinterpret_cast<const uint2*>(d.data + prow * (K / 2) + c0 / 2));
        pack::fix_bytes(sc, bytes[h]);
      }
      st[lane_scale_offset(g.format, lane) + h] = sbyte;  // MXFP4: lanes 2b and 2b + 1 write the same byte
    }
    uint4 words;
    auto place = [](int p, uint8_t b) { return pack::place_pair(p, b); };
    words.x = pack::lane_word(bytes[0], bytes[1], 0, place);
    words.y = pack::lane_word(bytes[0], bytes[1], 1, place);
    words.z = pack::lane_word(bytes[0], bytes[1], 2, place);
    words.w = pack::lane_word(bytes[0], bytes[1], 3, place);
    *reinterpret_cast<uint4*>(wt + lane * 16) = words;
  }
}

__device__ __forceinline__ float bias_at(const BiasDesc& b, int64_t i) {
  const int64_t j = b.row_off + i * b.row_step;
  return b.bf16 ? __bfloat162float(static_cast<const __nv_bfloat16*>(b.data)[j]) : static_cast<const float*>(b.data)[j];
}

// Kernel 3: blockIdx.y = expert; b13 [2][16 * i_blocks] (gate, up; the tail past I stays 0), b2 [H].
__global__ void bias_kernel(Geometry g, PackedLayout L, const BiasDesc* bias, uint8_t* out) {
  const int e = blockIdx.y;
  float* b13 = reinterpret_cast<float*>(out + L.b13_off) + e * L.b13_expert_floats();
  float* b2 = reinterpret_cast<float*>(out + L.b2_off) + int64_t(e) * g.H;
  const int half = 16 * L.i_blocks;
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < g.I || i < g.H; i += gridDim.x * blockDim.x) {
    if (i < g.I) {
      if (g.gated) b13[i] = bias_at(bias[e * 3 + pack::kGate], i);
      b13[half + i] = bias_at(bias[e * 3 + pack::kUp], i);
    }
    if (i < g.H) b2[i] = bias_at(bias[e * 3 + pack::kDown], i);
  }
}

// Device memory freed at scope exit (the small descriptor and statistics buffers).
template <class T>
struct Scratch {
  T* p = nullptr;
  explicit Scratch(size_t n) { FP4MOE_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T))); }
  ~Scratch() { cudaFree(p); }
  Scratch(const Scratch&) = delete;
};

void check_matrix(const DeviceFp4Matrix& m, const char* name, int E, const MoeProblem& p,
                  ScaleDirection dir, bool present) {
  if (!present) {
    FP4MOE_CHECK(m.data.empty() && m.scales.empty() && m.global_scale.empty(),
                 name << " must be empty for this layout and activation (got " << m.data.size() << " experts)");
    return;
  }
  FP4MOE_CHECK(int(m.data.size()) == E && int(m.scales.size()) == E,
               name << " needs data and scales of the " << E << " local experts, got " << m.data.size()
                    << " and " << m.scales.size());
  for (int e = 0; e < E; ++e) {
    const int ge = p.local_expert_offset + e;
    FP4MOE_CHECK(m.data[size_t(e)] != nullptr && m.scales[size_t(e)] != nullptr,
                 "expert " << ge << " " << name << ": null data or scales pointer");
    FP4MOE_CHECK(reinterpret_cast<uintptr_t>(m.data[size_t(e)]) % 8 == 0,
                 "expert " << ge << " " << name << ": data must be 8-byte aligned, got " << m.data[size_t(e)]);
  }
  if (p.format == Format::mxfp4) {
    FP4MOE_CHECK(m.global_scale.empty(), name << ": MXFP4 has no global scales; pass none");
    return;
  }
  FP4MOE_CHECK(int(m.global_scale.size()) == E,
               name << " needs the NVFP4 global scales of the " << E << " local experts, got " << m.global_scale.size());
  for (int e = 0; e < E; ++e) {
    const float gsc = m.global_scale[size_t(e)];
    FP4MOE_CHECK(std::isfinite(gsc) && gsc > 0.0f, "expert " << p.local_expert_offset + e << " " << name
                                                             << " global_scale must be a finite positive number, got "
                                                             << gsc);
    const float dec = convert_global_scale(gsc, dir, ScaleDirection::decode);
    FP4MOE_CHECK(std::isfinite(dec) && dec > 0.0f, "expert " << p.local_expert_offset + e << " " << name
                                                             << " global_scale " << gsc
                                                             << " has no finite decode-direction value");
  }
}

void check_bias(const DeviceBias& b, const char* name, int E, bool present) {
  if (!present) {
    FP4MOE_CHECK(b.data.empty(), name << " must be empty (the problem has has_bias = false or the layout has no such bias)");
    return;
  }
  FP4MOE_CHECK(int(b.data.size()) == E, name << " needs the " << E << " local experts, got " << b.data.size());
  for (int e = 0; e < E; ++e) FP4MOE_CHECK(b.data[size_t(e)] != nullptr, name << ": null pointer for local expert " << e);
}

}  // namespace

DeviceWeights::DeviceWeights(const PackedLayout& layout) : layout_(layout) {
  FP4MOE_CHECK(layout.total_bytes > 0, "DeviceWeights: empty layout");
  FP4MOE_CUDA_CHECK(cudaMalloc(&data_, size_t(layout.total_bytes)));
}

DeviceWeights prepack_device(const MoeProblem& p, const DeviceCheckpointLayer& w, cudaStream_t stream) {
  p.validate();
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "prepack_device needs a Hopper GPU: " << why);
  const int E = p.local_experts(), H = p.hidden, I = p.intermediate;
  const bool fused = w.gate_up_layout != GateUpLayout::separate;
  FP4MOE_CHECK(!fused || p.gated(), "a fused gate_up tensor needs a gated activation, not "
                                        << to_string(p.activation.kind));
  FP4MOE_CHECK(w.scale_layout == ScaleLayout::linear || p.format == Format::nvfp4,
               "the swizzled_128x4 scale layout exists only for nvfp4 scales");
  check_matrix(w.gate, "gate", E, p, w.direction, !fused && p.gated());
  check_matrix(w.up, "up", E, p, w.direction, !fused);
  check_matrix(w.gate_up, "gate_up", E, p, w.direction, fused);
  check_matrix(w.down, "down", E, p, w.direction, true);
  check_bias(w.gate_bias, "gate_bias", E, p.has_bias && !fused && p.gated());
  check_bias(w.up_bias, "up_bias", E, p.has_bias && !fused);
  check_bias(w.gate_up_bias, "gate_up_bias", E, p.has_bias && fused);
  check_bias(w.down_bias, "down_bias", E, p.has_bias);
  const bool w4a4 = p.input_mode == InputMode::w4a4;
  for (const auto* v : {&w.input_scale13, &w.input_scale2}) {
    const char* name = v == &w.input_scale13 ? "input_scale13" : "input_scale2";
    FP4MOE_CHECK(v->empty() || int(v->size()) == E, name << " needs the " << E << " local experts, got " << v->size());
    FP4MOE_CHECK(!w4a4 || !v->empty(), "W4A4 needs the activations' input scales: " << name << " of the " << E
                                                                                    << " local experts, decode direction");
    for (size_t e = 0; e < v->size() && w4a4; ++e)
      FP4MOE_CHECK(std::isfinite((*v)[e]) && (*v)[e] > 0, "expert " << p.local_expert_offset + int(e) << " " << name
                                                                    << " must be positive and finite for w4a4, got "
                                                                    << (*v)[e]);
  }

  const PackedLayout L = PackedLayout::make(H, I, E, p.format, p.gated(), p.has_bias);
  Geometry g{E, H, I, p.format, p.gated(), w.scale_layout == ScaleLayout::swizzled_128x4};

  // Descriptors of the 3E logical matrices and biases.
  std::vector<MatDesc> mats(size_t(E) * 3);
  std::vector<BiasDesc> biases(size_t(E) * 3);
  std::vector<std::array<float, 3>> global(size_t(E), {0.0f, 0.0f, 0.0f});
  for (int e = 0; e < E; ++e) {
    auto dec = [&](const DeviceFp4Matrix& m) {
      return p.format == Format::nvfp4 ? convert_global_scale(m.global_scale[size_t(e)], w.direction, ScaleDirection::decode)
                                       : 1.0f;
    };
    auto desc = [&](const DeviceFp4Matrix& m, int step, int off) {
      return MatDesc{static_cast<const uint8_t*>(m.data[size_t(e)]), static_cast<const uint8_t*>(m.scales[size_t(e)]),
                     step, off};
    };
    auto bdesc = [&](const DeviceBias& b, int step, int off) {
      if (b.data.empty()) return BiasDesc{nullptr, 0, 0, 0};
      return BiasDesc{b.data[size_t(e)], b.dtype == DType::bf16 ? 1 : 0, step, off};
    };
    if (fused) {
      const bool inter = w.gate_up_layout == GateUpLayout::interleaved;
      mats[size_t(e) * 3 + pack::kGate] = desc(w.gate_up, inter ? 2 : 1, 0);
      mats[size_t(e) * 3 + pack::kUp] = desc(w.gate_up, inter ? 2 : 1, inter ? 1 : I);
      biases[size_t(e) * 3 + pack::kGate] = bdesc(w.gate_up_bias, inter ? 2 : 1, 0);
      biases[size_t(e) * 3 + pack::kUp] = bdesc(w.gate_up_bias, inter ? 2 : 1, inter ? 1 : I);
      global[size_t(e)][pack::kGate] = global[size_t(e)][pack::kUp] = dec(w.gate_up);
    } else {
      if (p.gated()) {
        mats[size_t(e) * 3 + pack::kGate] = desc(w.gate, 1, 0);
        biases[size_t(e) * 3 + pack::kGate] = bdesc(w.gate_bias, 1, 0);
        global[size_t(e)][pack::kGate] = dec(w.gate);
      }
      mats[size_t(e) * 3 + pack::kUp] = desc(w.up, 1, 0);
      biases[size_t(e) * 3 + pack::kUp] = bdesc(w.up_bias, 1, 0);
      global[size_t(e)][pack::kUp] = dec(w.up);
    }
    mats[size_t(e) * 3 + pack::kDown] = desc(w.down, 1, 0);
    biases[size_t(e) * 3 + pack::kDown] = bdesc(w.down_bias, 1, 0);
    global[size_t(e)][pack::kDown] = dec(w.down);
  }

  Scratch<MatDesc> d_mats(mats.size());
  Scratch<BiasDesc> d_bias(biases.size());
  Scratch<DevStats> d_stats(mats.size());
  Scratch<int> d_offsets(mats.size());
  std::vector<DevStats> stats(mats.size(), DevStats{ULLONG_MAX, 255u, 0u});
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(d_mats.p, mats.data(), mats.size() * sizeof(MatDesc), cudaMemcpyHostToDevice, stream));
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(d_bias.p, biases.data(), biases.size() * sizeof(BiasDesc), cudaMemcpyHostToDevice, stream));
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(d_stats.p, stats.data(), stats.size() * sizeof(DevStats), cudaMemcpyHostToDevice, stream));
  scan_scales_kernel<<<unsigned(mats.size()), 256, 0, stream>>>(g, d_mats.p, d_stats.p);
  FP4MOE_CUDA_CHECK(cudaGetLastError());
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(stats.data(), d_stats.p, stats.size() * sizeof(DevStats), cudaMemcpyDeviceToHost, stream));
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));

  // The first bad scale in (expert, matrix, row, block) order, reported as the host prepack does.
  std::vector<int> offsets(mats.size(), 0);
  for (int e = 0; e < E; ++e)
    for (int kind = 0; kind < 3; ++kind) {
      if (kind == pack::kGate && !p.gated()) continue;
      const DevStats& d = stats[size_t(e) * 3 + kind];
      pack::ScaleStats s;
      const int64_t blocks = (kind == pack::kDown ? I : H) / block_size(p.format);
      if (d.first_nan != ULLONG_MAX) {
        s.first_nan = int64_t(d.first_nan);
        // The code itself, for the message (one byte from the device).
        const MatDesc& m = mats[size_t(e) * 3 + kind];
        const int64_t r = s.first_nan / blocks, b = s.first_nan % blocks, prow = m.row_off + r * m.row_step;
        const size_t at = w.scale_layout == ScaleLayout::linear ? size_t(prow * blocks + b)
                                                                : swizzled_128x4_offset(prow, b, blocks);
        FP4MOE_CUDA_CHECK(cudaMemcpy(&s.nan_code, m.scales + at, 1, cudaMemcpyDeviceToHost));
      }
      s.min_code = int(d.min_code);
      s.max_code = int(d.max_code);
      offsets[size_t(e) * 3 + kind] = pack::check_scales(p.format, s, p.local_expert_offset + e, kind, blocks);
    }

  DeviceWeights out(L);
  uint8_t* base = out.mutable_data();
  std::vector<MatrixScales> ms(static_cast<size_t>(E));
  for (int e = 0; e < E; ++e) {
    const float in13 = w.input_scale13.empty() ? 1.0f : w.input_scale13[size_t(e)];
    const float in2 = w.input_scale2.empty() ? 1.0f : w.input_scale2[size_t(e)];
    ms[size_t(e)] = pack::matrix_scales(p.format, p.gated(), global[size_t(e)].data(), &offsets[size_t(e) * 3], in13, in2);
  }
  FP4MOE_CUDA_CHECK(cudaMemsetAsync(base, 0, size_t(L.total_bytes), stream));  // padding, as the host's zeros
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(base + L.scales_off, ms.data(), ms.size() * sizeof(MatrixScales),
                                    cudaMemcpyHostToDevice, stream));
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(d_offsets.p, offsets.data(), offsets.size() * sizeof(int), cudaMemcpyHostToDevice, stream));
  int sms = 0, dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  FP4MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  const int64_t tiles = int64_t(E) * (int64_t(L.m_tiles13) * L.k_tiles13 + int64_t(L.m_tiles2) * L.k_tiles2);
  const int threads = 256;
  const int64_t want = (tiles + threads / 32 - 1) / (threads / 32);
  const unsigned blocks = unsigned(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(sms) * 16)));
  pack_kernel<<<blocks, threads, 0, stream>>>(g, L, d_mats.p, d_offsets.p, base);
  FP4MOE_CUDA_CHECK(cudaGetLastError());
  if (p.has_bias) {
    const int n = std::max(H, I);
    bias_kernel<<<dim3(unsigned((n + 255) / 256), unsigned(E)), 256, 0, stream>>>(g, L, d_bias.p, base);
    FP4MOE_CUDA_CHECK(cudaGetLastError());
  }
  // The scratch buffers and the host vectors above are read by the stream: wait before they go.
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  return out;
}

}  // namespace fp4moe
