// Loading the MoE layers of FP4 checkpoints (safetensors, single file or sharded) into an MoeProblem,
// MoeWeights and the layer's router, so a layer can run from hidden states. Supported (docs/checkpoints.md):
//  - ModelOpt NVFP4 (hf_quant_config.json quant_algo NVFP4, group_size 16), per-expert tensors
//    weight / weight_scale / weight_scale_2 (decode direction) / input_scale;
//  - compressed-tensors NVFP4 (config.json quantization_config, format nvfp4-pack-quantized),
//    weight_packed / weight_scale / weight_global_scale (encode direction) / input_global_scale;
//  - gpt-oss MXFP4 in the Hugging Face layout (fused gate_up_proj_blocks with interleaved rows).
// Routing, activation and sizes come from config.json (model_type / architectures).
// Every file is validated before use: a damaged or hostile checkpoint gives an fp4moe::Error naming
// the file and tensor, never a crash or an out-of-bounds read.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "fp4moe/problem.h"
#include "fp4moe/weights.h"

namespace fp4moe {

enum class CheckpointFormat : uint8_t {
  modelopt_nvfp4,            // NVIDIA ModelOpt export
  compressed_tensors_nvfp4,  // llm-compressor / compressed-tensors "nvfp4-pack-quantized"
  gpt_oss_mxfp4,             // OpenAI gpt-oss, Hugging Face layout
};
std::string_view to_string(CheckpointFormat);

// One layer holding routed experts.
struct CheckpointLayer {
  int layer = 0;
  std::string prefix;               // tensor-name prefix of the MoE block, e.g. "model.layers.3.mlp."
  int experts_found = 0;            // distinct expert indices with tensors in the files
  int64_t missing_count = 0;        // experts in [0, E) with no tensors (a damaged or partial export)
  std::vector<int> missing_experts; // the first of them (at most 64), ascending
};

struct CheckpointInfo {
  std::string dir;
  CheckpointFormat format = CheckpointFormat::modelopt_nvfp4;
  Format fp4 = Format::nvfp4;
  // Direction of the per-tensor scales as stored in the files (loaders convert to decode).
  ScaleDirection stored_scale_direction = ScaleDirection::decode;
  std::string model_type;      // config.json model_type (text_config's for multimodal models)
  int hidden = 0, intermediate = 0, num_experts = 0, top_k = 0, num_layers = 0;
  RoutingConfig routing;       // has_bias reflects the router tensors of the first MoE layer
  ActivationConfig activation;
  int files = 0;               // safetensors files
  bool sharded = false;        // read through model.safetensors.index.json
  int64_t tensors = 0;
  std::vector<CheckpointLayer> moe_layers;
  std::vector<std::string> warnings;  // suspicious findings (missing experts, unusual config, ...)
};

// Reads config.json, the quantization config and every safetensors header; reads no tensor data.
CheckpointInfo inspect_checkpoint(const std::string& dir);

struct LoadOptions {
  InputMode input_mode = InputMode::w4a16;  // w4a4 needs NVFP4 input scales in the checkpoint
  int local_expert_offset = 0;              // expert parallelism: load only experts
  int num_local_experts = 0;                //   [offset, offset + num); 0 loads all E
};

struct LoadedLayer {
  MoeProblem problem;                // sizes, routing, activation from config.json; `tokens` as asked
  MoeWeights weights;                // standard layout, global scales in the decode direction
  std::vector<float> router_weight;  // [E, H]
  std::vector<float> router_bias;    // [E]: router bias (gpt-oss) or e_score_correction_bias
                                     // (DeepSeek); empty unless problem.routing.has_bias
  std::vector<std::string> warnings; // e.g. gate/up global scales that differ, negative block scales
};

// Loads the routed experts and router of `layer`. Throws fp4moe::Error naming the file and tensor
// for a missing, misshapen or mistyped tensor or a NaN block scale (with its expert, row and
// block), and listing the MoE layers when `layer` has none.
LoadedLayer load_moe_layer(const std::string& dir, int layer, int64_t tokens,
                           const LoadOptions& options = {});

// Router logits [T, E] in fp32: x[T, H] (bf16 bits) times router_weight^T, accumulated in fp64.
std::vector<float> router_logits(const LoadedLayer& layer, const uint16_t* x, int64_t tokens);

}  // namespace fp4moe
