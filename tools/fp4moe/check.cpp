// `fp4moe check`: runs one random layer of a preset on a backend and compares the result with an
// independent plain-loop computation (naive_moe.h) that shares only the routing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "commands.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/moe.h"
#include "common/cuda_check.h"
#include "fp4moe/presets.h"
#include "fp4moe/reference.h"
#include "fp4moe/weights.h"
#include "naive_moe.h"
#include "numbers.h"
#include "problem_flags.h"

namespace fp4moe::cli {
namespace {

// SPEC "Numerics and checks": a correct backend stays well under this relative L2 error.
constexpr double kMaxRelL2 = 1e-2;

// The numbers arrive as text and are parsed strictly (numbers.h) by parse_numbers().
struct CheckOptions {
  std::string preset;
  std::string tokens_text = "8", seed_text = "0", threads_text = "0", layer_text;
  int64_t tokens = 8;
  std::string routing;     // empty: the preset's
  std::string format;      // empty: the preset's
  std::string input_mode = "w4a16";
  uint64_t seed = 0;
  std::string experts_local;  // "OFFSET:COUNT", empty: all experts
  std::string backend = "auto";
  int threads = 0;
  std::string checkpoint;  // instead of a preset: a layer of this checkpoint
  int layer = -1;
};

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// ---- backends ------------------------------------------------------------------------------------
// A backend computes the layer's bf16 output from host data. Each one is a single function; the
// table below lists them for --backend.
using BackendFn = std::vector<uint16_t> (*)(const MoeProblem&, const MoeWeights&, const HostInputs&,
                                            const CheckOptions&);

std::vector<uint16_t> run_cpu_reference(const MoeProblem& p, const MoeWeights& w,
                                        const HostInputs& in, const CheckOptions& opt) {
  return moe_reference(p, w, in, opt.threads).out;
}

// The decode path on the GPU: prepack, upload, one run on the default stream, poisoned output.
std::vector<uint16_t> run_gpu(const MoeProblem& p, const MoeWeights& w, const HostInputs& in,
                              const CheckOptions&) {
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "backend gpu: " << why);
  const DeviceWeights dw(prepack(p, w));
  const size_t x_bytes = size_t(p.tokens) * p.hidden * 2;
  const size_t logit_bytes = size_t(p.tokens) * p.num_experts *
                             (p.routing.logits_dtype == DType::bf16 ? 2 : 4);
  const size_t slot_bytes = size_t(p.tokens) * p.top_k * 4;
  const size_t ws_bytes = workspace_size(p);
  const bool pre = p.routing.method == RoutingMethod::precomputed;
  uint8_t* buf = nullptr;
  const size_t off_out = (x_bytes + 255) / 256 * 256, off_logits = off_out + off_out,
               off_bias = off_logits + (logit_bytes + 255) / 256 * 256,
               off_ids = off_bias + (size_t(p.num_experts) * 4 + 255) / 256 * 256,
               off_tw = off_ids + (slot_bytes + 255) / 256 * 256,
               off_ws = off_tw + (slot_bytes + 255) / 256 * 256, total = off_ws + ws_bytes;
  FP4MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&buf), total));
  std::vector<uint16_t> out(size_t(p.tokens) * p.hidden);
  try {
    FP4MOE_CUDA_CHECK(cudaMemcpy(buf, in.x, x_bytes, cudaMemcpyHostToDevice));
    FP4MOE_CUDA_CHECK(cudaMemset(buf + off_out, 0xFF, x_bytes));  // NaN: unwritten outputs show
    DeviceInputs d;
    d.x = buf;
    d.out = buf + off_out;
    if (pre) {
      FP4MOE_CUDA_CHECK(cudaMemcpy(buf + off_ids, in.topk_ids, slot_bytes, cudaMemcpyHostToDevice));
      FP4MOE_CUDA_CHECK(cudaMemcpy(buf + off_tw, in.topk_weights, slot_bytes, cudaMemcpyHostToDevice));
      d.topk_ids = reinterpret_cast<const int32_t*>(buf + off_ids);
      d.topk_weights = reinterpret_cast<const float*>(buf + off_tw);
    } else {
      FP4MOE_CUDA_CHECK(cudaMemcpy(buf + off_logits, in.logits, logit_bytes, cudaMemcpyHostToDevice));
      d.logits = buf + off_logits;
      if (in.router_bias != nullptr) {
        FP4MOE_CUDA_CHECK(cudaMemcpy(buf + off_bias, in.router_bias, size_t(p.num_experts) * 4,
                                     cudaMemcpyHostToDevice));
        d.router_bias = reinterpret_cast<const float*>(buf + off_bias);
      }
    }
    run(p, dw, d, ws_bytes ? buf + off_ws : nullptr, ws_bytes, nullptr);
    FP4MOE_CUDA_CHECK(cudaDeviceSynchronize());
    FP4MOE_CUDA_CHECK(cudaMemcpy(out.data(), buf + off_out, x_bytes, cudaMemcpyDeviceToHost));
  } catch (...) {
    cudaFree(buf);
    throw;
  }
  cudaFree(buf);
  return out;
}

struct Backend {
  const char* name;
  const char* description;
  BackendFn run;
};

const Backend kBackends[] = {
    {"cpu", "CPU reference (src/reference)", run_cpu_reference},
    {"gpu", "Hopper decode kernels (src/kernels/decode)", run_gpu},
};

const Backend& find_backend(std::string name) {
  if (name == "auto") name = gpu_available() ? "gpu" : "cpu";
  std::string known;
  for (const Backend& b : kBackends) {
    if (name == b.name) return b;
    known += known.empty() ? "" : ", ";
    known += b.name;
  }
  FP4MOE_FAIL("unknown backend '" << name << "'; available: " << known);
}

// ---- the problem ---------------------------------------------------------------------------------
MoeProblem make_problem(const CheckOptions& opt) {
  ProblemFlags f;
  f.routing = opt.routing;
  f.format = opt.format;
  f.input_mode = opt.input_mode;
  f.experts_local = opt.experts_local;
  return preset_problem(opt.preset, opt.tokens, f);
}

// A layer of a checkpoint: its problem, weights and router from the files.
LoadedLayer load_checkpoint_layer(const CheckOptions& opt) {
  FP4MOE_CHECK(opt.layer >= 0, "--checkpoint needs --layer L (see `fp4moe inspect --checkpoint DIR`)");
  FP4MOE_CHECK(opt.routing.empty() && opt.format.empty(),
               "--routing and --format come from the checkpoint; drop them with --checkpoint");
  MoeProblem range;
  apply_experts_local(opt.experts_local, range);
  LoadOptions lo;
  lo.input_mode = parse_input_mode(opt.input_mode);
  lo.local_expert_offset = range.local_expert_offset;
  lo.num_local_experts = range.num_local_experts;
  return load_moe_layer(opt.checkpoint, opt.layer, opt.tokens, lo);
}

// ---- comparison ----------------------------------------------------------------------------------
struct Comparison {
  double rel_l2 = 0;
  double max_abs = 0;
  int64_t nans = 0;
  double ref_norm = 0;
};

Comparison compare(const std::vector<uint16_t>& got, const std::vector<double>& want) {
  Comparison c;
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = bf16_to_float(got[i]);
    if (std::isnan(g)) {
      ++c.nans;
      continue;
    }
    const double d = g - want[i];
    num += d * d;
    den += want[i] * want[i];
    c.max_abs = std::max(c.max_abs, std::fabs(d));
  }
  c.ref_norm = std::sqrt(den);
  c.rel_l2 = den > 0 ? std::sqrt(num / den) : std::sqrt(num);
  return c;
}

void parse_numbers(CheckOptions& opt) {
  opt.tokens = parse_integer<int64_t>(opt.tokens_text, "--tokens", 0, INT64_MAX);
  opt.seed = parse_integer<uint64_t>(opt.seed_text, "--seed", 0, UINT64_MAX);
  opt.threads = parse_integer<int>(opt.threads_text, "--threads", 0, 4096);
  if (!opt.layer_text.empty()) opt.layer = parse_integer<int>(opt.layer_text, "--layer", 0, INT32_MAX);
}

// Host bytes the check holds at once that grow with T: x and the output (bf16), logits, the
// routing, the reference's results (bf16 + fp32) and the plain loops' fp64 output. Refused with the
// byte count before anything is allocated.
void check_memory(const MoeProblem& p) {
  using detail::checked_add;
  using detail::checked_mul;
  const char* what = "fp4moe check (the [T, H] inputs and outputs)";
  const int64_t per_token = int64_t{p.hidden} * (2 + 2 + 6 + 8) + int64_t{p.num_experts} * 4 + int64_t{p.top_k} * 8;
  detail::check_host_bytes(checked_add(checked_mul(p.tokens, per_token, what), int64_t{p.num_experts} * 4, what),
                           what);
}

int run_check(CheckOptions opt) {
  parse_numbers(opt);
  const Backend& backend = find_backend(opt.backend);
  std::optional<LoadedLayer> loaded;
  if (!opt.checkpoint.empty()) loaded = load_checkpoint_layer(opt);
  const MoeProblem p = loaded ? loaded->problem : make_problem(opt);
  check_memory(p);
  const int64_t T = p.tokens, H = p.hidden, E = p.num_experts, k = p.top_k;
  std::printf("problem  %s\n", p.to_string().c_str());

  auto t0 = std::chrono::steady_clock::now();
  const MoeWeights w = loaded ? std::move(loaded->weights) : random_weights(p, opt.seed);
  if (loaded) {
    std::printf("weights  %d local experts of layer %d from %s, %.2f s\n", p.local_experts(),
                opt.layer, opt.checkpoint.c_str(), seconds_since(t0));
  } else {
    std::printf("weights  %d local experts, random (seed %llu), %.2f s\n", p.local_experts(),
                static_cast<unsigned long long>(opt.seed), seconds_since(t0));
  }

  // Inputs: hidden states N(0, 1) in bf16, logits N(0, 1), router bias N(0, 0.1); each from its
  // own stream derived from the seed.
  std::mt19937_64 rng_x(opt.seed * 4 + 1), rng_l(opt.seed * 4 + 2), rng_b(opt.seed * 4 + 3),
      rng_ids(opt.seed * 4 + 4);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<uint16_t> x(static_cast<size_t>(T * H));
  for (auto& v : x) v = float_to_bf16(normal(rng_x));
  std::vector<float> logits(static_cast<size_t>(T * E));
  for (auto& v : logits) v = normal(rng_l);
  std::vector<float> router_bias(static_cast<size_t>(E));
  for (auto& v : router_bias) v = 0.1f * normal(rng_b);
  if (loaded) {
    // The layer's own router: logits from the hidden states, the checkpoint's bias.
    logits = router_logits(*loaded, x.data(), T);
    router_bias = loaded->router_bias;
  }

  // The routing both computations share.
  std::vector<int32_t> ids(static_cast<size_t>(T * k));
  std::vector<float> weights(ids.size());
  HostInputs in;
  in.x = x.data();
  if (p.routing.method == RoutingMethod::precomputed) {
    // Distinct uniform ids and weights of a softmax over k random scores.
    std::vector<int32_t> perm(static_cast<size_t>(E));
    for (int64_t t = 0; t < T; ++t) {
      std::iota(perm.begin(), perm.end(), 0);
      std::shuffle(perm.begin(), perm.end(), rng_ids);
      double sum = 0;
      for (int64_t j = 0; j < k; ++j) {
        ids[t * k + j] = perm[j];
        weights[t * k + j] = std::exp(normal(rng_ids));
        sum += weights[t * k + j];
      }
      for (int64_t j = 0; j < k; ++j) weights[t * k + j] = static_cast<float>(weights[t * k + j] / sum);
    }
    in.topk_ids = ids.data();
    in.topk_weights = weights.data();
  } else {
    in.logits = logits.data();
    in.router_bias = p.routing.has_bias ? router_bias.data() : nullptr;
    route_reference(p, in.logits, in.router_bias, ids.data(), weights.data());
  }
  int64_t local_slots = 0;
  for (int32_t e : ids)
    local_slots += e >= p.local_expert_offset && e < p.local_expert_offset + p.local_experts();
  std::printf("routing  %s, %lld of %lld slots on local experts\n",
              std::string(to_string(p.routing.method)).c_str(), static_cast<long long>(local_slots),
              static_cast<long long>(T * k));
  if (local_slots == 0 && T > 0)
    std::printf("warning  no slot is routed to the local experts: the output is all zeros and the "
                "check compares nothing else\n");

  t0 = std::chrono::steady_clock::now();
  const std::vector<uint16_t> out = backend.run(p, w, in, opt);
  const double backend_s = seconds_since(t0);
  FP4MOE_CHECK(static_cast<int64_t>(out.size()) == T * H,
               "backend '" << backend.name << "' returned " << out.size() << " values, expected "
                           << T * H);
  std::printf("backend  %s: %.3f s\n", backend.description, backend_s);

  t0 = std::chrono::steady_clock::now();
  const std::vector<double> want = naive_moe(p, w, x.data(), ids.data(), weights.data(), opt.threads);
  std::printf("naive    plain loops: %.3f s\n", seconds_since(t0));

  const Comparison c = compare(out, want);
  const bool pass = c.nans == 0 && c.rel_l2 <= kMaxRelL2;
  std::printf("result   rel_l2 %.3e  max_abs %.3e  |ref| %.3e  nan %lld  -> %s (limit %.0e)\n",
              c.rel_l2, c.max_abs, c.ref_norm, static_cast<long long>(c.nans),
              pass ? "PASS" : "FAIL", kMaxRelL2);
  return pass ? 0 : 2;
}

}  // namespace

void add_check_command(CLI::App& app) {
  auto opt = std::make_shared<CheckOptions>();
  CLI::App* cmd = app.add_subcommand(
      "check", "Run a random layer of a preset and compare it with an independent computation");
  CLI::Option* preset = cmd->add_option("--preset", opt->preset, "Model preset (see `fp4moe presets`)");
  CLI::Option* ckpt = cmd->add_option("--checkpoint", opt->checkpoint,
                                      "Instead of a preset: a checkpoint directory (see docs/checkpoints.md)");
  preset->excludes(ckpt);
  cmd->add_option("--layer", opt->layer_text, "With --checkpoint: the MoE layer to run");
  cmd->add_option("--tokens,-T", opt->tokens_text, "Tokens T (default 8)");
  cmd->add_option("--routing", opt->routing,
                  "Routing method instead of the preset's: softmax_topk, topk_softmax, deepseek_v3, "
                  "llama4, sigmoid_topk, precomputed (random ids and weights)");
  cmd->add_option("--format", opt->format, "Weight format instead of the preset's: nvfp4, mxfp4");
  cmd->add_option("--input-mode", opt->input_mode, "Activation input: w4a16 (default) or w4a4");
  cmd->add_option("--seed", opt->seed_text, "Seed of the weights and inputs (default 0)");
  cmd->add_option("--experts-local", opt->experts_local,
                  "Expert parallelism: this rank holds experts OFFSET:COUNT");
  cmd->add_option("--backend", opt->backend, "Backend to check: auto (default: gpu where a Hopper GPU exists, else cpu), gpu, cpu");
  cmd->add_option("--threads", opt->threads_text, "Host threads (default 0: all cores)");
  cmd->callback([opt] {
    if (opt->preset.empty() && opt->checkpoint.empty())
      throw CLI::RequiredError("--preset or --checkpoint");
    const int rc = run_check(*opt);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace fp4moe::cli
