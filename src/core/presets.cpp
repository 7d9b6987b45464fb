// The model presets of SPEC "Model presets". Routing parameters follow each model's config.json:
// DeepSeek-V3 n_group 8 / topk_group 4 / scale 2.5; Kimi-K2 one group, scale 2.827; GLM-4.5 one
// group, scale 2.5 (its config has n_group 1, topk_group 1). All three carry the
// e_score_correction_bias, gpt-oss a router bias.
#include "fp4moe/presets.h"

#include <array>
#include <string>

#include "fp4moe/error.h"

namespace fp4moe {
namespace {

constexpr RoutingConfig softmax_topk() {
  RoutingConfig r;
  r.method = RoutingMethod::softmax_topk;
  r.renormalize = true;
  return r;
}

constexpr RoutingConfig deepseek(int n_group, int topk_group, float scale) {
  RoutingConfig r;
  r.method = RoutingMethod::deepseek_v3;
  r.n_group = n_group;
  r.topk_group = topk_group;
  r.routed_scaling_factor = scale;
  r.has_bias = true;
  return r;
}

constexpr RoutingConfig topk_softmax_with_bias() {
  RoutingConfig r;
  r.method = RoutingMethod::topk_softmax;
  r.has_bias = true;
  return r;
}

constexpr RoutingConfig llama4() {
  RoutingConfig r;
  r.method = RoutingMethod::llama4;
  return r;
}

constexpr ActivationConfig act(Activation kind) {
  ActivationConfig a;
  a.kind = kind;
  return a;
}

constexpr Activation kSwiglu = Activation::swiglu;
constexpr Activation kOai = Activation::swiglu_oai;

const std::array<Preset, 11> kPresets{{
    {"deepseek-v3", 7168, 2048, 256, 8, deepseek(8, 4, 2.5f), act(kSwiglu), Format::nvfp4, false,
     "1 shared expert"},
    {"kimi-k2", 7168, 2048, 384, 8, deepseek(1, 1, 2.827f), act(kSwiglu), Format::nvfp4, false,
     "1 shared expert"},
    {"qwen3-30b-a3b", 2048, 768, 128, 8, softmax_topk(), act(kSwiglu), Format::nvfp4, false, ""},
    {"qwen3-235b-a22b", 4096, 1536, 128, 8, softmax_topk(), act(kSwiglu), Format::nvfp4, false, ""},
    {"qwen3-next-80b-a3b", 2048, 512, 512, 10, softmax_topk(), act(kSwiglu), Format::nvfp4, false,
     "gated shared expert"},
    {"gpt-oss-20b", 2880, 2880, 32, 4, topk_softmax_with_bias(), act(kOai), Format::mxfp4, true,
     "swiglu_oai, biases, MXFP4"},
    {"gpt-oss-120b", 2880, 2880, 128, 4, topk_softmax_with_bias(), act(kOai), Format::mxfp4, true,
     "swiglu_oai, biases, MXFP4"},
    {"llama4-scout", 5120, 8192, 16, 1, llama4(), act(kSwiglu), Format::nvfp4, false,
     "shared expert"},
    {"llama4-maverick", 5120, 8192, 128, 1, llama4(), act(kSwiglu), Format::nvfp4, false,
     "shared expert"},
    {"mixtral-8x7b", 4096, 14336, 8, 2, softmax_topk(), act(kSwiglu), Format::nvfp4, false, ""},
    {"glm-4.5", 5120, 1536, 160, 8, deepseek(1, 1, 2.5f), act(kSwiglu), Format::nvfp4, false,
     "1 shared expert"},
}};

}  // namespace

MoeProblem Preset::problem(int64_t tokens) const {
  MoeProblem p;
  p.tokens = tokens;
  p.hidden = hidden;
  p.intermediate = intermediate;
  p.num_experts = num_experts;
  p.top_k = top_k;
  p.format = format;
  p.activation = activation;
  p.routing = routing;
  p.has_bias = has_bias;
  return p;
}

std::span<const Preset> presets() { return kPresets; }

const Preset& find_preset(std::string_view name) {
  for (const Preset& p : kPresets)
    if (p.name == name) return p;
  std::string known;
  for (const Preset& p : kPresets) {
    if (!known.empty()) known += ", ";
    known += p.name;
  }
  FP4MOE_FAIL("unknown preset '" << name << "'; known presets: " << known);
}

}  // namespace fp4moe
