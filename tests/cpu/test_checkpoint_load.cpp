// Loading MoE layers from checkpoints written as ModelOpt, compressed-tensors and gpt-oss store them:
// weights byte for byte, problem from config.json, layer output equal to the reference on the written
// weights, and every kind of damage reported as an fp4moe::Error naming the file and tensor.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <random>

#include "cpu/checkpoint_writer.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/reference.h"

namespace {

using namespace fp4moe;
using fp4moe::test::TempDir;
using fp4moe::test::TestModel;
using fp4moe::test::WrittenCheckpoint;

uint64_t fresh_seed() { return std::random_device{}() | (uint64_t{std::random_device{}()} << 32); }

void expect_same_matrix(const QuantizedMatrix& got, const QuantizedMatrix& want, const std::string& what) {
  EXPECT_EQ(got.format, want.format) << what;
  EXPECT_EQ(got.rows, want.rows) << what;
  EXPECT_EQ(got.cols, want.cols) << what;
  EXPECT_EQ(got.data, want.data) << what << " data";
  EXPECT_EQ(got.scales, want.scales) << what << " scales";
  uint32_t a, b;
  std::memcpy(&a, &got.global_scale, 4);
  std::memcpy(&b, &want.global_scale, 4);
  EXPECT_EQ(a, b) << what << " global scale " << got.global_scale << " vs " << want.global_scale;
}

void expect_same_weights(const MoeWeights& got, const MoeWeights& want, int first) {
  ASSERT_EQ(got.format, want.format);
  ASSERT_EQ(got.hidden, want.hidden);
  ASSERT_EQ(got.intermediate, want.intermediate);
  for (size_t i = 0; i < got.experts.size(); ++i) {
    const auto& g = got.experts[i];
    const auto& w = want.experts[first + i];
    const std::string e = "expert " + std::to_string(first + i);
    expect_same_matrix(g.gate, w.gate, e + " gate");
    expect_same_matrix(g.up, w.up, e + " up");
    expect_same_matrix(g.down, w.down, e + " down");
    EXPECT_EQ(g.gate_bias, w.gate_bias) << e;
    EXPECT_EQ(g.up_bias, w.up_bias) << e;
    EXPECT_EQ(g.down_bias, w.down_bias) << e;
    EXPECT_EQ(g.input_scale13, w.input_scale13) << e;
    EXPECT_EQ(g.input_scale2, w.input_scale2) << e;
  }
}

std::vector<uint16_t> random_x(int64_t n, std::mt19937_64& rng) {
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<uint16_t> x(n);
  for (auto& v : x) v = float_to_bf16(d(rng));
  return x;
}

struct Case {
  const char* name;
  TestModel model;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

std::vector<Case> cases() {
  TestModel modelopt;  // Qwen3-MoE, ModelOpt NVFP4, one file
  TestModel deepseek;
  deepseek.model_type = "deepseek_v3";
  deepseek.num_experts = 8;
  deepseek.top_k = 2;
  deepseek.sharded = true;
  TestModel ct;
  ct.format = CheckpointFormat::compressed_tensors_nvfp4;
  TestModel mixtral;
  mixtral.format = CheckpointFormat::compressed_tensors_nvfp4;
  mixtral.model_type = "mixtral";
  mixtral.moe_layers = {0, 1, 2};
  TestModel llama4;
  llama4.model_type = "llama4";
  llama4.top_k = 1;
  llama4.moe_layers = {1};
  TestModel gpt_oss;
  gpt_oss.format = CheckpointFormat::gpt_oss_mxfp4;
  gpt_oss.model_type = "gpt_oss";
  gpt_oss.sharded = true;
  return {{"modelopt_qwen3", modelopt}, {"modelopt_deepseek_sharded", deepseek},
          {"compressed_tensors_qwen3", ct}, {"compressed_tensors_mixtral", mixtral},
          {"modelopt_llama4", llama4}, {"gpt_oss_sharded", gpt_oss}};
}

class LoadLayer : public ::testing::TestWithParam<Case> {};

TEST_P(LoadLayer, MatchesWhatWasWritten) {
  TestModel m = GetParam().model;
  m.seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  TempDir dir;
  const WrittenCheckpoint w = test::write_test_checkpoint(dir.path(), m);
  std::mt19937_64 rng(m.seed + 1);

  const CheckpointInfo info = inspect_checkpoint(dir.path());
  EXPECT_EQ(info.format, m.format);
  EXPECT_EQ(info.sharded, m.sharded);
  EXPECT_EQ(info.files, m.sharded ? 2 : 1);
  ASSERT_EQ(info.moe_layers.size(), m.moe_layers.size());
  for (size_t i = 0; i < m.moe_layers.size(); ++i) {
    EXPECT_EQ(info.moe_layers[i].layer, m.moe_layers[i]);
    EXPECT_EQ(info.moe_layers[i].experts_found, m.num_experts);
    EXPECT_TRUE(info.moe_layers[i].missing_experts.empty());
  }
  EXPECT_EQ(info.stored_scale_direction, m.format == CheckpointFormat::compressed_tensors_nvfp4
                                             ? ScaleDirection::encode : ScaleDirection::decode);
  for (const auto& warning : info.warnings) ADD_FAILURE() << "unexpected warning: " << warning;

  for (const auto& [layer, written] : w.layers) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const int64_t T = 1 + static_cast<int64_t>(rng() % 6);
    for (InputMode mode : {InputMode::w4a16, InputMode::w4a4}) {
      if (mode == InputMode::w4a4 && m.format == CheckpointFormat::gpt_oss_mxfp4) continue;
      LoadOptions opt;
      opt.input_mode = mode;
      const LoadedLayer l = load_moe_layer(dir.path(), layer, T, opt);
      const MoeProblem& p = l.problem;
      MoeProblem want = written.problem;
      want.tokens = T;
      want.input_mode = mode;
      EXPECT_EQ(p.to_string(), want.to_string());
      EXPECT_EQ(p.routing.method, want.routing.method);
      EXPECT_EQ(p.routing.renormalize, want.routing.renormalize);
      EXPECT_EQ(p.routing.n_group, want.routing.n_group);
      EXPECT_EQ(p.routing.topk_group, want.routing.topk_group);
      EXPECT_EQ(p.routing.routed_scaling_factor, want.routing.routed_scaling_factor);
      EXPECT_EQ(p.routing.has_bias, want.routing.has_bias);
      EXPECT_EQ(p.activation.kind, want.activation.kind);
      EXPECT_EQ(p.has_bias, want.has_bias);
      expect_same_weights(l.weights, written.weights, 0);
      EXPECT_EQ(l.router_weight, written.router_weight);
      EXPECT_EQ(l.router_bias, written.router_bias);

      const auto x = random_x(T * m.hidden, rng);
      const auto logits = router_logits(l, x.data(), T);
      ASSERT_EQ(logits.size(), static_cast<size_t>(T * m.num_experts));
      {
        double acc = 0;  // one logit by hand: last token, last expert
        for (int h = 0; h < m.hidden; ++h)
          acc += double{bf16_to_float(x[(T - 1) * m.hidden + h])} *
                 written.router_weight[(m.num_experts - 1) * m.hidden + h];
        EXPECT_EQ(logits.back(), static_cast<float>(acc));
      }
      HostInputs in;
      in.x = x.data();
      in.logits = logits.data();
      in.router_bias = l.router_bias.empty() ? nullptr : l.router_bias.data();
      const auto got = moe_reference(p, l.weights, in);
      const auto ref = moe_reference(want, written.weights, in);
      EXPECT_EQ(got.out, ref.out);
      EXPECT_EQ(got.topk_ids, ref.topk_ids);
      bool any_nonzero = false;
      for (float v : got.out_f32) any_nonzero = any_nonzero || (v != 0.0f && std::isfinite(v));
      EXPECT_TRUE(any_nonzero) << "the layer output is all zero or non-finite";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, LoadLayer, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return std::string(info.param.name); });

// gpt-oss computed straight from the stored fused tensors (interleaved rows, E8M0 exponents, bf16
// biases) with no library decoding, against the reference on the loaded weights: catches a
// de-interleaving or nibble-order mistake shared by the writer and the loader.
TEST(LoadLayerGptOss, MatchesAForwardPassOnTheRawFusedTensors) {
  TestModel m;
  m.format = CheckpointFormat::gpt_oss_mxfp4;
  m.model_type = "gpt_oss";
  m.seed = fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(m.seed));
  TempDir dir;
  const WrittenCheckpoint w = test::write_test_checkpoint(dir.path(), m);
  const int64_t T = 4, H = m.hidden, I = m.intermediate;
  const LoadedLayer l = load_moe_layer(dir.path(), 1, T);
  std::mt19937_64 rng(m.seed + 7);
  const auto x = random_x(T * H, rng);
  const auto logits = router_logits(l, x.data(), T);
  const auto ref = moe_reference(l.problem, l.weights, {x.data(), logits.data(), l.router_bias.data()});

  const std::string p = "model.layers.1.mlp.experts.";
  const auto& gub = w.tensors.at(p + "gate_up_proj_blocks").bytes;
  const auto& gus = w.tensors.at(p + "gate_up_proj_scales").bytes;
  const auto& gubias = w.tensors.at(p + "gate_up_proj_bias").bytes;
  const auto& db = w.tensors.at(p + "down_proj_blocks").bytes;
  const auto& ds = w.tensors.at(p + "down_proj_scales").bytes;
  const auto& dbias = w.tensors.at(p + "down_proj_bias").bytes;
  static const double kE2M1[8] = {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  auto fp4 = [&](const std::vector<uint8_t>& blocks, const std::vector<uint8_t>& scales, int64_t row,
                 int64_t k, int64_t K) {
    const uint8_t byte = blocks[row * K / 2 + k / 2];
    const uint8_t code = k % 2 ? byte >> 4 : byte & 15;
    const double v = kE2M1[code & 7] * (code & 8 ? -1 : 1);
    return std::ldexp(v, int{scales[row * K / 32 + k / 32]} - 127);
  };
  auto bf16 = [](const std::vector<uint8_t>& b, int64_t i) {
    const uint32_t bits = uint32_t{b[2 * i]} << 16 | uint32_t{b[2 * i + 1]} << 24;
    float f;
    std::memcpy(&f, &bits, 4);
    return double{f};
  };
  double err = 0, norm = 0;
  for (int64_t t = 0; t < T; ++t) {
    std::vector<double> out(H, 0.0);
    for (int j = 0; j < m.top_k; ++j) {
      const int64_t e = ref.topk_ids[t * m.top_k + j];
      const double wt = ref.topk_weights[t * m.top_k + j];
      std::vector<double> a(I);
      for (int64_t i = 0; i < I; ++i) {
        double h[2];
        for (int half = 0; half < 2; ++half) {
          const int64_t row = e * 2 * I + 2 * i + half;
          double acc = bf16(gubias, row);
          for (int64_t k = 0; k < H; ++k) acc += fp4(gub, gus, row, k, H) * bf16_to_float(x[t * H + k]);
          h[half] = acc;
        }
        const double g = std::min(h[0], 7.0), u = std::clamp(h[1], -7.0, 7.0);
        a[i] = bf16_to_float(float_to_bf16(static_cast<float>((u + 1) * g / (1 + std::exp(-1.702 * g)))));
      }
      for (int64_t r = 0; r < H; ++r) {
        double acc = bf16(dbias, e * H + r);
        for (int64_t k = 0; k < I; ++k) acc += fp4(db, ds, e * H + r, k, I) * a[k];
        out[r] += wt * acc;
      }
    }
    for (int64_t r = 0; r < H; ++r) {
      err += std::pow(out[r] - ref.out_f32[t * H + r], 2);
      norm += out[r] * out[r];
    }
  }
  // Only the bf16 rounding of `a` at a tie-breaking boundary can differ (one ulp, 2^-8 relative, in
  // rare elements); a swapped gate/up or nibble order gives errors of order 1.
  EXPECT_LT(std::sqrt(err / norm), 1e-3) << "relative L2 error";
  EXPECT_GT(norm, 0.0);
}

TEST(LoadLayerOptions, LoadsARangeOfLocalExperts) {
  TestModel m;
  m.num_experts = 6;
  m.seed = fresh_seed();
  TempDir dir;
  const auto w = test::write_test_checkpoint(dir.path(), m);
  LoadOptions opt;
  opt.local_expert_offset = 2;
  opt.num_local_experts = 3;
  const auto l = load_moe_layer(dir.path(), 2, 3, opt);
  EXPECT_EQ(l.problem.local_expert_offset, 2);
  EXPECT_EQ(l.problem.local_experts(), 3);
  ASSERT_EQ(l.weights.experts.size(), 3u);
  expect_same_weights(l.weights, w.layers.at(2).weights, 2);
  opt.num_local_experts = 5;
  EXPECT_THROW(load_moe_layer(dir.path(), 2, 3, opt), fp4moe::Error);
}

TEST(LoadLayerOptions, WarnsWhenGateAndUpGlobalScalesDiffer) {
  TestModel m;
  m.seed = fresh_seed();
  TempDir dir;
  const auto w = test::write_test_checkpoint(dir.path(), m);
  const auto l = load_moe_layer(dir.path(), 1, 1);
  // The writer draws gate and up with different spreads, so their global scales differ.
  int differing = 0;
  for (const auto& e : w.layers.at(1).weights.experts) differing += e.gate.global_scale != e.up.global_scale;
  ASSERT_GT(differing, 0);
  int warned = 0;
  for (const auto& s : l.warnings) warned += s.find("gate and up global scales differ") != std::string::npos;
  EXPECT_EQ(warned, differing);
}

}  // namespace
