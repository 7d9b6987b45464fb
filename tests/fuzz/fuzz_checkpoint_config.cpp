// libFuzzer target for the checkpoint's JSON side: config.json (+ hf_quant_config.json) through
// parse_model_spec, the problem it describes through MoeProblem::validate, and an index's weight_map
// through parse_index and the layer scanner. The input holds up to three texts separated by a line
// "----": config.json, hf_quant_config.json (absent when there is no second part, empty when it is
// empty) and model.safetensors.index.json. Any input must either be accepted or throw fp4moe::Error;
// any other exception, a crash, a hang or an allocation past -rss_limit_mb is a bug.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "checkpoint/model.h"
#include "checkpoint/safetensors.h"
#include "fp4moe/error.h"
#include "fp4moe/problem.h"

namespace {

std::vector<std::string_view> split_parts(std::string_view s) {
  std::vector<std::string_view> parts;
  constexpr std::string_view kSep = "\n----\n";
  while (parts.size() < 2) {
    const size_t at = s.find(kSep);
    if (at == std::string_view::npos) break;
    parts.push_back(s.substr(0, at));
    s.remove_prefix(at + kSep.size());
  }
  parts.push_back(s);
  return parts;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const auto parts = split_parts(text);
  using fp4moe::ckpt::ConfigText;
  const ConfigText config{"fuzz/config.json", std::string(parts[0])};
  ConfigText hf_quant{"fuzz/hf_quant_config.json", {}};
  if (parts.size() >= 2) hf_quant.text = std::string(parts[1]);
  try {
    const auto spec = fp4moe::ckpt::parse_model_spec("fuzz", config, parts.size() >= 2 ? &hf_quant : nullptr);
    // The problem load_moe_layer builds from it, checked the way the loader does before any read.
    fp4moe::MoeProblem p;
    p.tokens = 1;
    p.hidden = spec.hidden;
    p.intermediate = spec.intermediate;
    p.num_experts = spec.num_experts;
    p.top_k = spec.top_k;
    p.routing = spec.routing;
    p.activation = spec.activation;
    p.format = spec.format == fp4moe::CheckpointFormat::gpt_oss_mxfp4 ? fp4moe::Format::mxfp4
                                                                       : fp4moe::Format::nvfp4;
    p.validate();
  } catch (const fp4moe::Error&) {
  }
  if (parts.size() == 3) {
    try {
      std::vector<std::string> names;
      for (const auto& [tensor, shard] : fp4moe::st::parse_index(parts[2], "fuzz/index.json")) {
        if (shard.empty() || shard.find('/') != std::string::npos) __builtin_trap();
        names.push_back(tensor);
      }
      for (const auto& [layer, t] : fp4moe::ckpt::scan_layers(names)) {
        if (layer < 0 || t.prefix.empty()) __builtin_trap();
        for (const auto& [e, n] : t.experts)
          if (e < 0 || n <= 0) __builtin_trap();
      }
    } catch (const fp4moe::Error&) {
    }
  }
  return 0;
}
