// `fp4moe bench`: the benchmark instrument of BENCH.md, for both kernel families.
//
// Per (preset, T): weights rotate among device copies of the layer (each call of a copy routes its own
// random logits) so that the bytes touched between two uses of one copy are at least 4x the L2 size:
// copies for a row = ceil(4 x L2 / bytes one call touches), at least 1, at most the copies allocated
// for the preset (sized for its smallest T and by free memory). Once one call touches 4x L2 or more,
// one copy is used: the call itself streams that much other weight data through L2 between two reads
// of the same byte by consecutive calls. The calls are captured back to back in one CUDA graph whose
// replays are timed with events. In the same run: the byte floor (the same graph structure over a
// plain 16-byte-per-thread read kernel of the touched byte count) and the bf16 dense tensor rate (a
// cuBLAS bf16 GEMM, 8192^3 by default), from which the compute floor = FLOPs / rate, the roofline =
// max of both floors, and layer time / roofline. Correctness: the CPU reference on the first and the
// last --check-tokens tokens of copy 0 (a token's output does not depend on the rest of the batch;
// tests/gpu checks that bitwise), the rest of the output checked for NaN (it is poisoned first).
// --tactic runs a given tactic through run(..., plan); --crossover times both at the same T.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <sstream>
#include <thread>

#include "commands.h"
#include "common/cuda_check.h"
#include "fp4moe/fp4moe.h"
#include "numbers.h"

namespace fp4moe::cli {
namespace {

__global__ void read_floor_kernel(const uint4* __restrict__ p, size_t n, unsigned* sink) {
  uint32_t acc = 0;
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p + i));
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads alive
}

// Random bf16 in [-1, 1) for the GEMM operands (data-dependent power: never time zeros).
__global__ void fill_bf16_kernel(uint16_t* p, size_t n, uint64_t seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    uint64_t z = (i + seed) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z ^= z >> 27;
    const float u = float(uint32_t(z >> 40)) * (2.0f / 16777216.0f) - 1.0f;
    p[i] = uint16_t(__float_as_uint(u) >> 16);
  }
}

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

int host_threads() { return std::max(1, int(std::thread::hardware_concurrency())); }

// n standard normal values (Box-Muller over splitmix), written by out(i, v); the values depend on
// the seed only, not on the thread count (each block of 64 Ki values has its own stream).
template <class Out>
void parallel_normal(size_t n, uint64_t seed, Out out) {
  constexpr size_t kBlock = size_t(1) << 16;
  const size_t blocks = (n + kBlock - 1) / kBlock;
  const int nt = int(std::min<size_t>(size_t(host_threads()), std::max<size_t>(blocks, 1)));
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&, t] {
      for (size_t b = size_t(t); b < blocks; b += size_t(nt)) {
        uint64_t s = seed * 0x2545F4914F6CDD1Dull + b;
        for (size_t i = b * kBlock; i < std::min(n, (b + 1) * kBlock); i += 2) {
          const double u1 = (double(splitmix(s) >> 11) + 1.0) * 0x1.0p-53, u2 = double(splitmix(s) >> 11) * 0x1.0p-53;
          const double r = std::sqrt(-2.0 * std::log(u1));
          out(i, float(r * std::cos(6.283185307179586 * u2)));
          if (i + 1 < n) out(i + 1, float(r * std::sin(6.283185307179586 * u2)));
        }
      }
    });
  for (auto& th : pool) th.join();
}

// Random FP4 bytes and plausible scale codes: benchmark weights need to be non-trivial, not trained.
QuantizedMatrix random_fp4(Format f, int64_t rows, int64_t cols, uint64_t seed) {
  QuantizedMatrix m;
  m.format = f;
  m.rows = rows;
  m.cols = cols;
  m.data.resize(size_t(rows * cols / 2));
  m.scales.resize(size_t(rows * (cols / block_size(f))));
  uint64_t s = seed;
  for (size_t i = 0; i < m.data.size(); i += 8) {
    uint64_t r = splitmix(s);
    std::memcpy(m.data.data() + i, &r, std::min<size_t>(8, m.data.size() - i));
  }
  for (auto& c : m.scales) {
    uint64_t r = splitmix(s);
    // nvfp4: E4M3 in [2^-3, 2^3); mxfp4: E8M0 in [2^-9, 2^-5)
    c = f == Format::nvfp4 ? uint8_t(((4 + r % 6) << 3) | ((r >> 8) & 7)) : uint8_t(118 + r % 4);
  }
  m.global_scale = f == Format::nvfp4 ? 0.01f : 1.0f;
  return m;
}

MoeWeights random_layer(const MoeProblem& p, uint64_t seed) {
  MoeWeights w;
  w.format = p.format;
  w.hidden = p.hidden;
  w.intermediate = p.intermediate;
  const int E = p.local_experts();
  w.experts.resize(size_t(E));
  const int nt = host_threads();
  std::vector<std::thread> pool;
  for (int t = 0; t < nt; ++t)
    pool.emplace_back([&, t] {
      for (int e = t; e < E; e += nt) {
        ExpertWeights& x = w.experts[size_t(e)];
        const uint64_t s = seed * 1000003ull + uint64_t(e) * 7;
        if (p.gated()) x.gate = random_fp4(p.format, p.intermediate, p.hidden, s + 1);
        x.up = random_fp4(p.format, p.intermediate, p.hidden, s + 2);
        x.down = random_fp4(p.format, p.hidden, p.intermediate, s + 3);
        if (p.gated() && p.format == Format::nvfp4) x.gate.global_scale *= 1.5f;  // gate and up differ
        if (p.has_bias) {
          std::mt19937 rng{static_cast<uint32_t>(s)};
          std::normal_distribution<float> nd(0.0f, 0.1f);
          if (p.gated()) { x.gate_bias.resize(size_t(p.intermediate)); for (auto& v : x.gate_bias) v = nd(rng); }
          x.up_bias.resize(size_t(p.intermediate));
          for (auto& v : x.up_bias) v = nd(rng);
          x.down_bias.resize(size_t(p.hidden));
          for (auto& v : x.down_bias) v = nd(rng);
        }
      }
    });
  for (auto& th : pool) th.join();
  return w;
}

std::vector<float> make_logits(const MoeProblem& p, const std::string& routing, uint64_t seed) {
  std::vector<float> l(size_t(p.tokens) * p.num_experts);
  parallel_normal(l.size(), seed, [&](size_t i, float v) { l[i] = v; });
  const int E = p.num_experts, k = p.top_k;
  if (routing == "balanced") {
    // Token t prefers experts (t * k + j) mod E (offset per copy): distinct experts as long as possible.
    const int off = int(seed % uint64_t(E));
    for (int64_t t = 0; t < p.tokens; ++t)
      for (int j = 0; j < k; ++j) l[size_t(t * E + (off + t * k + j) % E)] += 20.0f - j;
  } else if (routing == "skewed") {
    const int hot = int(seed % uint64_t(E));
    for (int64_t t = 0; t < p.tokens; ++t) l[size_t(t * E + hot)] += 20.0f;
  } else if (routing != "uniform") {
    FP4MOE_FAIL("unknown --routing '" << routing << "' (uniform, balanced, skewed)");
  }
  return l;
}

std::vector<uint16_t> make_x(const MoeProblem& p, uint64_t seed) {
  std::vector<uint16_t> x(size_t(p.tokens) * p.hidden);
  parallel_normal(x.size(), seed, [&](size_t i, float v) { x[i] = float_to_bf16(v); });
  return x;
}

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  Dev() = default;
  explicit Dev(size_t count) : n(count) { FP4MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(1, count) * sizeof(T))); }
  Dev(Dev&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  Dev& operator=(Dev&& o) noexcept {
    if (this != &o) {
      if (p) cudaFree(p);
      p = o.p;
      n = o.n;
      o.p = nullptr;
    }
    return *this;
  }
  ~Dev() { if (p) cudaFree(p); }
  void upload(const std::vector<T>& h) { FP4MOE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
};

struct Timing {
  double median = 0, min = 0, max = 0;
};

Timing summarize(std::vector<double> t) {
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

// Replays `graph` `reps` times; per-call times (replay time / calls_per_replay) in microseconds.
Timing time_graph(cudaGraphExec_t exec, cudaStream_t stream, int reps, int calls_per_replay) {
  for (int i = 0; i < 5; ++i) FP4MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
  std::vector<cudaEvent_t> ev(size_t(reps) + 1);
  for (auto& e : ev) FP4MOE_CUDA_CHECK(cudaEventCreate(&e));
  FP4MOE_CUDA_CHECK(cudaEventRecord(ev[0], stream));
  for (int i = 0; i < reps; ++i) {
    FP4MOE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    FP4MOE_CUDA_CHECK(cudaEventRecord(ev[size_t(i) + 1], stream));
  }
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
  std::vector<double> t(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i) {
    float ms = 0;
    FP4MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, ev[size_t(i)], ev[size_t(i) + 1]));
    t[size_t(i)] = ms * 1000.0 / calls_per_replay;
  }
  for (auto& e : ev) cudaEventDestroy(e);
  return summarize(std::move(t));
}

// Captures `body` (stream work) into a graph, times its replays, destroys it.
template <class Body>
Timing time_captured(cudaStream_t stream, int reps, int calls, Body body) {
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  FP4MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  try {
    body();
  } catch (...) {
    cudaStreamEndCapture(stream, &graph);
    cudaGetLastError();
    throw;
  }
  FP4MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  FP4MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const Timing t = time_graph(exec, stream, reps, calls);
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  return t;
}

#define FP4MOE_CUBLAS_CHECK(expr)                                                              \
  do {                                                                                         \
    const cublasStatus_t st_ = (expr);                                                         \
    FP4MOE_CHECK(st_ == CUBLAS_STATUS_SUCCESS, #expr << " failed: cuBLAS status " << int(st_)); \
  } while (0)

// The bf16 dense tensor rate of this card in this run: a cuBLAS n x n x n bf16 GEMM (fp32
// accumulation, random operands), median of 20 timed calls after 5 warm-up calls. FLOP/s.
double measure_bf16_rate(int n, cudaStream_t stream) {
  const size_t elems = size_t(n) * n;
  Dev<uint16_t> a(elems), b(elems), c(elems);
  fill_bf16_kernel<<<1024, 256, 0, stream>>>(a.p, elems, 1);
  fill_bf16_kernel<<<1024, 256, 0, stream>>>(b.p, elems, 2);
  FP4MOE_CUDA_CHECK(cudaGetLastError());
  cublasHandle_t h;
  FP4MOE_CUBLAS_CHECK(cublasCreate(&h));
  std::vector<double> t;
  try {
    FP4MOE_CUBLAS_CHECK(cublasSetStream(h, stream));
    const float alpha = 1.0f, beta = 0.0f;
    auto gemm = [&] {
      FP4MOE_CUBLAS_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &alpha, a.p, CUDA_R_16BF, n, b.p,
                                       CUDA_R_16BF, n, &beta, c.p, CUDA_R_16BF, n, CUBLAS_COMPUTE_32F,
                                       CUBLAS_GEMM_DEFAULT));
    };
    for (int i = 0; i < 5; ++i) gemm();
    cudaEvent_t e0, e1;
    FP4MOE_CUDA_CHECK(cudaEventCreate(&e0));
    FP4MOE_CUDA_CHECK(cudaEventCreate(&e1));
    for (int i = 0; i < 20; ++i) {
      FP4MOE_CUDA_CHECK(cudaEventRecord(e0, stream));
      gemm();
      FP4MOE_CUDA_CHECK(cudaEventRecord(e1, stream));
      FP4MOE_CUDA_CHECK(cudaEventSynchronize(e1));
      float ms = 0;
      FP4MOE_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
      t.push_back(ms * 1e-3);
    }
    cudaEventDestroy(e0);
    cudaEventDestroy(e1);
  } catch (...) {
    cublasDestroy(h);
    throw;
  }
  cublasDestroy(h);
  return 2.0 * double(n) * n * n / summarize(t).median;
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

constexpr const char* kCrossoverTokens = "16,24,32,48,64,96,128,192,256";
constexpr double kL2Factor = 4.0;  // bytes touched between two uses of one copy, in multiples of L2

struct Options {
  std::string presets = "qwen3-30b-a3b";
  std::string tokens = "1,2,4,8,16,32,64";
  std::string routing = "uniform";
  std::string format = "nvfp4";
  std::string input_mode = "w4a16";
  std::string tactic = "auto";
  std::string csv, torch_csv;
  std::string reps_text = "100", check_tokens_text = "2", seed_text = "1", gemm_text = "8192";
  int reps = 100;
  int check_tokens = 2;
  int gemm_n = 8192;
  bool timeline = false;
  bool precomputed = false;
  bool crossover = false;
  bool batch_invariant = false;
  bool tokens_given = false;
  uint64_t seed = 1;
};

// What every row needs from the run.
struct Env {
  const Options& o;
  cudaDeviceProp prop;
  cudaStream_t stream;
  unsigned* sink;
  double bf16_rate;
  std::map<std::pair<std::string, int64_t>, double> torch_us;
};

// One preset's layer: host weights (for the reference) and its device copies.
struct Layer {
  std::string name;
  MoeProblem base;
  MoeWeights w;
  PackedLayout L;
  int64_t per_expert = 0;
  std::vector<DeviceWeights> dw;
};

// The inputs of one row: per copy x, out, logits and the host routing's top-k.
struct Row {
  MoeProblem p, prun;  // the problem, and the one the layer runs (precomputed: routing passed in)
  int copies = 0;
  std::string copies_note;
  std::vector<Dev<uint16_t>> xs, outs;
  std::vector<Dev<float>> logits;
  std::vector<Dev<int32_t>> ids;
  std::vector<Dev<float>> tw;
  std::vector<uint16_t> host_x0;
  std::vector<float> host_logits0, hbias;
  Dev<float> rbias;
  size_t ws_bytes = 0;
  Dev<uint8_t> ws;
  double experts = 0, bytes = 0, flops = 0;
  // The reference of copy 0's first and last check tokens.
  int64_t n_check = 0;
  std::vector<uint16_t> ref_first, ref_last;

  DeviceInputs inputs(int c, bool precomputed) const {
    DeviceInputs in;
    in.x = xs[size_t(c)].p;
    in.out = outs[size_t(c)].p;
    if (precomputed) {
      in.topk_ids = ids[size_t(c)].p;
      in.topk_weights = tw[size_t(c)].p;
    } else {
      in.logits = logits[size_t(c)].p;
      in.router_bias = p.routing.has_bias ? rbias.p : nullptr;
    }
    return in;
  }
};

// Host routing of one copy: top-k, distinct local experts touched, slots on local experts.
struct Routed {
  std::vector<int32_t> ids;
  std::vector<float> tw;
  int experts = 0;
  int64_t local_slots = 0;
};

Routed route_host(const MoeProblem& p, const std::vector<float>& logits, const std::vector<float>& hbias) {
  Routed r;
  r.ids.resize(size_t(p.tokens) * p.top_k);
  r.tw.resize(r.ids.size());
  route_reference(p, logits.data(), p.routing.has_bias ? hbias.data() : nullptr, r.ids.data(), r.tw.data());
  std::vector<char> seen(size_t(p.num_experts), 0);
  for (const int32_t id : r.ids) {
    if (id < p.local_expert_offset || id >= p.local_expert_offset + p.local_experts()) continue;
    ++r.local_slots;
    if (!seen[size_t(id)]) {
      seen[size_t(id)] = 1;
      ++r.experts;
    }
  }
  return r;
}

uint64_t logits_seed(const Options& o, int c, int64_t T) { return o.seed * 7919 + uint64_t(c) * 104729 + uint64_t(T); }

Layer make_layer(const Env& env, const std::string& name, int64_t smallest_T) {
  const Options& o = env.o;
  Layer l;
  l.name = name;
  l.base = find_preset(name).problem(1);
  if (o.format != "native") l.base.format = parse_format(o.format);
  l.base.input_mode = parse_input_mode(o.input_mode);
  if (l.base.input_mode == InputMode::w4a4) l.base.format = Format::nvfp4;
  l.base.batch_invariant = o.batch_invariant;
  const auto t0 = std::chrono::steady_clock::now();
  l.w = random_layer(l.base, o.seed);
  const PackedWeights packed = prepack(l.base, l.w);
  l.L = packed.layout;
  l.per_expert = l.L.checkpoint_bytes_per_expert();
  // Copies for the smallest T of the list, from that row's own routing of copy 0.
  MoeProblem p = l.base;
  p.tokens = smallest_T;
  const std::vector<float> zero_bias(size_t(p.num_experts), 0.0f);
  const Routed r = route_host(p, make_logits(p, o.routing, logits_seed(o, 0, smallest_T)), zero_bias);
  const double touched = double(std::max(1, r.experts)) * double(l.per_expert);
  size_t free_b = 0, total_b = 0;
  FP4MOE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const int want = int(std::max<double>(1, std::ceil(kL2Factor * env.prop.l2CacheSize / touched)));
  // 85% of free memory, less room for the inputs and workspace of the rows.
  const int fit = int((double(free_b) * 0.85 - 4e9) / double(l.L.total_bytes));
  FP4MOE_CHECK(fit >= 1, "preset " << name << " needs " << l.L.total_bytes / 1e9 << " GB for one copy plus ~4 GB for "
                                   << "inputs and workspace, " << free_b / 1e9 << " GB free");
  const int copies = std::min({want, fit, 64});
  for (int c = 0; c < copies; ++c) l.dw.emplace_back(packed, env.stream);
  const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "%s: layer %.2f GB packed, %d cop%s (%d wanted for T=%lld: %.0f MB touched, %d fit), set up in %.1f s\n",
               name.c_str(), l.L.total_bytes / 1e9, copies, copies == 1 ? "y" : "ies", want, (long long)smallest_T,
               touched / 1e6, fit, setup_s);
  return l;
}

// Inputs of row T; copies by the L2 rule, capped by the layer's copies and by free memory.
std::unique_ptr<Row> make_row(const Env& env, const Layer& l, int64_t T) {
  const Options& o = env.o;
  auto row = std::make_unique<Row>();
  Row& r = *row;
  r.p = l.base;
  r.p.tokens = T;
  r.prun = o.precomputed ? r.p.with_precomputed_routing() : r.p;
  const MoeProblem& p = r.p;
  // Router / correction biases are zero: with uniform random logits the routing is then uniform,
  // as a trained, load-balanced router is (a random bias concentrates the tokens on a few experts
  // and flatters the timings).
  r.hbias.assign(size_t(p.num_experts), 0.0f);
  r.rbias = Dev<float>(size_t(p.num_experts));
  r.rbias.upload(r.hbias);
  r.ws_bytes = workspace_size(p);  // both tactics, and the same with precomputed routing

  r.host_logits0 = make_logits(p, o.routing, logits_seed(o, 0, T));
  Routed first = route_host(p, r.host_logits0, r.hbias);
  const double bytes0 = double(std::max(1, first.experts)) * double(l.per_expert);
  const int rule = int(std::max<double>(1, std::ceil(kL2Factor * env.prop.l2CacheSize / bytes0)));
  r.copies = std::min<int>(rule, int(l.dw.size()));
  const size_t per_copy = size_t(T) * p.hidden * 4 + size_t(T) * p.num_experts * 4 + size_t(T) * p.top_k * 8;
  size_t free_b = 0, total_b = 0;
  FP4MOE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  const double room = double(free_b) * 0.9 - double(r.ws_bytes);
  FP4MOE_CHECK(room >= double(per_copy), l.name << " T=" << T << " needs " << (per_copy + r.ws_bytes) / 1e9
                                                << " GB for one call's inputs and workspace, " << free_b / 1e9
                                                << " GB free");
  r.copies = std::min<int>(r.copies, int(room / double(per_copy)));
  char note[160];
  std::snprintf(note, sizeof note, "%d cop%s: %s", r.copies, r.copies == 1 ? "y" : "ies",
                rule == 1 ? "one call touches >= 4x L2"
                          : (r.copies >= rule ? "4x L2 per rotation" : "FEWER than 4x L2 per rotation (memory)"));
  r.copies_note = note;

  double experts = 0, slots = 0;
  for (int c = 0; c < r.copies; ++c) {
    std::vector<float> lg = c == 0 ? r.host_logits0 : make_logits(p, o.routing, logits_seed(o, c, T));
    Routed rt = c == 0 ? std::move(first) : route_host(p, lg, r.hbias);
    std::vector<uint16_t> x = make_x(p, o.seed * 31 + uint64_t(c) * 1000003 + uint64_t(T));
    r.xs.emplace_back(x.size());
    r.xs.back().upload(x);
    r.outs.emplace_back(x.size());
    r.logits.emplace_back(lg.size());
    r.logits.back().upload(lg);
    r.ids.emplace_back(rt.ids.size());
    r.ids.back().upload(rt.ids);
    r.tw.emplace_back(rt.tw.size());
    r.tw.back().upload(rt.tw);
    experts += rt.experts;
    slots += double(rt.local_slots);
    if (c == 0) r.host_x0 = std::move(x);
  }
  r.experts = experts / r.copies;
  r.bytes = r.experts * double(l.per_expert);
  // BENCH.md: FLOPs = 2 * routed slots on local experts * (rows13 * H + H * I).
  r.flops = 2.0 * (slots / r.copies) * (double(p.w13_rows()) * p.hidden + double(p.hidden) * p.intermediate);
  r.ws = Dev<uint8_t>(r.ws_bytes);

  // The reference of the first and the last check tokens of copy 0.
  r.n_check = std::min<int64_t>(T, o.check_tokens);
  MoeProblem pc = p;
  pc.tokens = r.n_check;
  HostInputs hin;
  hin.router_bias = p.routing.has_bias ? r.hbias.data() : nullptr;
  hin.x = r.host_x0.data();
  hin.logits = r.host_logits0.data();
  r.ref_first = moe_reference(pc, l.w, hin).out;
  if (T > r.n_check) {
    hin.x = r.host_x0.data() + (T - r.n_check) * p.hidden;
    hin.logits = r.host_logits0.data() + (T - r.n_check) * p.num_experts;
    r.ref_last = moe_reference(pc, l.w, hin).out;
  }
  return row;
}

// One call of copy c with the plan (or make_plan's when null).
void call(const Env& env, const Layer& l, const Row& r, int c, const Plan* plan, void* timeline = nullptr) {
  DeviceInputs in = r.inputs(c, env.o.precomputed);
  in.timeline = timeline;
  if (plan != nullptr)
    run(r.prun, l.dw[size_t(c)], in, r.ws.p, r.ws_bytes, env.stream, *plan);
  else
    run(r.prun, l.dw[size_t(c)], in, r.ws.p, r.ws_bytes, env.stream);
}

// Relative L2 error of copy 0's checked tokens (a separate, uncaptured call with the output
// poisoned first); NaN when any output element is NaN or unwritten.
double check(const Env& env, const Layer& l, const Row& r, const Plan* plan) {
  const Dev<uint16_t>& out = r.outs[0];
  FP4MOE_CUDA_CHECK(cudaMemsetAsync(out.p, 0xFF, out.n * 2, env.stream));
  call(env, l, r, 0, plan);
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(env.stream));
  std::vector<uint16_t> got(out.n);
  FP4MOE_CUDA_CHECK(cudaMemcpy(got.data(), out.p, got.size() * 2, cudaMemcpyDeviceToHost));
  for (const uint16_t v : got)
    if ((v & 0x7F80) == 0x7F80 && (v & 0x7F) != 0) return NAN;
  double num = 0, den = 0;
  auto add = [&](const std::vector<uint16_t>& ref, size_t off) {
    for (size_t i = 0; i < ref.size(); ++i) {
      const double a = bf16_to_float(got[off + i]), b = bf16_to_float(ref[i]);
      num += (a - b) * (a - b);
      den += b * b;
    }
  };
  add(r.ref_first, 0);
  if (!r.ref_last.empty()) add(r.ref_last, got.size() - r.ref_last.size());
  return std::sqrt(num / std::max(den, 1e-30));
}

Timing time_layer(const Env& env, const Layer& l, const Row& r, const Plan* plan) {
  return time_captured(env.stream, env.o.reps, r.copies, [&] {
    for (int c = 0; c < r.copies; ++c) call(env, l, r, c, plan);
  });
}

// The byte floor: the row's bytes read once per copy, in the same graph structure.
Timing time_floor(const Env& env, const Layer& l, const Row& r) {
  const size_t n16 = size_t(r.bytes) / 16;
  return time_captured(env.stream, env.o.reps, r.copies, [&] {
    for (int c = 0; c < r.copies; ++c)
      read_floor_kernel<<<env.prop.multiProcessorCount * 8, 512, 0, env.stream>>>(
          reinterpret_cast<const uint4*>(l.dw[size_t(c)].data()), n16, env.sink);
    FP4MOE_CUDA_CHECK(cudaGetLastError());
  });
}

void print_timeline(const Env& env, const Layer& l, const Row& r, const Plan& plan) {
  Dev<uint64_t> tl(size_t(plan.decode.blocks) * 8);
  call(env, l, r, 0, &plan, tl.p);
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(env.stream));
  std::vector<uint64_t> h(tl.n);
  FP4MOE_CUDA_CHECK(cudaMemcpy(h.data(), tl.p, h.size() * 8, cudaMemcpyDeviceToHost));
  uint64_t t0 = UINT64_MAX;
  for (int b = 0; b < plan.decode.blocks; ++b) t0 = std::min(t0, h[size_t(b) * 6]);
  const char* names[6] = {"start", "routed", "lists", "gemm1", "barrier", "gemm2"};
  std::fprintf(stderr, "timeline %s T=%lld (us since the first block started; min / max over %d blocks):", l.name.c_str(),
               (long long)r.p.tokens, plan.decode.blocks);
  for (int k = 0; k < 6; ++k) {
    uint64_t lo = UINT64_MAX, hi = 0;
    for (int b = 0; b < plan.decode.blocks; ++b) {
      lo = std::min(lo, h[size_t(b) * 6 + k]);
      hi = std::max(hi, h[size_t(b) * 6 + k]);
    }
    std::fprintf(stderr, " %s %.1f/%.1f", names[k], (lo - t0) / 1e3, (hi - t0) / 1e3);
  }
  const uint64_t* clk = h.data() + size_t(plan.decode.blocks) * 6;
  const double ns = double(h[5] - h[0]);
  std::fprintf(stderr, " | block 0 ran at %.0f MHz\n", ns > 0 ? double(clk[1] - clk[0]) / ns * 1e3 : 0.0);
}

std::map<std::pair<std::string, int64_t>, double> read_torch_csv(const std::string& path) {
  std::map<std::pair<std::string, int64_t>, double> torch_us;
  if (path.empty()) return torch_us;
  std::ifstream f(path);
  FP4MOE_CHECK(f.good(), "cannot read --torch-csv " << path);
  std::string line;
  std::getline(f, line);  // header: preset,tokens,experts,bytes,median_us,...
  while (std::getline(f, line)) {
    auto c = split(line);
    if (c.size() < 5) continue;
    char* end = nullptr;
    const double us = std::strtod(c[4].c_str(), &end);
    FP4MOE_CHECK(end != c[4].c_str() && *end == '\0',
                 path << ": median_us '" << c[4] << "' of row '" << line << "' is not a number");
    torch_us[{c[0], parse_integer<int64_t>(c[1], "--torch-csv tokens column", 0, INT64_MAX)}] = us;
  }
  return torch_us;
}

// ---- the two modes ---------------------------------------------------------------------------------

struct Progress {
  size_t done = 0, total = 0;
  std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
  void next(const std::string& what) {
    ++done;
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "fp4moe bench: [%zu/%zu] %s (%.0f s elapsed)\n", done, total, what.c_str(), s);
  }
};

std::string fmt(const char* f, double v) {
  char b[64];
  std::snprintf(b, sizeof b, f, v);
  return b;
}

void bench_rows(Env& env, const std::vector<std::string>& names, const std::vector<int64_t>& tokens) {
  const Options& o = env.o;
  std::printf("%-16s %6s %-7s %7s %9s %9s %9s %9s %6s %9s %6s %9s %9s %9s %6s %7s %9s %10s %8s\n", "preset", "T",
              "tactic", "experts", "MB", "median_us", "min_us", "max_us", "TB/s", "floor_us", "ratio", "GFLOP",
              "comp_us", "roof_us", "roof_x", "TFLOP/s", "rel_err", "torch_us", "speedup");
  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    FP4MOE_CHECK(csv != nullptr, "cannot write --csv " << o.csv);
    std::fprintf(csv, "preset,tokens,tactic,experts,bytes,median_us,min_us,max_us,tbps,floor_us,ratio,flops,compute_us,"
                      "roofline_us,roofline_ratio,tflops,rel_err,torch_us,copies,bf16_tflops,card\n");
  }
  Progress prog;
  prog.total = names.size() * tokens.size();
  const int64_t smallest = *std::min_element(tokens.begin(), tokens.end());
  bool warned_timeline = false;
  for (const std::string& name : names) {
    const Layer l = make_layer(env, name, smallest);
    for (const int64_t T : tokens) {
      const std::unique_ptr<Row> row = make_row(env, l, T);
      const Row& r = *row;
      std::optional<Plan> forced;
      if (o.tactic != "auto")
        forced = make_plan(r.prun, DeviceDesc::current(), o.tactic == "decode" ? Tactic::decode : Tactic::prefill);
      const Plan plan = forced ? *forced : make_plan(r.prun);
      prog.next(name + " T=" + std::to_string(T) + " " + std::string(to_string(plan.tactic)) + ", " + r.copies_note);
      const Plan* pp = forced ? &*forced : nullptr;
      const double rel = check(env, l, r, pp);
      if (o.timeline) {
        if (plan.tactic == Tactic::decode)
          print_timeline(env, l, r, plan);
        else if (!warned_timeline) {
          std::fprintf(stderr, "timeline: the prefill tactic records none (decode kernel only)\n");
          warned_timeline = true;
        }
      }
      const Timing lt = time_layer(env, l, r, pp);
      const Timing ft = time_floor(env, l, r);
      const double tbps = r.bytes / (lt.median * 1e-6) / 1e12;
      const double ratio = lt.median / ft.median;
      const double comp_us = r.flops / env.bf16_rate * 1e6;
      const double roof_us = std::max(ft.median, comp_us);
      const double tflops = r.flops / (lt.median * 1e-6) / 1e12;
      auto it = env.torch_us.find({name, T});
      std::string torch_col = "-", speed_col = "-";
      if (it != env.torch_us.end()) {
        torch_col = fmt("%.1f", it->second);
        speed_col = fmt("%.2fx", it->second / lt.median);
      }
      const std::string tactic(to_string(plan.tactic));
      std::printf("%-16s %6lld %-7s %7.1f %9.1f %9.1f %9.1f %9.1f %6.2f %9.1f %6.2f %9.1f %9.1f %9.1f %6.2f %7.1f %9.2e %10s %8s\n",
                  name.c_str(), (long long)T, tactic.c_str(), r.experts, r.bytes / 1e6, lt.median, lt.min, lt.max, tbps,
                  ft.median, ratio, r.flops / 1e9, comp_us, roof_us, lt.median / roof_us, tflops, rel, torch_col.c_str(),
                  speed_col.c_str());
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%lld,%s,%.1f,%.0f,%.2f,%.2f,%.2f,%.3f,%.2f,%.3f,%.4e,%.2f,%.2f,%.3f,%.2f,%.3e,%s,%d,%.1f,%s\n",
                     name.c_str(), (long long)T, tactic.c_str(), r.experts, r.bytes, lt.median, lt.min, lt.max, tbps,
                     ft.median, ratio, r.flops, comp_us, roof_us, lt.median / roof_us, tflops, rel,
                     torch_col == "-" ? "" : torch_col.c_str(), r.copies, env.bf16_rate / 1e12, env.prop.name);
      if (!(rel <= 1e-2))
        std::fprintf(stderr, "WARNING: %s T=%lld rel err %.3e exceeds 1e-2 (or NaN outputs)\n", name.c_str(), (long long)T, rel);
    }
  }
  if (csv) std::fclose(csv);
}

// Both tactics at each T, the winner, and whether the planner's choice agrees.
void bench_crossover(Env& env, const std::vector<std::string>& names, const std::vector<int64_t>& tokens) {
  const Options& o = env.o;
  std::printf("%-16s %6s %7s %9s %10s %10s %10s %10s %-7s %6s %-7s %-5s %9s\n", "preset", "T", "experts", "MB",
              "decode_us", "dec_floor", "prefill_us", "pre_floor", "winner", "margin", "planner", "agree", "rel_err");
  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    FP4MOE_CHECK(csv != nullptr, "cannot write --csv " << o.csv);
    std::fprintf(csv, "preset,tokens,experts,bytes,decode_us,decode_min_us,decode_max_us,prefill_us,prefill_min_us,"
                      "prefill_max_us,floor_us,winner,planner,rel_err_decode,rel_err_prefill,copies,card\n");
  }
  Progress prog;
  prog.total = names.size() * tokens.size();
  const int64_t smallest = *std::min_element(tokens.begin(), tokens.end());
  std::vector<std::string> summary;
  for (const std::string& name : names) {
    const Layer l = make_layer(env, name, smallest);
    std::vector<std::pair<int64_t, bool>> prefill_wins;  // (T, prefill faster)
    std::vector<int64_t> disagree;
    for (const int64_t T : tokens) {
      const std::unique_ptr<Row> row = make_row(env, l, T);
      const Row& r = *row;
      prog.next(name + " T=" + std::to_string(T) + " decode and prefill, " + r.copies_note);
      const DeviceDesc d = DeviceDesc::current();
      const Plan dec = make_plan(r.prun, d, Tactic::decode), pre = make_plan(r.prun, d, Tactic::prefill);
      const Tactic planner = make_plan(r.prun).tactic;
      const double rel_d = check(env, l, r, &dec), rel_p = check(env, l, r, &pre);
      const Timing td = time_layer(env, l, r, &dec), tp = time_layer(env, l, r, &pre);
      const Timing ft = time_floor(env, l, r);
      const bool pwin = tp.median < td.median;
      const Tactic winner = pwin ? Tactic::prefill : Tactic::decode;
      prefill_wins.emplace_back(T, pwin);
      if (winner != planner) disagree.push_back(T);
      const double margin = std::max(td.median, tp.median) / std::min(td.median, tp.median);
      const double rel = std::max(rel_d, rel_p);
      const std::string w(to_string(winner)), pl(to_string(planner));
      std::printf("%-16s %6lld %7.1f %9.1f %10.1f %10.2f %10.1f %10.2f %-7s %5.2fx %-7s %-5s %9.2e\n", name.c_str(),
                  (long long)T, r.experts, r.bytes / 1e6, td.median, td.median / ft.median, tp.median,
                  tp.median / ft.median, w.c_str(), margin, pl.c_str(), winner == planner ? "yes" : "NO",
                  std::isnan(rel_d) || std::isnan(rel_p) ? NAN : rel);
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%lld,%.1f,%.0f,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f,%.2f,%s,%s,%.3e,%.3e,%d,%s\n", name.c_str(),
                     (long long)T, r.experts, r.bytes, td.median, td.min, td.max, tp.median, tp.min, tp.max, ft.median,
                     w.c_str(), pl.c_str(), rel_d, rel_p, r.copies, env.prop.name);
      if (!(rel_d <= 1e-2) || !(rel_p <= 1e-2))
        std::fprintf(stderr, "WARNING: %s T=%lld rel err decode %.3e prefill %.3e exceeds 1e-2 (or NaN outputs)\n",
                     name.c_str(), (long long)T, rel_d, rel_p);
    }
    // The measured switch point: the smallest measured T from which prefill wins at every larger T.
    std::sort(prefill_wins.begin(), prefill_wins.end());
    int64_t from = -1;
    for (size_t i = prefill_wins.size(); i-- > 0;) {
      if (!prefill_wins[i].second) break;
      from = prefill_wins[i].first;
    }
    MoeProblem p = l.base;
    p.tokens = smallest;
    const Crossover c = crossover(p, DeviceDesc::current());
    std::string line = "# " + name + ": ";
    if (from < 0)
      line += "decode wins at the largest measured T (" + std::to_string(prefill_wins.back().first) + ")";
    else
      line += "prefill wins at every measured T >= " + std::to_string(from);
    line += "; planner switches at T = " + std::to_string(c.prefill_from_tokens) + " (" + c.source + "); ";
    if (disagree.empty()) {
      line += "planner agrees at every measured T";
    } else {
      line += "planner disagrees at T =";
      for (const int64_t T : disagree) line += " " + std::to_string(T);
    }
    summary.push_back(line);
  }
  std::printf("\n");
  for (const std::string& s : summary) std::printf("%s\n", s.c_str());
  if (csv) std::fclose(csv);
}

void bench(Options o) {
  // Every option is checked before the GPU is touched.
  o.reps = parse_integer<int>(o.reps_text, "--reps", 10, 100000);
  o.check_tokens = parse_integer<int>(o.check_tokens_text, "--check-tokens", 1, 64);
  o.seed = parse_integer<uint64_t>(o.seed_text, "--seed", 0, UINT64_MAX);
  o.gemm_n = parse_integer<int>(o.gemm_text, "--gemm-size", 256, 32768);
  FP4MOE_CHECK(o.gemm_n % 64 == 0, "--gemm-size expects a multiple of 64, got " << o.gemm_n);
  FP4MOE_CHECK(o.tactic == "auto" || o.tactic == "decode" || o.tactic == "prefill",
               "--tactic expects auto, decode or prefill, got '" << o.tactic << "'");
  if (o.crossover) {
    FP4MOE_CHECK(o.tactic == "auto", "--crossover times both tactics; drop --tactic " << o.tactic);
    FP4MOE_CHECK(!o.batch_invariant, "--crossover compares the tactics of the default mode; drop --batch-invariant "
                                     "(batch-invariant problems run the prefill tactic only)");
    FP4MOE_CHECK(!o.timeline, "--timeline belongs to the per-row mode; drop it with --crossover");
    if (!o.tokens_given) o.tokens = kCrossoverTokens;
  }
  FP4MOE_CHECK(!(o.batch_invariant && o.tactic == "decode"),
               "--batch-invariant runs the prefill tactic only; drop --tactic decode");
  const std::vector<int64_t> tokens = parse_integer_list<int64_t>(o.tokens, "--tokens", 1, 1 << 20);
  const std::vector<std::string> names = split(o.presets);
  FP4MOE_CHECK(!names.empty(), "--preset is empty");
  for (const std::string& name : names) find_preset(name);
  if (o.format != "native") parse_format(o.format);
  parse_input_mode(o.input_mode);
  FP4MOE_CHECK(o.routing == "uniform" || o.routing == "balanced" || o.routing == "skewed",
               "--routing expects uniform, balanced or skewed, got '" << o.routing << "'");
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "fp4moe bench needs a Hopper GPU: " << why);

  Env env{o, {}, nullptr, nullptr, 0, read_torch_csv(o.torch_csv)};
  int dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  FP4MOE_CUDA_CHECK(cudaGetDeviceProperties(&env.prop, dev));
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  FP4MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&env.stream, cudaStreamNonBlocking));
  Dev<unsigned> sink(1);
  env.sink = sink.p;
  env.bf16_rate = measure_bf16_rate(o.gemm_n, env.stream);

  std::printf("# fp4moe bench | %s | driver %d.%d | CUDA runtime %d.%d | %d SMs | L2 %d MB | %.0f GB\n", env.prop.name,
              driver / 1000, (driver % 1000) / 10, runtime / 1000, (runtime % 1000) / 10, env.prop.multiProcessorCount,
              env.prop.l2CacheSize >> 20, double(env.prop.totalGlobalMem) / 1e9);
  std::printf("# routing %s%s, format %s, %s%s, tactic %s, median of %d CUDA-graph replays\n", o.routing.c_str(),
              o.precomputed ? " (precomputed top-k)" : "", o.format.c_str(), o.input_mode.c_str(),
              o.batch_invariant ? ", batch_invariant" : "", o.crossover ? "both (crossover)" : o.tactic.c_str(), o.reps);
  std::printf("# floor = 16 B/thread read of the touched bytes; bf16 dense rate %.1f TFLOP/s (cuBLAS %d^3 bf16 GEMM, "
              "fp32 accumulation, median of 20), comp = FLOPs / that rate, roof = max(floor, comp)\n",
              env.bf16_rate / 1e12, o.gemm_n);
  try {
    if (o.crossover)
      bench_crossover(env, names, tokens);
    else
      bench_rows(env, names, tokens);
  } catch (...) {
    cudaStreamDestroy(env.stream);
    throw;
  }
  cudaStreamDestroy(env.stream);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* o = new Options();  // lives for the program's duration, owned by the callback
  auto* cmd = app.add_subcommand("bench", "Time the layer per BENCH.md (cold L2, CUDA graphs, byte and compute floors)");
  cmd->add_option("--preset", o->presets, "Comma-separated presets")->capture_default_str();
  CLI::Option* tok = cmd->add_option("--tokens", o->tokens, "Comma-separated token counts (--crossover: " +
                                                                std::string(kCrossoverTokens) + ")")
                         ->capture_default_str();
  cmd->add_option("--routing", o->routing, "uniform | balanced | skewed")->capture_default_str();
  cmd->add_option("--format", o->format, "nvfp4 | mxfp4 | native (the preset's own)")->capture_default_str();
  cmd->add_option("--input-mode", o->input_mode, "w4a16 | w4a4")->capture_default_str();
  cmd->add_option("--tactic", o->tactic,
                  "auto (the planner's) | decode | prefill: run that tactic through run(..., plan) at every T")
      ->capture_default_str();
  cmd->add_flag("--crossover", o->crossover,
                "Time both tactics at each T and print the winner beside the planner's choice");
  cmd->add_flag("--batch-invariant", o->batch_invariant, "The problem's batch_invariant setting (prefill tactic, one tile width)");
  cmd->add_option("--reps", o->reps_text, "Timed graph replays (10..100000)")->capture_default_str();
  cmd->add_option("--check-tokens", o->check_tokens_text,
                  "Tokens checked against the CPU reference at each end of a row (1..64)")
      ->capture_default_str();
  cmd->add_option("--gemm-size", o->gemm_text, "N of the N^3 bf16 cuBLAS GEMM that measures the dense rate")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed_text, "Random seed")->capture_default_str();
  cmd->add_flag("--precomputed", o->precomputed,
               "Pass top-k ids and weights computed on the host (the precomputed entry point) instead of logits");
  cmd->add_flag("--timeline", o->timeline, "Also print where the time of one decode call goes, phase by phase");
  cmd->add_option("--csv", o->csv, "Also write the rows to this CSV file");
  cmd->add_option("--torch-csv", o->torch_csv, "CSV from bench/torch_grouped_mm.py to show beside");
  cmd->callback([o, tok] {
    o->tokens_given = tok->count() > 0;
    bench(*o);
  });
}

}  // namespace fp4moe::cli
