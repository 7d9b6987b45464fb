// `fp4moe presets`: the model presets as a fixed-width table.
#include <cstdio>
#include <sstream>
#include <string>

#include "commands.h"
#include "fp4moe/presets.h"

namespace fp4moe::cli {
namespace {

std::string routing_summary(const RoutingConfig& r) {
  std::ostringstream s;
  s << to_string(r.method);
  switch (r.method) {
    case RoutingMethod::deepseek_v3:
      s << " g" << r.n_group << "/" << r.topk_group << " x" << r.routed_scaling_factor;
      break;
    case RoutingMethod::softmax_topk:
    case RoutingMethod::sigmoid_topk:
      if (!r.renormalize) s << " no-renorm";
      break;
    default:
      break;
  }
  if (r.has_bias) s << " +bias";
  return s.str();
}

void print_presets() {
  std::printf("%-20s %5s %6s %4s %3s  %-30s %-11s %-6s %s\n", "preset", "H", "I", "E", "k",
              "routing", "activation", "format", "notes");
  for (const Preset& p : presets()) {
    char line[256];
    std::snprintf(line, sizeof line, "%-20.*s %5d %6d %4d %3d  %-30s %-11.*s %-6.*s %.*s",
                static_cast<int>(p.name.size()), p.name.data(), p.hidden, p.intermediate,
                p.num_experts, p.top_k, routing_summary(p.routing).c_str(),
                static_cast<int>(to_string(p.activation.kind).size()),
                to_string(p.activation.kind).data(), static_cast<int>(to_string(p.format).size()),
                to_string(p.format).data(), static_cast<int>(p.notes.size()), p.notes.data());
    std::string text(line);
    text.erase(text.find_last_not_of(' ') + 1);
    std::printf("%s\n", text.c_str());
  }
  std::printf("\nrouting: deepseek_v3 gN/M xS = n_group N, topk_group M, routed_scaling_factor S; "
              "+bias = router bias (gpt-oss) or e_score_correction_bias (DeepSeek family).\n");
}

}  // namespace

void add_presets_command(CLI::App& app) {
  CLI::App* cmd = app.add_subcommand("presets", "List the model presets (shapes, routing, format)");
  cmd->callback(print_presets);
}

}  // namespace fp4moe::cli
