// The model presets of SPEC "Model presets", as data, in one place.
#pragma once
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "fp4moe/problem.h"

namespace fp4moe {

struct Preset {
  std::string_view name;
  int hidden, intermediate, num_experts, top_k;
  RoutingConfig routing;
  ActivationConfig activation;
  Format format;       // the format the model ships in
  bool has_bias;       // per-expert biases (gpt-oss)
  std::string_view notes;

  // A problem for `tokens` tokens with this preset's shapes, routing and activation.
  MoeProblem problem(int64_t tokens) const;
};

std::span<const Preset> presets();
// Throws fp4moe::Error listing the known names when `name` is unknown.
const Preset& find_preset(std::string_view name);

}  // namespace fp4moe
