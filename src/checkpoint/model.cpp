#include "checkpoint/model.h"

#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>

#include "fp4moe/error.h"

namespace fp4moe::ckpt {
namespace {

using json = nlohmann::json;

// Largest config.json / hf_quant_config.json accepted (real ones are a few kB).
constexpr uint64_t kMaxConfigBytes = 64u << 20;

json parse_json_text(std::string_view text, const std::string& path) {
  st::check_json_depth(text, path);
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    FP4MOE_FAIL(path << ": not valid JSON (" << e.what() << ")");
  }
}

// A non-negative integer field; `keys` are tried in order (models spell some fields differently).
int get_int(const json& cfg, std::initializer_list<const char*> keys, const std::string& file,
            std::optional<int> fallback = {}) {
  for (const char* k : keys) {
    const auto it = cfg.find(k);
    if (it == cfg.end() || it->is_null()) continue;
    FP4MOE_CHECK(it->is_number_integer() && it->get<int64_t>() >= 0 && it->get<int64_t>() < (1 << 30),
                 file << ": \"" << k << "\" must be a non-negative integer, found " << it->dump());
    return static_cast<int>(it->get<int64_t>());
  }
  if (fallback) return *fallback;
  std::string names;
  for (const char* k : keys) names += std::string(names.empty() ? "" : " or ") + "\"" + k + "\"";
  FP4MOE_FAIL(file << ": no " << names << "; the loader needs it to size the MoE layer");
}

float get_float(const json& cfg, const char* key, float fallback, const std::string& file) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  FP4MOE_CHECK(it->is_number(), file << ": \"" << key << "\" must be a number, found " << it->dump());
  const double d = it->get<double>();
  FP4MOE_CHECK(std::isfinite(d) && std::fabs(d) <= 3.0e38,
               file << ": \"" << key << "\" must be a finite number within the float range, found "
                    << it->dump());
  return static_cast<float>(d);
}

bool get_bool(const json& cfg, const char* key, bool fallback, const std::string& file) {
  const auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return fallback;
  FP4MOE_CHECK(it->is_boolean(), file << ": \"" << key << "\" must be true or false");
  return it->get<bool>();
}

std::string get_string(const json& cfg, const char* key) {
  const auto it = cfg.find(key);
  return it != cfg.end() && it->is_string() ? it->get<std::string>() : std::string();
}

bool has_architecture(const json& cfg, std::string_view needle) {
  const auto it = cfg.find("architectures");
  if (it == cfg.end() || !it->is_array()) return false;
  for (const auto& a : *it)
    if (a.is_string() && a.get<std::string>().find(needle) != std::string::npos) return true;
  return false;
}

void read_quantization(const std::string& dir, const json& cfg, const std::string& cfg_path,
                       const ConfigText* hf_quant_file, ModelSpec& spec) {
  json modelopt;  // the "quantization" object of a ModelOpt export
  std::string modelopt_file;
  if (hf_quant_file != nullptr) {
    const std::string& hf_quant = hf_quant_file->name;
    const json q = parse_json_text(hf_quant_file->text, hf_quant);
    FP4MOE_CHECK(q.is_object() && q.contains("quantization") && q["quantization"].is_object(),
                 hf_quant << ": no \"quantization\" object; not a ModelOpt export");
    modelopt = q["quantization"];
    modelopt_file = hf_quant;
  }
  const auto qc = cfg.find("quantization_config");
  const bool has_qc = qc != cfg.end() && qc->is_object();
  const std::string method = has_qc ? get_string(*qc, "quant_method") : "";
  if (modelopt.is_null() && method == "modelopt") {
    modelopt = *qc;
    modelopt_file = cfg_path + " (quantization_config)";
  }
  if (!modelopt.is_null()) {
    const std::string algo = get_string(modelopt, "quant_algo");
    FP4MOE_CHECK(algo == "NVFP4", modelopt_file << ": quant_algo \"" << algo
                                                << "\" is not supported (supported: NVFP4)");
    const int group = get_int(modelopt, {"group_size"}, modelopt_file, 16);
    FP4MOE_CHECK(group == 16, modelopt_file << ": NVFP4 group_size " << group
                                            << " is not supported (NVFP4 blocks are 16)");
    spec.format = CheckpointFormat::modelopt_nvfp4;
    return;
  }
  FP4MOE_CHECK(has_qc, dir << ": no FP4 quantization found: neither hf_quant_config.json (ModelOpt) "
                              "nor a quantization_config in config.json (compressed-tensors, mxfp4)");
  if (method == "mxfp4") {
    spec.format = CheckpointFormat::gpt_oss_mxfp4;
    return;
  }
  if (method == "compressed-tensors") {
    const std::string fmt = get_string(*qc, "format");
    FP4MOE_CHECK(fmt == "nvfp4-pack-quantized",
                 cfg_path << ": compressed-tensors format \"" << fmt
                          << "\" is not supported (supported: nvfp4-pack-quantized)");
    const auto groups = qc->find("config_groups");
    if (groups != qc->end() && groups->is_object()) {
      for (const auto& [name, g] : groups->items()) {
        if (!g.is_object() || !g.contains("weights") || !g["weights"].is_object()) continue;
        const json& w = g["weights"];
        const int bits = get_int(w, {"num_bits"}, cfg_path, 4);
        const int group = get_int(w, {"group_size"}, cfg_path, 16);
        FP4MOE_CHECK(bits == 4 && group == 16,
                     cfg_path << ": compressed-tensors config group \"" << name << "\" has num_bits "
                              << bits << ", group_size " << group
                              << "; only NVFP4 (4 bits, groups of 16) is supported");
      }
    }
    spec.format = CheckpointFormat::compressed_tensors_nvfp4;
    return;
  }
  FP4MOE_FAIL(cfg_path << ": quantization_config.quant_method \"" << method
                       << "\" is not supported (supported: modelopt NVFP4, compressed-tensors "
                          "nvfp4-pack-quantized, mxfp4)");
}

}  // namespace

ModelSpec read_model_spec(const std::string& dir) {
  namespace fs = std::filesystem;
  std::error_code ec;
  ConfigText config{(fs::path(dir) / "config.json").string(), {}};
  FP4MOE_CHECK(fs::exists(config.name, ec),
               config.name << " is missing; the loader needs the model's config.json next to its weights");
  config.text = st::read_text_file(config.name, kMaxConfigBytes);
  ConfigText hf_quant{(fs::path(dir) / "hf_quant_config.json").string(), {}};
  const bool has_hf_quant = fs::exists(hf_quant.name, ec);
  if (has_hf_quant) hf_quant.text = st::read_text_file(hf_quant.name, kMaxConfigBytes);
  return parse_model_spec(dir, config, has_hf_quant ? &hf_quant : nullptr);
}

ModelSpec parse_model_spec(const std::string& dir, const ConfigText& config,
                           const ConfigText* hf_quant) {
  const std::string& path = config.name;
  const json root = parse_json_text(config.text, path);
  FP4MOE_CHECK(root.is_object(), path << ": must be a JSON object");
  // Multimodal models (Llama 4) keep the language model's fields in text_config.
  const json& cfg = root.contains("text_config") && root["text_config"].is_object()
                        ? root["text_config"] : root;

  ModelSpec s;
  s.model_type = get_string(cfg, "model_type");
  if (s.model_type.empty()) s.model_type = get_string(root, "model_type");
  const std::string& mt = s.model_type;
  read_quantization(dir, root, path, hf_quant, s);

  s.hidden = get_int(cfg, {"hidden_size"}, path);
  s.intermediate = get_int(cfg, {"moe_intermediate_size", "intermediate_size"}, path);
  s.num_experts = get_int(cfg, {"n_routed_experts", "num_experts", "num_local_experts"}, path);
  s.top_k = get_int(cfg, {"num_experts_per_tok", "experts_per_token", "moe_topk"}, path);
  s.num_layers = get_int(cfg, {"num_hidden_layers"}, path, 0);

  RoutingConfig& r = s.routing;
  auto is = [&](std::initializer_list<const char*> types, const char* arch) {
    for (const char* t : types)
      if (mt == t) return true;
    return has_architecture(root, arch);
  };
  if (is({"deepseek_v3", "kimi_k2", "glm4_moe"}, "DeepseekV3") || has_architecture(root, "Glm4Moe")) {
    r.method = RoutingMethod::deepseek_v3;
    // Missing fields take the defaults of transformers' config classes: DeepseekV3Config (also
    // what Kimi-K2 loads as) groups 8 / 4 and scales by 2.5, Glm4MoeConfig neither; both
    // normalize (norm_topk_prob true).
    const bool glm = mt == "glm4_moe" || has_architecture(root, "Glm4Moe");
    r.n_group = get_int(cfg, {"n_group"}, path, glm ? 1 : 8);
    r.topk_group = get_int(cfg, {"topk_group"}, path, glm ? 1 : 4);
    r.routed_scaling_factor = get_float(cfg, "routed_scaling_factor", glm ? 1.0f : 2.5f, path);
    r.renormalize = get_bool(cfg, "norm_topk_prob", true, path);
  } else if (is({"qwen3_moe", "qwen2_moe", "qwen3_next"}, "Qwen3Moe") ||
             has_architecture(root, "Qwen2Moe") || has_architecture(root, "Qwen3Next")) {
    r.method = RoutingMethod::softmax_topk;
    // Qwen2MoeConfig / Qwen3MoeConfig default norm_topk_prob to false, Qwen3NextConfig to true.
    const bool next = mt == "qwen3_next" || has_architecture(root, "Qwen3Next");
    r.renormalize = get_bool(cfg, "norm_topk_prob", next, path);
  } else if (is({"mixtral"}, "Mixtral")) {
    r.method = RoutingMethod::softmax_topk;
    r.renormalize = true;
  } else if (is({"gpt_oss"}, "GptOss")) {
    r.method = RoutingMethod::topk_softmax;
  } else if (is({"llama4", "llama4_text"}, "Llama4")) {
    r.method = RoutingMethod::llama4;
  } else {
    FP4MOE_FAIL(path << ": model_type \"" << mt
                     << "\" is not supported (supported: deepseek_v3, kimi_k2, glm4_moe, qwen3_moe, "
                        "qwen2_moe, qwen3_next, mixtral, gpt_oss, llama4)");
  }

  if (r.method == RoutingMethod::topk_softmax) {
    s.activation.kind = Activation::swiglu_oai;
    s.activation.limit = get_float(cfg, "swiglu_limit", 7.0f, path);
  } else {
    const std::string act = get_string(cfg, "hidden_act");
    if (act.empty() || act == "silu" || act == "swish") {
      s.activation.kind = Activation::swiglu;
    } else if (act == "gelu_pytorch_tanh" || act == "gelu_tanh") {
      s.activation.kind = Activation::geglu_tanh;
    } else if (act == "relu2") {
      s.activation.kind = Activation::relu2;
    } else {
      FP4MOE_FAIL(path << ": hidden_act \"" << act
                       << "\" is not supported (supported: silu, gelu_pytorch_tanh, relu2)");
    }
  }
  if (s.format == CheckpointFormat::gpt_oss_mxfp4 && r.method != RoutingMethod::topk_softmax)
    s.warnings.push_back(path + ": mxfp4 quantization on a model that is not gpt_oss; the loader "
                                "expects the gpt-oss tensor layout");
  return s;
}

std::map<int, LayerTensors> scan_layers(const st::Checkpoint& c) { return scan_layers(c.names()); }

std::map<int, LayerTensors> scan_layers(const std::vector<std::string>& names) {
  std::map<int, LayerTensors> out;
  for (const std::string& name : names) {
    // "<...>layers.<L>.<block>.experts.<rest>"
    size_t lp = name.rfind("layers.", name.find(".experts."));
    const size_t ep = name.find(".experts.");
    if (ep == std::string::npos || lp == std::string::npos || lp > ep) continue;
    if (lp > 0 && name[lp - 1] != '.') continue;
    size_t p = lp + 7, digits = 0;
    int layer = 0;
    while (p < name.size() && std::isdigit(static_cast<unsigned char>(name[p])) && digits < 7) {
      layer = layer * 10 + (name[p] - '0');
      ++p;
      ++digits;
    }
    if (digits == 0 || p >= name.size() || name[p] != '.') continue;
    LayerTensors& lt = out[layer];
    const std::string prefix = name.substr(0, ep + 1);
    if (lt.prefix.empty()) lt.prefix = prefix;
    if (lt.prefix != prefix) continue;  // a second expert block in one layer is not a layout we know
    const std::string rest = name.substr(ep + 9);
    size_t q = 0;
    int expert = 0;
    while (q < rest.size() && q < 7 && std::isdigit(static_cast<unsigned char>(rest[q]))) {
      expert = expert * 10 + (rest[q] - '0');
      ++q;
    }
    if (q > 0 && q < rest.size() && rest[q] == '.') {
      ++lt.experts[expert];
    } else if (rest.rfind("gate_up_proj", 0) == 0 || rest.rfind("down_proj", 0) == 0) {
      lt.fused = true;
    }
  }
  for (auto it = out.begin(); it != out.end();) {
    if (it->second.experts.empty() && !it->second.fused) it = out.erase(it);
    else ++it;
  }
  return out;
}

}  // namespace fp4moe::ckpt
