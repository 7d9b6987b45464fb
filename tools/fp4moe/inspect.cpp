// `fp4moe inspect`: what a checkpoint holds (format, sizes, routing, MoE layers, experts) and anything
// suspicious; with --layer, loads that layer and summarizes its scales.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

#include "commands.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/formats.h"
#include "numbers.h"

namespace fp4moe::cli {
namespace {

struct InspectOptions {
  std::string checkpoint;
  std::string layer_text;
  int layer = -1;
};

std::string layer_ranges(const std::vector<CheckpointLayer>& layers) {
  std::string s;
  for (size_t i = 0; i < layers.size();) {
    size_t j = i;
    while (j + 1 < layers.size() && layers[j + 1].layer == layers[j].layer + 1) ++j;
    s += (s.empty() ? "" : ", ") + std::to_string(layers[i].layer);
    if (j > i) s += "-" + std::to_string(layers[j].layer);
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

struct Range {
  float lo = INFINITY, hi = -INFINITY;
  void add(float v) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
};

void print_layer(const InspectOptions& opt) {
  const LoadedLayer l = load_moe_layer(opt.checkpoint, opt.layer, 0);
  const MoeProblem& p = l.problem;
  std::printf("\nlayer %d: %zu experts loaded, %s\n", opt.layer, l.weights.experts.size(),
              p.to_string().c_str());
  Range gate, up, down, in13, in2;
  int differ = 0;
  for (const auto& e : l.weights.experts) {
    if (!e.gate.empty()) gate.add(e.gate.global_scale);
    up.add(e.up.global_scale);
    down.add(e.down.global_scale);
    in13.add(e.input_scale13);
    in2.add(e.input_scale2);
    differ += !e.gate.empty() && e.gate.global_scale != e.up.global_scale;
  }
  if (p.format == Format::nvfp4) {
    std::printf("  global scales (decode): gate [%.4g, %.4g]  up [%.4g, %.4g]  down [%.4g, %.4g]\n",
                gate.lo, gate.hi, up.lo, up.hi, down.lo, down.hi);
    std::printf("  input scales (decode):  gemm1 [%.4g, %.4g]  gemm2 [%.4g, %.4g]\n", in13.lo,
                in13.hi, in2.lo, in2.hi);
    std::printf("  experts whose gate and up global scales differ: %d of %zu\n", differ,
                l.weights.experts.size());
  }
  std::printf("  router: weight [%d, %d]%s\n", p.num_experts, p.hidden,
              l.router_bias.empty() ? ", no bias"
              : p.routing.method == RoutingMethod::deepseek_v3 ? ", e_score_correction_bias [E]"
                                                               : ", bias [E]");
  if (p.has_bias) std::printf("  expert biases: gate/up [I], down [H]\n");
  size_t shown = 0;
  for (const auto& w : l.warnings) {
    if (w.find("global scales differ") != std::string::npos) continue;  // counted above
    if (shown++ < 20) std::printf("  warning: %s\n", w.c_str());
  }
  if (shown > 20) std::printf("  ... and %zu more warnings\n", shown - 20);
}

void run_inspect(InspectOptions opt) {
  if (!opt.layer_text.empty()) opt.layer = parse_integer<int>(opt.layer_text, "--layer", 0, INT32_MAX);
  const CheckpointInfo info = inspect_checkpoint(opt.checkpoint);
  std::printf("checkpoint  %s\n", info.dir.c_str());
  std::printf("format      %s (%s, per-tensor scales stored in the %s direction)\n",
              std::string(to_string(info.format)).c_str(), std::string(to_string(info.fp4)).c_str(),
              std::string(to_string(info.stored_scale_direction)).c_str());
  std::printf("files       %d safetensors file%s%s, %lld tensors\n", info.files,
              info.files == 1 ? "" : "s", info.sharded ? " (sharded, index json)" : "",
              static_cast<long long>(info.tensors));
  std::printf("model       %s: H %d, I %d, E %d, top-k %d, %d layers\n", info.model_type.c_str(),
              info.hidden, info.intermediate, info.num_experts, info.top_k, info.num_layers);
  const RoutingConfig& r = info.routing;
  std::printf("routing     %s", std::string(to_string(r.method)).c_str());
  if (r.method == RoutingMethod::deepseek_v3)
    std::printf(", n_group %d, topk_group %d, scale %g", r.n_group, r.topk_group,
                r.routed_scaling_factor);
  if (r.method == RoutingMethod::softmax_topk) std::printf(", renormalize %s", r.renormalize ? "yes" : "no");
  std::printf("%s\n", r.has_bias ? ", router bias" : "");
  std::printf("activation  %s", std::string(to_string(info.activation.kind)).c_str());
  if (info.activation.kind == Activation::swiglu_oai)
    std::printf(" (alpha %g, limit %g)", info.activation.alpha, info.activation.limit);
  std::printf("\nmoe layers  %zu: %s", info.moe_layers.size(), layer_ranges(info.moe_layers).c_str());
  if (!info.moe_layers.empty()) std::printf(" (prefix %s)", info.moe_layers.front().prefix.c_str());
  std::printf("\n");
  int complete = 0;
  for (const auto& l : info.moe_layers) complete += l.missing_count == 0;
  std::printf("experts     %d per layer; %d of %zu layers complete\n", info.num_experts, complete,
              info.moe_layers.size());
  for (const auto& w : info.warnings) std::printf("warning     %s\n", w.c_str());
  if (opt.layer >= 0) print_layer(opt);
}

}  // namespace

void add_inspect_command(CLI::App& app) {
  auto opt = std::make_shared<InspectOptions>();
  CLI::App* cmd = app.add_subcommand(
      "inspect", "Describe an FP4 checkpoint: format, MoE layers, experts, scales, problems found");
  cmd->add_option("--checkpoint", opt->checkpoint, "Checkpoint directory (holding config.json)")
      ->required();
  cmd->add_option("--layer", opt->layer_text, "Also load this layer and summarize its scales");
  cmd->callback([opt] { run_inspect(*opt); });
}

}  // namespace fp4moe::cli
