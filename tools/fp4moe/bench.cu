// `fp4moe bench`: the benchmark instrument of BENCH.md for the decode path.
//
// Per (preset, T): weights rotate among `copies` device copies of the layer (each call of a copy routes
// its own random logits), so the bytes touched per rotation are at least 4x the L2 size; the copies are
// captured back to back in one CUDA graph whose replays are timed with events; the read floor is the
// same graph structure over a plain 16-byte-per-thread read kernel of the touched byte count, measured
// in the same run. Correctness: the CPU reference on the first --check-tokens tokens (a token's output
// does not depend on the rest of the batch; tests/gpu checks that bitwise).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <set>
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

uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
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
  const int nt = std::max(1, int(std::thread::hardware_concurrency()));
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
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> l(size_t(p.tokens) * p.num_experts);
  for (auto& v : l) v = nd(rng);
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

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  Dev() = default;
  explicit Dev(size_t count) : n(count) { FP4MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&p), std::max<size_t>(1, count) * sizeof(T))); }
  Dev(Dev&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; }
  ~Dev() { if (p) cudaFree(p); }
  void upload(const std::vector<T>& h) { FP4MOE_CUDA_CHECK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
};

struct Timing {
  double median = 0, min = 0, max = 0;
};

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
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.push_back(item);
  return out;
}

struct Options {
  std::string presets = "qwen3-30b-a3b";
  std::string tokens = "1,2,4,8,16,32,64";
  std::string routing = "uniform";
  std::string format = "nvfp4";
  std::string input_mode = "w4a16";
  std::string csv, torch_csv;
  std::string reps_text = "100", check_tokens_text = "2", seed_text = "1";
  int reps = 100;
  int check_tokens = 2;
  bool timeline = false;
  bool precomputed = false;
  uint64_t seed = 1;
};

void bench(Options o) {
  // Every option is checked before the GPU is touched.
  o.reps = parse_integer<int>(o.reps_text, "--reps", 10, 100000);
  o.check_tokens = parse_integer<int>(o.check_tokens_text, "--check-tokens", 1, 64);
  o.seed = parse_integer<uint64_t>(o.seed_text, "--seed", 0, UINT64_MAX);
  const std::vector<int64_t> tokens = parse_integer_list<int64_t>(o.tokens, "--tokens", 1, 1 << 20);
  for (const std::string& name : split(o.presets)) find_preset(name);
  FP4MOE_CHECK(!split(o.presets).empty(), "--preset is empty");
  if (o.format != "native") parse_format(o.format);
  parse_input_mode(o.input_mode);
  FP4MOE_CHECK(o.routing == "uniform" || o.routing == "balanced" || o.routing == "skewed",
               "--routing expects uniform, balanced or skewed, got '" << o.routing << "'");
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "fp4moe bench needs a Hopper GPU: " << why);
  cudaDeviceProp prop;
  FP4MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  int driver = 0, runtime = 0;
  cudaDriverGetVersion(&driver);
  cudaRuntimeGetVersion(&runtime);
  std::map<std::pair<std::string, int64_t>, double> torch_us;
  if (!o.torch_csv.empty()) {
    std::ifstream f(o.torch_csv);
    FP4MOE_CHECK(f.good(), "cannot read --torch-csv " << o.torch_csv);
    std::string line;
    std::getline(f, line);  // header: preset,tokens,experts,bytes,median_us,...
    while (std::getline(f, line)) {
      auto c = split(line);
      if (c.size() < 5) continue;
      char* end = nullptr;
      const double us = std::strtod(c[4].c_str(), &end);
      FP4MOE_CHECK(end != c[4].c_str() && *end == '\0',
                   o.torch_csv << ": median_us '" << c[4] << "' of row '" << line << "' is not a number");
      torch_us[{c[0], parse_integer<int64_t>(c[1], "--torch-csv tokens column", 0, INT64_MAX)}] = us;
    }
  }
  std::printf("# fp4moe bench | %s | driver %d.%d | CUDA runtime %d.%d | %d SMs | L2 %d MB\n", prop.name,
              driver / 1000, (driver % 1000) / 10, runtime / 1000, (runtime % 1000) / 10, prop.multiProcessorCount,
              prop.l2CacheSize >> 20);
  std::printf("# routing %s, format %s, %s, median of %d CUDA-graph replays; floor = 16 B/thread read of the same bytes\n",
              o.routing.c_str(), o.format.c_str(), o.input_mode.c_str(), o.reps);
  std::printf("%-16s %5s %7s %9s %9s %9s %9s %7s %9s %6s %9s %10s %8s\n", "preset", "T", "experts", "MB", "median_us",
              "min_us", "max_us", "TB/s", "floor_us", "ratio", "rel_err", "torch_us", "speedup");
  std::FILE* csv = nullptr;
  if (!o.csv.empty()) {
    csv = std::fopen(o.csv.c_str(), "w");
    FP4MOE_CHECK(csv != nullptr, "cannot write --csv " << o.csv);
    std::fprintf(csv, "preset,tokens,experts,bytes,median_us,min_us,max_us,tbps,floor_us,ratio,rel_err,torch_us,card\n");
  }
  cudaStream_t stream;
  FP4MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  Dev<unsigned> sink(1);

  for (const std::string& name : split(o.presets)) {
    const Preset& pr = find_preset(name);
    MoeProblem base = pr.problem(1);
    if (o.format != "native") base.format = parse_format(o.format);
    base.input_mode = parse_input_mode(o.input_mode);
    if (base.input_mode == InputMode::w4a4) base.format = Format::nvfp4;
    const auto t0 = std::chrono::steady_clock::now();
    const MoeWeights w = random_layer(base, o.seed);
    const PackedWeights packed = prepack(base, w);
    const PackedLayout& L = packed.layout;
    const int64_t per_expert = L.checkpoint_bytes_per_expert();
    // Copies: at least 4x L2 touched per rotation at the smallest T (8 experts touch >= k experts).
    const int64_t min_touched = int64_t(base.top_k) * per_expert;
    size_t free_b = 0, total_b = 0;
    FP4MOE_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
    int copies = int(std::max<int64_t>(2, ceil_div(4LL * prop.l2CacheSize, min_touched)));
    const int fit = int(double(free_b) * 0.85 / double(L.total_bytes));
    FP4MOE_CHECK(fit >= 1, "preset " << name << " needs " << L.total_bytes / 1e9 << " GB, " << free_b / 1e9 << " GB free");
    copies = std::min({copies, fit, 64});
    std::vector<DeviceWeights> dw;
    for (int c = 0; c < copies; ++c) dw.emplace_back(packed, stream);
    const double setup_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "%s: layer %.2f GB packed, %d copies, set up in %.1f s\n", name.c_str(), L.total_bytes / 1e9,
                 copies, setup_s);

    for (int64_t T : tokens) {
      MoeProblem p = base;
      p.tokens = T;
      const size_t ws_bytes = workspace_size(p);  // the same with precomputed routing
      Dev<uint8_t> ws(ws_bytes);
      std::vector<Dev<uint16_t>> xs, outs;
      std::vector<Dev<float>> logits;
      std::vector<std::vector<float>> host_logits;
      std::vector<std::vector<uint16_t>> host_x;
      Dev<float> rbias(size_t(p.num_experts));
      std::vector<float> hbias(size_t(p.num_experts));
      // Router / correction biases are zero: with uniform random logits the routing is then uniform,
      // as a trained, load-balanced router is at decode (a random bias concentrates the tokens on
      // a few experts and flatters the timings).
      rbias.upload(hbias);
      std::set<std::pair<int, int>> touched;  // (copy, expert)
      std::vector<Dev<int32_t>> dev_ids;
      std::vector<Dev<float>> dev_tw;
      // The problem the layer runs: the preset's routing on the device, or its result passed in.
      const MoeProblem prun = o.precomputed ? p.with_precomputed_routing() : p;
      for (int c = 0; c < copies; ++c) {
        host_logits.push_back(make_logits(p, o.routing, o.seed * 7919 + uint64_t(c) * 104729 + uint64_t(T)));
        std::vector<uint16_t> x(size_t(T) * p.hidden);
        std::mt19937_64 rng(o.seed + uint64_t(c) * 31 + uint64_t(T));
        std::normal_distribution<float> nd(0.0f, 1.0f);
        for (auto& v : x) v = float_to_bf16(nd(rng));
        host_x.push_back(std::move(x));
        xs.emplace_back(size_t(T) * p.hidden);
        xs.back().upload(host_x.back());
        outs.emplace_back(size_t(T) * p.hidden);
        logits.emplace_back(host_logits.back().size());
        logits.back().upload(host_logits.back());
        std::vector<int32_t> ids(size_t(T) * p.top_k);
        std::vector<float> tw(ids.size());
        route_reference(p, host_logits.back().data(), p.routing.has_bias ? hbias.data() : nullptr, ids.data(), tw.data());
        for (int32_t id : ids) touched.insert({c, id});
        dev_ids.emplace_back(ids.size());
        dev_ids.back().upload(ids);
        dev_tw.emplace_back(tw.size());
        dev_tw.back().upload(tw);
      }
      const double experts = double(touched.size()) / copies;
      const double bytes = experts * double(per_expert);
      auto inputs = [&](int c) {
        DeviceInputs in;
        in.x = xs[size_t(c)].p;
        in.out = outs[size_t(c)].p;
        if (o.precomputed) {
          in.topk_ids = dev_ids[size_t(c)].p;
          in.topk_weights = dev_tw[size_t(c)].p;
        } else {
          in.logits = logits[size_t(c)].p;
          in.router_bias = p.routing.has_bias ? rbias.p : nullptr;
        }
        return in;
      };
      // Correctness on copy 0 (a separate, uncaptured run with a poisoned output).
      FP4MOE_CUDA_CHECK(cudaMemsetAsync(outs[0].p, 0xFF, outs[0].n * 2, stream));
      run(prun, dw[0], inputs(0), ws.p, ws_bytes, stream);
      FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
      std::vector<uint16_t> got(outs[0].n);
      FP4MOE_CUDA_CHECK(cudaMemcpy(got.data(), outs[0].p, got.size() * 2, cudaMemcpyDeviceToHost));
      MoeProblem pc = p;
      pc.tokens = std::min<int64_t>(T, o.check_tokens);
      HostInputs hin;
      hin.x = host_x[0].data();
      hin.logits = host_logits[0].data();
      hin.router_bias = p.routing.has_bias ? hbias.data() : nullptr;
      const ReferenceResult ref = moe_reference(pc, w, hin);
      double num = 0, den = 0;
      bool nan = false;
      for (size_t i = 0; i < ref.out.size(); ++i) {
        const double a = bf16_to_float(got[i]), b = bf16_to_float(ref.out[i]);
        if (std::isnan(a)) nan = true;
        num += (a - b) * (a - b);
        den += b * b;
      }
      for (size_t i = ref.out.size(); i < got.size(); ++i)
        if (std::isnan(bf16_to_float(got[i]))) nan = true;
      const double rel = nan ? NAN : std::sqrt(num / std::max(den, 1e-30));

      if (o.timeline) {
        const Plan plan = make_plan(prun);
        Dev<uint64_t> tl(size_t(plan.decode.blocks) * 8);
        DeviceInputs in = inputs(0);
        in.timeline = tl.p;
        run(prun, dw[0], in, ws.p, ws_bytes, stream);
        FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<uint64_t> h(tl.n);
        FP4MOE_CUDA_CHECK(cudaMemcpy(h.data(), tl.p, h.size() * 8, cudaMemcpyDeviceToHost));
        uint64_t t0 = UINT64_MAX;
        for (int b = 0; b < plan.decode.blocks; ++b) t0 = std::min(t0, h[size_t(b) * 6]);
        const char* names[6] = {"start", "routed", "lists", "gemm1", "barrier", "gemm2"};
        std::fprintf(stderr, "timeline %s T=%lld (us since the first block started; min / max over %d blocks):", name.c_str(),
                     (long long)T, plan.decode.blocks);
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
      // The layer: copies back to back in one graph.
      cudaGraph_t graph;
      cudaGraphExec_t exec;
      FP4MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (int c = 0; c < copies; ++c) run(prun, dw[size_t(c)], inputs(c), ws.p, ws_bytes, stream);
      FP4MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      FP4MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      const Timing lt = time_graph(exec, stream, o.reps, copies);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      // The floor: the same bytes read once per copy, same graph structure.
      const size_t n16 = size_t(bytes) / 16;
      FP4MOE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
      for (int c = 0; c < copies; ++c)
        read_floor_kernel<<<prop.multiProcessorCount * 8, 512, 0, stream>>>(
            reinterpret_cast<const uint4*>(dw[size_t(c)].data()), n16, sink.p);
      FP4MOE_CUDA_CHECK(cudaGetLastError());
      FP4MOE_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
      FP4MOE_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
      const Timing ft = time_graph(exec, stream, o.reps, copies);
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);

      const double tbps = bytes / (lt.median * 1e-6) / 1e12;
      const double ratio = lt.median / ft.median;
      auto it = torch_us.find({name, T});
      char torch_col[32] = "-", speed_col[32] = "-";
      if (it != torch_us.end()) {
        std::snprintf(torch_col, sizeof torch_col, "%.1f", it->second);
        std::snprintf(speed_col, sizeof speed_col, "%.2fx", it->second / lt.median);
      }
      std::printf("%-16s %5lld %7.1f %9.1f %9.1f %9.1f %9.1f %7.2f %9.1f %6.2f %9.2e %10s %8s\n", name.c_str(),
                  (long long)T, experts, bytes / 1e6, lt.median, lt.min, lt.max, tbps, ft.median, ratio, rel, torch_col,
                  speed_col);
      std::fflush(stdout);
      if (csv)
        std::fprintf(csv, "%s,%lld,%.1f,%.0f,%.2f,%.2f,%.2f,%.3f,%.2f,%.3f,%.3e,%s,%s\n", name.c_str(), (long long)T,
                     experts, bytes, lt.median, lt.min, lt.max, tbps, ft.median, ratio, rel, torch_col, prop.name);
      if (nan || rel > 1e-2) std::fprintf(stderr, "WARNING: %s T=%lld rel err %.3e exceeds 1e-2\n", name.c_str(), (long long)T, rel);
    }
  }
  if (csv) std::fclose(csv);
  cudaStreamDestroy(stream);
}

}  // namespace

void add_bench_command(CLI::App& app) {
  auto* o = new Options();  // lives for the program's duration, owned by the callback
  auto* cmd = app.add_subcommand("bench", "Time the decode path per BENCH.md (cold L2, CUDA graphs, read floor)");
  cmd->add_option("--preset", o->presets, "Comma-separated presets")->capture_default_str();
  cmd->add_option("--tokens", o->tokens, "Comma-separated token counts")->capture_default_str();
  cmd->add_option("--routing", o->routing, "uniform | balanced | skewed")->capture_default_str();
  cmd->add_option("--format", o->format, "nvfp4 | mxfp4 | native (the preset's own)")->capture_default_str();
  cmd->add_option("--input-mode", o->input_mode, "w4a16 | w4a4")->capture_default_str();
  cmd->add_option("--reps", o->reps_text, "Timed graph replays (10..100000)")->capture_default_str();
  cmd->add_option("--check-tokens", o->check_tokens_text, "Tokens checked against the CPU reference per row (1..64)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed_text, "Random seed")->capture_default_str();
  cmd->add_flag("--precomputed", o->precomputed,
               "Pass top-k ids and weights computed on the host (the precomputed entry point) instead of logits");
  cmd->add_flag("--timeline", o->timeline, "Also print where the time of one call goes, phase by phase");
  cmd->add_option("--csv", o->csv, "Also write the rows to this CSV file");
  cmd->add_option("--torch-csv", o->torch_csv, "CSV from bench/torch_grouped_mm.py to show beside");
  cmd->callback([o] { bench(*o); });
}

}  // namespace fp4moe::cli
