#include "problem_flags.h"

#include <string_view>

#include "fp4moe/error.h"
#include "fp4moe/presets.h"
#include "numbers.h"

namespace fp4moe::cli {

void apply_experts_local(const std::string& text_in, MoeProblem& p) {
  if (text_in.empty()) return;
  const size_t colon = text_in.find(':');
  FP4MOE_CHECK(colon != std::string::npos, "--experts-local expects OFFSET:COUNT, got '" << text_in << "'");
  const std::string_view text = text_in;
  p.local_expert_offset =
      parse_integer<int>(text.substr(0, colon), "--experts-local OFFSET (of OFFSET:COUNT)", 0, INT32_MAX);
  p.num_local_experts =
      parse_integer<int>(text.substr(colon + 1), "--experts-local COUNT (of OFFSET:COUNT)", 1, INT32_MAX);
  FP4MOE_CHECK(p.num_local_experts > 0, "--experts-local COUNT must be positive, got " << p.num_local_experts);
}

MoeProblem preset_problem(const std::string& name, int64_t tokens, const ProblemFlags& f) {
  const Preset& preset = find_preset(name);
  MoeProblem p = preset.problem(tokens);
  if (!f.routing.empty()) {
    const RoutingMethod m = parse_routing(f.routing);
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
  if (!f.format.empty()) p.format = parse_format(f.format);
  p.input_mode = parse_input_mode(f.input_mode);
  apply_experts_local(f.experts_local, p);
  p.batch_invariant = f.batch_invariant;
  p.validate();
  return p;
}

}  // namespace fp4moe::cli
