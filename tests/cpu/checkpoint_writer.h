// Test checkpoints: small MoE checkpoints written exactly as their producers store them (tensor
// names, dtypes, shapes, config.json, hf_quant_config.json), from random weights quantized with the
// library's quantizer, in a temporary directory.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/weights.h"

namespace fp4moe::test {

// A fresh directory under the system temporary directory, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

struct TestModel {
  CheckpointFormat format = CheckpointFormat::modelopt_nvfp4;
  // qwen3_moe, deepseek_v3, mixtral (w1/w2/w3 names under block_sparse_moe), gpt_oss, llama4
  std::string model_type = "qwen3_moe";
  int hidden = 64, intermediate = 32, num_experts = 4, top_k = 2;
  int num_layers = 3;
  std::vector<int> moe_layers = {1, 2};  // the others get a dense MLP (bf16)
  bool sharded = false;                  // two shards and model.safetensors.index.json
  uint64_t seed = 1;
};

// What was written for one MoE layer, in the library's terms: weights exactly as stored (global
// scales in the decode direction, converted the way loaders must), router as stored, and the
// problem the model's config describes (tokens = 0).
struct WrittenLayer {
  MoeProblem problem;
  MoeWeights weights;
  std::vector<float> router_weight;  // [E, H]
  std::vector<float> router_bias;    // [E] or empty
};

struct WrittenCheckpoint {
  std::map<int, WrittenLayer> layers;
  std::map<std::string, st::TensorToWrite> tensors;  // every tensor written, by name
  std::map<std::string, std::string> shard_of;       // tensor name -> file name
};

WrittenCheckpoint write_test_checkpoint(const std::string& dir, const TestModel& model);

// Rewrites one tensor of a written checkpoint in place (same file, same header), for damage tests.
void overwrite_tensor_bytes(const std::string& dir, const WrittenCheckpoint& ckpt,
                            const std::string& name, const std::vector<uint8_t>& bytes);

}  // namespace fp4moe::test
