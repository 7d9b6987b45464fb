// Writes the seed corpora: for fuzz_safetensors into argv[1] (small valid safetensors files of every
// dtype, scalars, empty tensors, metadata, an index file, and the hostile classes: oversized shape
// and offset claims, offsets that overflow, a header length past the file, deep nesting), and, when
// argv[2] is given, for fuzz_checkpoint_config there (config.json / hf_quant_config.json / index
// texts separated by "\n----\n": each supported model type, and configs that claim a billion
// experts, negative or fractional sizes, huge floats, a NaN-like field, deep nesting).
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/safetensors.h"

namespace st = fp4moe::st;

int main(int argc, char** argv) {
  if (argc != 2 && argc != 3) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR [CONFIG_CORPUS_DIR]\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir(argv[1]);
  std::filesystem::create_directories(dir);
  auto bytes = [](size_t n, uint8_t seed) {
    std::vector<uint8_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + 37 * i);
    return b;
  };
  std::vector<std::vector<st::TensorToWrite>> seeds;
  seeds.push_back({{"a", st::Dtype::f32, {2, 3}, bytes(24, 1)},
                   {"b", st::Dtype::bf16, {3}, bytes(6, 2)},
                   {"c", st::Dtype::f16, {1, 2}, bytes(4, 3)}});
  seeds.push_back({{"model.layers.0.mlp.experts.0.up_proj.weight", st::Dtype::u8, {4, 8}, bytes(32, 4)},
                   {"model.layers.0.mlp.experts.0.up_proj.weight_scale", st::Dtype::f8_e4m3, {4, 1},
                    bytes(4, 5)},
                   {"model.layers.0.mlp.experts.0.up_proj.weight_scale_2", st::Dtype::f32, {},
                    bytes(4, 6)}});
  seeds.push_back({{"empty", st::Dtype::i64, {0, 5}, {}}, {"s", st::Dtype::f64, {}, bytes(8, 7)}});
  seeds.push_back({});
  int n = 0;
  for (const auto& s : seeds) {
    const auto image = st::serialize(s, n == 0 ? std::map<std::string, std::string>{{"format", "pt"}}
                                               : std::map<std::string, std::string>{});
    std::ofstream(dir / ("seed" + std::to_string(n++) + ".safetensors"), std::ios::binary)
        .write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  }
  // Hostile headers: each a class the reader must refuse with an error, not a crash or allocation.
  auto raw = [&](const std::string& name, const std::string& header, size_t data_bytes, uint64_t len_delta = 0) {
    std::string image(8, '\0');
    const uint64_t n = header.size() + len_delta;
    for (int i = 0; i < 8; ++i) image[size_t(i)] = char(uint8_t(n >> (8 * i)));
    image += header;
    image.append(data_bytes, '\x11');
    std::ofstream(dir / name, std::ios::binary) << image;
  };
  raw("huge_shape.safetensors", R"({"t":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,16]}})", 16);
  raw("overflow_offsets.safetensors", R"({"t":{"dtype":"U8","shape":[16],"data_offsets":[18446744073709551600,16]}})", 16);
  raw("past_end.safetensors", R"({"t":{"dtype":"U8","shape":[1000000],"data_offsets":[0,1000000]}})", 8);
  raw("negative_dim.safetensors", R"({"t":{"dtype":"U8","shape":[-8],"data_offsets":[0,8]}})", 8);
  raw("fraction_dim.safetensors", R"({"t":{"dtype":"U8","shape":[2.5],"data_offsets":[0,2]}})", 2);
  raw("header_past_file.safetensors", R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", 1, 1000);
  raw("overlap.safetensors", R"({"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})", 12);
  raw("deep.safetensors", std::string(40, '[') + std::string(40, ']'), 0);
  std::ofstream(dir / "index.json")
      << R"({"metadata": {"total_size": 64}, "weight_map": {"a": "model-00001-of-00002.safetensors",)"
         R"( "b": "model-00002-of-00002.safetensors"}})";
  std::ofstream(dir / "index_escape.json")
      << R"({"weight_map": {"a": "../outside.safetensors", "b": "/etc/passwd", "c": ""}})";
  if (argc < 3) return 0;

  const std::filesystem::path cdir(argv[2]);
  std::filesystem::create_directories(cdir);
  const std::string sep = "\n----\n";
  const std::string index =
      R"({"weight_map": {"model.layers.3.mlp.experts.7.up_proj.weight": "a.safetensors",)"
      R"( "model.layers.3.mlp.experts.gate_up_proj_blocks": "b.safetensors",)"
      R"( "language_model.model.layers.12.feed_forward.experts.0.down_proj.weight": "a.safetensors",)"
      R"( "layers.99999999999.mlp.experts.99999999999.x": "a.safetensors"}})";
  const std::string modelopt = R"({"quantization": {"quant_algo": "NVFP4", "group_size": 16}})";
  const std::vector<std::pair<std::string, std::string>> configs = {
      {"qwen3", R"({"model_type": "qwen3_moe", "hidden_size": 2048, "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": true})" + sep + modelopt + sep + index},
      {"deepseek", R"({"model_type": "deepseek_v3", "hidden_size": 7168, "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5, "quantization_config": {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized", "config_groups": {"g": {"weights": {"num_bits": 4, "group_size": 16}}}}})" + sep + sep + index},
      {"gpt_oss", R"({"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880, "num_local_experts": 32, "experts_per_token": 4, "swiglu_limit": 7.0, "quantization_config": {"quant_method": "mxfp4"}})"},
      {"llama4", R"({"model_type": "llama4", "text_config": {"model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "num_local_experts": 16, "num_experts_per_tok": 1}, "quantization_config": {"quant_method": "modelopt", "quant_algo": "NVFP4"}})"},
      {"billion_experts", R"({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 1000000000, "num_experts_per_tok": 2})" + sep + modelopt},
      {"huge_sizes", R"({"model_type": "mixtral", "hidden_size": 1073741823, "intermediate_size": 1073741823, "num_local_experts": 1073741823, "num_experts_per_tok": 32})" + sep + modelopt},
      {"negative", R"({"model_type": "qwen3_moe", "hidden_size": -64, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2})" + sep + modelopt},
      {"fraction", R"({"model_type": "qwen3_moe", "hidden_size": 64.5, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2})" + sep + modelopt},
      {"huge_float", R"({"model_type": "glm4_moe", "hidden_size": 64, "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2, "routed_scaling_factor": 1e300, "n_group": 0})" + sep + modelopt},
      {"u64", R"({"model_type": "qwen3_moe", "hidden_size": 18446744073709551615, "moe_intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2})" + sep + modelopt},
      {"deep", std::string(40, '[') + std::string(40, ']') + sep + modelopt},
      {"not_object", R"([1, 2, 3])" + sep + R"("x")" + sep + R"({"weight_map": []})"},
  };
  for (const auto& [name, text] : configs) std::ofstream(cdir / (name + ".txt"), std::ios::binary) << text;
  return 0;
}
