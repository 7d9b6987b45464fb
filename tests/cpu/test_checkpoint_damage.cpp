// Damaged or unsupported checkpoints at the loader level: each gives an fp4moe::Error naming the file
// and tensor (or the config field), and suspicious values give warnings.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>

#include "cpu/checkpoint_writer.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/error.h"

namespace {

using namespace fp4moe;
using fp4moe::test::TempDir;
using fp4moe::test::TestModel;
using fp4moe::test::WrittenCheckpoint;

// Rewrites the single model.safetensors from `tensors`.
void rewrite(const TempDir& dir, const std::map<std::string, st::TensorToWrite>& tensors) {
  std::vector<st::TensorToWrite> all;
  for (const auto& [name, t] : tensors) all.push_back(t);
  st::write_file(dir.path() + "/model.safetensors", all);
}

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fp4moe::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no fp4moe::Error thrown";
  return {};
}

#define EXPECT_MENTIONS(msg, needle) \
  EXPECT_NE((msg).find(needle), std::string::npos) << "'" << (needle) << "' missing in: " << (msg)

class Damage : public ::testing::Test {
 protected:
  void SetUp() override {
    model.seed = std::random_device{}();
    written = test::write_test_checkpoint(dir.path(), model);
  }
  std::string load(int layer = 1) {
    return error_of([&] { load_moe_layer(dir.path(), layer, 2); });
  }
  TempDir dir;
  TestModel model;
  WrittenCheckpoint written;
  const std::string e1 = "model.layers.1.mlp.experts.1.";
};

TEST_F(Damage, MissingExpertTensorIsNamedAndInspectListsTheExpert) {
  auto t = written.tensors;
  for (const char* proj : {"gate_proj.", "up_proj.", "down_proj."})
    for (const char* n : {"weight", "weight_scale", "weight_scale_2", "input_scale"})
      t.erase(e1 + proj + n);
  rewrite(dir, t);
  const auto msg = load();
  EXPECT_MENTIONS(msg, e1 + "gate_proj.weight");
  const auto info = inspect_checkpoint(dir.path());
  ASSERT_EQ(info.moe_layers.size(), 2u);
  EXPECT_EQ(info.moe_layers[0].missing_experts, std::vector<int>{1});
  EXPECT_EQ(info.moe_layers[0].experts_found, model.num_experts - 1);
  ASSERT_FALSE(info.warnings.empty());
  EXPECT_MENTIONS(info.warnings[0], "layer 1: 1 of 4 experts missing");
}

TEST_F(Damage, PartlyMissingExpertIsFlaggedByInspect) {
  auto t = written.tensors;
  t.erase(e1 + "up_proj.input_scale");
  rewrite(dir, t);
  const auto info = inspect_checkpoint(dir.path());
  ASSERT_EQ(info.warnings.size(), 1u);
  EXPECT_MENTIONS(info.warnings[0], "expert 1 has 11 tensors where the others have 12");
}

TEST_F(Damage, WrongShapeNamesFileTensorAndExpectation) {
  auto t = written.tensors;
  auto& w = t.at(e1 + "down_proj.weight");
  w.shape = {w.shape[1], w.shape[0]};
  rewrite(dir, t);
  const auto msg = load();
  EXPECT_MENTIONS(msg, dir.path() + "/model.safetensors");
  EXPECT_MENTIONS(msg, e1 + "down_proj.weight");
  EXPECT_MENTIONS(msg, "expected U8 [64, 16]");
}

TEST_F(Damage, WrongDtypeNamesTheTensor) {
  auto t = written.tensors;
  auto& s = t.at(e1 + "gate_proj.weight_scale");
  s.dtype = st::Dtype::i16;
  s.shape.back() /= 2;
  rewrite(dir, t);
  const auto msg = load();
  EXPECT_MENTIONS(msg, e1 + "gate_proj.weight_scale");
  EXPECT_MENTIONS(msg, "I16");
}

TEST_F(Damage, NanOrZeroGlobalScaleIsAnError) {
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), 0.0f, -1.0f}) {
    std::vector<uint8_t> b(4);
    std::memcpy(b.data(), &bad, 4);
    test::overwrite_tensor_bytes(dir.path(), written, e1 + "up_proj.weight_scale_2", b);
    const auto msg = load();
    EXPECT_MENTIONS(msg, e1 + "up_proj.weight_scale_2");
    EXPECT_MENTIONS(msg, "finite and positive");
  }
}

TEST_F(Damage, NanBlockScaleIsAnErrorNamingRowAndBlock) {
  // H = 64: 4 scale blocks per row of gate_proj, so byte 5 is row 1, block 1.
  auto s = written.tensors.at(e1 + "gate_proj.weight_scale").bytes;
  s[5] = 0xFF;
  test::overwrite_tensor_bytes(dir.path(), written, e1 + "gate_proj.weight_scale", s);
  const auto msg = load();
  EXPECT_MENTIONS(msg, e1 + "gate_proj.weight_scale");
  EXPECT_MENTIONS(msg, "row 1, block 1");
  EXPECT_MENTIONS(msg, "E4M3 code 0xFF");
  s[5] = 0x7F;  // the positive NaN too; inspect (headers only) still works
  test::overwrite_tensor_bytes(dir.path(), written, e1 + "gate_proj.weight_scale", s);
  EXPECT_MENTIONS(load(), "E4M3 code 0x7F");
  EXPECT_NO_THROW(inspect_checkpoint(dir.path()));
}

TEST_F(Damage, LayerWithoutExpertsListsTheMoeLayers) {
  const auto msg = load(0);
  EXPECT_MENTIONS(msg, "layer 0 has no routed experts");
  EXPECT_MENTIONS(msg, "layers with experts: 1-2");
}

TEST_F(Damage, MissingRouterIsNamed) {
  auto t = written.tensors;
  t.erase("model.layers.1.mlp.gate.weight");
  rewrite(dir, t);
  EXPECT_MENTIONS(load(), "model.layers.1.mlp.gate.weight");
}

TEST_F(Damage, TruncatedShardNamesTheFile) {
  const std::string path = dir.path() + "/model.safetensors";
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 100);
  const auto msg = load();
  EXPECT_MENTIONS(msg, path);
  EXPECT_MENTIONS(msg, "truncated");
}

TEST_F(Damage, ConfigProblemsNameTheFileAndField) {
  const std::string cfg = dir.path() + "/config.json";
  std::ofstream(cfg) << R"({"model_type": "qwen3_moe", "hidden_size": 64})";
  EXPECT_MENTIONS(load(), "\"moe_intermediate_size\" or \"intermediate_size\"");
  std::ofstream(cfg) << R"({"model_type": "bert", "hidden_size": 64, "intermediate_size": 32,
                            "num_experts": 4, "num_experts_per_tok": 2})";
  EXPECT_MENTIONS(load(), "model_type \"bert\" is not supported");
  std::ofstream(cfg) << "{not json";
  EXPECT_MENTIONS(load(), cfg + ": not valid JSON");
  std::ofstream(cfg) << std::string(1000, '[');
  EXPECT_MENTIONS(load(), "nests deeper");
  std::filesystem::remove(cfg);
  EXPECT_MENTIONS(load(), "config.json is missing");
}

TEST_F(Damage, UnsupportedQuantizationIsNamed) {
  const std::string q = dir.path() + "/hf_quant_config.json";
  std::ofstream(q) << R"({"quantization": {"quant_algo": "FP8"}})";
  EXPECT_MENTIONS(load(), "quant_algo \"FP8\" is not supported");
  std::ofstream(q) << R"({"quantization": {"quant_algo": "NVFP4", "group_size": 32}})";
  EXPECT_MENTIONS(load(), "group_size 32");
  std::filesystem::remove(q);
  EXPECT_MENTIONS(load(), "no FP4 quantization found");
}

TEST_F(Damage, SizesThatDisagreeWithConfigNameTheTensor) {
  const std::string cfg = dir.path() + "/config.json";
  std::ofstream(cfg) << R"({"model_type": "qwen3_moe", "hidden_size": 64, "moe_intermediate_size": 48,
                            "num_experts": 4, "num_experts_per_tok": 2})";
  const auto msg = load();
  EXPECT_MENTIONS(msg, "model.layers.1.mlp.experts.0.gate_proj.weight");
  EXPECT_MENTIONS(msg, "sizes from config.json");
}

TEST(DamageGptOss, FusedTensorWithTheWrongExpertCountIsNamed) {
  TempDir dir;
  TestModel m;
  m.format = CheckpointFormat::gpt_oss_mxfp4;
  m.model_type = "gpt_oss";
  m.seed = std::random_device{}();
  auto w = test::write_test_checkpoint(dir.path(), m);
  auto& b = w.tensors.at("model.layers.2.mlp.experts.down_proj_scales");
  b.shape[0] -= 1;
  b.bytes.resize(b.bytes.size() / 4 * 3);
  rewrite(dir, w.tensors);
  const auto msg = error_of([&] { load_moe_layer(dir.path(), 2, 1); });
  EXPECT_MENTIONS(msg, "model.layers.2.mlp.experts.down_proj_scales");
  EXPECT_MENTIONS(msg, "[3, 64, 1]");
}

}  // namespace
