// Internal to the checkpoint loaders: what config.json and the quantization config say about a
// model, and where its MoE layers are in the tensor names.
#pragma once
#include <map>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "fp4moe/checkpoint.h"

namespace fp4moe::ckpt {

struct ModelSpec {
  CheckpointFormat format = CheckpointFormat::modelopt_nvfp4;
  std::string model_type;
  int hidden = 0, intermediate = 0, num_experts = 0, top_k = 0, num_layers = 0;
  RoutingConfig routing;  // has_bias left false: it depends on the router tensors present
  ActivationConfig activation;
  std::vector<std::string> warnings;
};

// Reads DIR/config.json and DIR/hf_quant_config.json (when present); throws naming the file for a
// missing file, invalid JSON, a missing size, or an unsupported model type or quantization.
ModelSpec read_model_spec(const std::string& dir);

// The same from texts already read: `config` is config.json, `hf_quant` hf_quant_config.json (null
// when the directory has none). `name` stands for the file in error messages. Reads no file (the
// fuzzer calls it directly).
struct ConfigText {
  std::string name;
  std::string text;
};
ModelSpec parse_model_spec(const std::string& dir, const ConfigText& config, const ConfigText* hf_quant);

// Layers whose tensor names contain routed experts ("<prefix>experts.<e>." or gpt-oss's fused
// "<prefix>experts.gate_up_proj_blocks"), keyed by layer index.
struct LayerTensors {
  std::string prefix;  // up to and including the MoE block's dot, e.g. "model.layers.3.mlp."
  std::map<int, int> experts;  // expert index -> tensor count (per-expert layouts)
  bool fused = false;          // gpt-oss layout: all experts in one tensor per projection
};
std::map<int, LayerTensors> scan_layers(const st::Checkpoint& c);
std::map<int, LayerTensors> scan_layers(const std::vector<std::string>& tensor_names);

}  // namespace fp4moe::ckpt
