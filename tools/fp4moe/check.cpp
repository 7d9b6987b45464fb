// `fp4moe check`: runs one random layer of a preset on a backend and compares the result with an
// independent plain-loop computation (naive_moe.h) that shares only the routing.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "commands.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/presets.h"
#include "fp4moe/reference.h"
#include "fp4moe/weights.h"
#include "naive_moe.h"

namespace fp4moe::cli {
namespace {

// SPEC "Numerics and checks": a correct backend stays well under this relative L2 error.
constexpr double kMaxRelL2 = 1e-2;

struct CheckOptions {
  std::string preset;
  int64_t tokens = 8;
  std::string routing;     // empty: the preset's
  std::string format;      // empty: the preset's
  std::string input_mode = "w4a16";
  uint64_t seed = 0;
  std::string experts_local;  // "OFFSET:COUNT", empty: all experts
  std::string backend = "cpu";
  int threads = 0;
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

struct Backend {
  const char* name;
  const char* description;
  BackendFn run;
};

const Backend kBackends[] = {
    {"cpu", "CPU reference (src/reference)", run_cpu_reference},
};

const Backend& find_backend(const std::string& name) {
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
  const Preset& preset = find_preset(opt.preset);
  MoeProblem p = preset.problem(opt.tokens);
  if (!opt.routing.empty()) {
    const RoutingMethod m = parse_routing(opt.routing);
    if (m != p.routing.method) {
      // Another method keeps only what applies to it: the preset's bias where the method has one,
      // the grouping only for deepseek_v3 (one group, scale 1 when the preset has none).
      RoutingConfig r;
      r.method = m;
      r.has_bias = preset.routing.has_bias &&
                   (m == RoutingMethod::topk_softmax || m == RoutingMethod::deepseek_v3);
      p.routing = r;
    }
  }
  if (!opt.format.empty()) p.format = parse_format(opt.format);
  p.input_mode = parse_input_mode(opt.input_mode);
  if (!opt.experts_local.empty()) {
    const size_t colon = opt.experts_local.find(':');
    FP4MOE_CHECK(colon != std::string::npos,
                 "--experts-local expects OFFSET:COUNT, got '" << opt.experts_local << "'");
    try {
      p.local_expert_offset = std::stoi(opt.experts_local.substr(0, colon));
      p.num_local_experts = std::stoi(opt.experts_local.substr(colon + 1));
    } catch (const std::exception&) {
      FP4MOE_FAIL("--experts-local expects two integers OFFSET:COUNT, got '" << opt.experts_local
                                                                            << "'");
    }
    FP4MOE_CHECK(p.num_local_experts > 0,
                 "--experts-local COUNT must be positive, got " << p.num_local_experts);
  }
  p.validate();
  return p;
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

int run_check(const CheckOptions& opt) {
  const Backend& backend = find_backend(opt.backend);
  const MoeProblem p = make_problem(opt);
  const int64_t T = p.tokens, H = p.hidden, E = p.num_experts, k = p.top_k;
  std::printf("problem  %s\n", p.to_string().c_str());

  auto t0 = std::chrono::steady_clock::now();
  const MoeWeights w = random_weights(p, opt.seed);
  std::printf("weights  %d local experts, random (seed %llu), %.2f s\n", p.local_experts(),
              static_cast<unsigned long long>(opt.seed), seconds_since(t0));

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
  cmd->add_option("--preset", opt->preset, "Model preset (see `fp4moe presets`)")->required();
  cmd->add_option("--tokens,-T", opt->tokens, "Tokens T (default 8)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--routing", opt->routing,
                  "Routing method instead of the preset's: softmax_topk, topk_softmax, deepseek_v3, "
                  "llama4, sigmoid_topk, precomputed (random ids and weights)");
  cmd->add_option("--format", opt->format, "Weight format instead of the preset's: nvfp4, mxfp4");
  cmd->add_option("--input-mode", opt->input_mode, "Activation input: w4a16 (default) or w4a4");
  cmd->add_option("--seed", opt->seed, "Seed of the weights and inputs (default 0)");
  cmd->add_option("--experts-local", opt->experts_local,
                  "Expert parallelism: this rank holds experts OFFSET:COUNT");
  cmd->add_option("--backend", opt->backend, "Backend to check: cpu (default)");
  cmd->add_option("--threads", opt->threads, "Host threads (default 0: all cores)")
      ->check(CLI::NonNegativeNumber);
  cmd->callback([opt] {
    const int rc = run_check(*opt);
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace fp4moe::cli
