#include "cpu/checkpoint_writer.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <random>

#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe::test {

TempDir::TempDir() {
  std::string templ = (std::filesystem::temp_directory_path() / "fp4moe-ckpt-XXXXXX").string();
  FP4MOE_CHECK(mkdtemp(templ.data()) != nullptr, "cannot create a temporary directory " << templ);
  path_ = templ;
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

namespace {

using json = nlohmann::json;
using st::Dtype;

std::vector<float> normal(std::mt19937_64& rng, size_t n, float stddev) {
  std::normal_distribution<float> d(0.0f, stddev);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint8_t> f32_bytes(const std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 4);
  if (!v.empty()) std::memcpy(b.data(), v.data(), b.size());
  return b;
}

// Rounds to bf16 in place and returns the stored bytes.
std::vector<uint8_t> bf16_bytes(std::vector<float>& v) {
  std::vector<uint8_t> b(v.size() * 2);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = float_to_bf16(v[i]);
    v[i] = bf16_to_float(h);
    b[2 * i] = static_cast<uint8_t>(h);
    b[2 * i + 1] = static_cast<uint8_t>(h >> 8);
  }
  return b;
}

float amax(const std::vector<float>& v) {
  float a = 0.0f;
  for (float x : v) a = std::max(a, std::fabs(x));
  return a;
}

struct Builder {
  const TestModel& m;
  WrittenCheckpoint& out;
  std::vector<std::string> order;
  std::mt19937_64 rng;

  void add(const std::string& name, Dtype dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes) {
    order.push_back(name);
    out.tensors[name] = st::TensorToWrite{name, dtype, std::move(shape), std::move(bytes)};
  }

  void scalar(const std::string& name, float v, bool ct) {
    // ModelOpt stores per-tensor scales as 0-d tensors, compressed-tensors as [1].
    add(name, Dtype::f32, ct ? std::vector<int64_t>{1} : std::vector<int64_t>{}, f32_bytes({v}));
  }

  // One NVFP4 projection [rows, cols] stored per the format; returns the matrix as loaders see it.
  // `in_amax`: the calibrated activation amax of the projection's input.
  QuantizedMatrix nvfp4(const std::string& base, int64_t rows, int64_t cols, float stddev,
                        float in_amax, float* input_scale) {
    const bool ct = m.format == CheckpointFormat::compressed_tensors_nvfp4;
    const auto x = normal(rng, rows * cols, stddev);
    const float g = nvfp4_global_scale(amax(x));
    const float in = nvfp4_global_scale(in_amax);
    QuantizedMatrix q;
    if (ct) {
      // compressed-tensors keeps the encode direction (448 * 6 / amax) and quantizes with it.
      const float g_enc = 1.0f / g, in_enc = 1.0f / in;
      q = quantize_nvfp4(x.data(), rows, cols, g_enc, ScaleDirection::encode);
      q.global_scale = convert_global_scale(g_enc, ScaleDirection::encode, ScaleDirection::decode);
      add(base + "weight_packed", Dtype::u8, {rows, cols / 2}, q.data);
      add(base + "weight_scale", Dtype::f8_e4m3, {rows, cols / 16}, q.scales);
      scalar(base + "weight_global_scale", g_enc, true);
      scalar(base + "input_global_scale", in_enc, true);
      *input_scale = convert_global_scale(in_enc, ScaleDirection::encode, ScaleDirection::decode);
    } else {
      q = quantize_nvfp4(x.data(), rows, cols, g, ScaleDirection::decode);
      add(base + "weight", Dtype::u8, {rows, cols / 2}, q.data);
      add(base + "weight_scale", Dtype::f8_e4m3, {rows, cols / 16}, q.scales);
      scalar(base + "weight_scale_2", g, false);
      scalar(base + "input_scale", in, false);
      *input_scale = in;
    }
    return q;
  }

  void dense(int layer) {
    const std::string p = "model.layers." + std::to_string(layer) + ".mlp.";
    for (const char* n : {"gate_proj", "up_proj"}) {
      auto w = normal(rng, int64_t{m.intermediate} * m.hidden, 0.02f);
      add(p + n + ".weight", Dtype::bf16, {m.intermediate, m.hidden}, bf16_bytes(w));
    }
    auto w = normal(rng, int64_t{m.hidden} * m.intermediate, 0.02f);
    add(p + "down_proj.weight", Dtype::bf16, {m.hidden, m.intermediate}, bf16_bytes(w));
  }

  std::string moe_prefix(int layer) const {
    if (m.model_type == "mixtral") return "model.layers." + std::to_string(layer) + ".block_sparse_moe.";
    if (m.model_type == "llama4")
      return "language_model.model.layers." + std::to_string(layer) + ".feed_forward.";
    return "model.layers." + std::to_string(layer) + ".mlp.";
  }

  void moe(int layer, WrittenLayer& wl) {
    const int64_t H = m.hidden, I = m.intermediate, E = m.num_experts;
    const std::string p = moe_prefix(layer);
    const bool gpt_oss = m.format == CheckpointFormat::gpt_oss_mxfp4;
    wl.weights.format = gpt_oss ? Format::mxfp4 : Format::nvfp4;
    wl.weights.hidden = m.hidden;
    wl.weights.intermediate = m.intermediate;
    if (gpt_oss) {
      std::vector<uint8_t> gu_blocks, gu_scales, d_blocks, d_scales;
      std::vector<float> gu_bias(E * 2 * I), d_bias(E * H);
      std::vector<ExpertWeights> experts(E);
      for (int64_t e = 0; e < E; ++e) {
        ExpertWeights& x = experts[e];
        const auto g = normal(rng, I * H, 0.02f), u = normal(rng, I * H, 0.03f);
        const auto d = normal(rng, H * I, 0.02f);
        x.gate = quantize_mxfp4(g.data(), I, H);
        x.up = quantize_mxfp4(u.data(), I, H);
        x.down = quantize_mxfp4(d.data(), H, I);
        // Interleaved rows: fused row 2i is gate row i, 2i + 1 is up row i.
        for (int64_t i = 0; i < I; ++i) {
          for (const QuantizedMatrix* q : {&x.gate, &x.up}) {
            gu_blocks.insert(gu_blocks.end(), q->data.begin() + i * H / 2, q->data.begin() + (i + 1) * H / 2);
            gu_scales.insert(gu_scales.end(), q->scales.begin() + i * H / 32,
                             q->scales.begin() + (i + 1) * H / 32);
          }
        }
        d_blocks.insert(d_blocks.end(), x.down.data.begin(), x.down.data.end());
        d_scales.insert(d_scales.end(), x.down.scales.begin(), x.down.scales.end());
      }
      auto gb = normal(rng, E * 2 * I, 0.1f), db = normal(rng, E * H, 0.1f);
      const auto gb_bytes = bf16_bytes(gb), db_bytes = bf16_bytes(db);
      for (int64_t e = 0; e < E; ++e) {
        for (int64_t i = 0; i < I; ++i) {
          experts[e].gate_bias.push_back(gb[e * 2 * I + 2 * i]);
          experts[e].up_bias.push_back(gb[e * 2 * I + 2 * i + 1]);
        }
        experts[e].down_bias.assign(db.begin() + e * H, db.begin() + (e + 1) * H);
      }
      add(p + "experts.gate_up_proj_blocks", Dtype::u8, {E, 2 * I, H / 32, 16}, gu_blocks);
      add(p + "experts.gate_up_proj_scales", Dtype::u8, {E, 2 * I, H / 32}, gu_scales);
      add(p + "experts.gate_up_proj_bias", Dtype::bf16, {E, 2 * I}, gb_bytes);
      add(p + "experts.down_proj_blocks", Dtype::u8, {E, H, I / 32, 16}, d_blocks);
      add(p + "experts.down_proj_scales", Dtype::u8, {E, H, I / 32}, d_scales);
      add(p + "experts.down_proj_bias", Dtype::bf16, {E, H}, db_bytes);
      wl.weights.experts = std::move(experts);
    } else {
      const bool mixtral = m.model_type == "mixtral";
      for (int e = 0; e < E; ++e) {
        const std::string b = p + "experts." + std::to_string(e) + ".";
        ExpertWeights x;
        float in_gate = 0, in_up = 0;
        // Gate and up see the same input, so calibration gives them one activation amax; down's
        // input differs. Amax values vary per expert as a calibration run's would.
        const float x_amax = 4.0f + static_cast<float>(rng() % 8);
        const float a_amax = 1.0f + static_cast<float>(rng() % 8);
        x.gate = nvfp4(b + (mixtral ? "w1." : "gate_proj."), I, H, 0.02f, x_amax, &in_gate);
        // Different spreads give gate and up different global scales, as in real exports.
        x.up = nvfp4(b + (mixtral ? "w3." : "up_proj."), I, H, 0.03f, x_amax, &in_up);
        x.down = nvfp4(b + (mixtral ? "w2." : "down_proj."), H, I, 0.02f, a_amax, &x.input_scale2);
        x.input_scale13 = std::max(in_gate, in_up);
        wl.weights.experts.push_back(std::move(x));
      }
    }
    // Routers stay unquantized (bf16); DeepSeek's correction bias is fp32, gpt-oss's bias bf16.
    wl.router_weight = normal(rng, E * H, 0.05f);
    const bool router_named_router = gpt_oss || m.model_type == "llama4";
    add(p + (router_named_router ? "router.weight" : "gate.weight"), Dtype::bf16, {E, H},
        bf16_bytes(wl.router_weight));
    if (m.model_type == "deepseek_v3") {
      wl.router_bias = normal(rng, E, 0.5f);
      add(p + "gate.e_score_correction_bias", Dtype::f32, {E}, f32_bytes(wl.router_bias));
      auto s = normal(rng, I * H, 0.02f);  // a shared expert, which must not count as routed
      add(p + "shared_experts.gate_proj.weight", Dtype::bf16, {I, H}, bf16_bytes(s));
    } else if (gpt_oss) {
      wl.router_bias = normal(rng, E, 0.5f);
      add(p + "router.bias", Dtype::bf16, {E}, bf16_bytes(wl.router_bias));
    }
  }

  json config() const {
    json c;
    c["model_type"] = m.model_type;
    c["hidden_size"] = m.hidden;
    c["num_hidden_layers"] = m.num_layers;
    c["num_experts_per_tok"] = m.top_k;
    c["hidden_act"] = "silu";
    c["torch_dtype"] = "bfloat16";
    if (m.model_type == "deepseek_v3") {
      c["architectures"] = {"DeepseekV3ForCausalLM"};
      c["n_routed_experts"] = m.num_experts;
      c["moe_intermediate_size"] = m.intermediate;
      c["intermediate_size"] = m.intermediate * 3;
      c["n_group"] = 2;
      c["topk_group"] = 1;
      c["routed_scaling_factor"] = 2.5;
      c["norm_topk_prob"] = true;
      c["n_shared_experts"] = 1;
      c["first_k_dense_replace"] = m.moe_layers.empty() ? 0 : m.moe_layers.front();
    } else if (m.model_type == "qwen3_moe") {
      c["architectures"] = {"Qwen3MoeForCausalLM"};
      c["num_experts"] = m.num_experts;
      c["moe_intermediate_size"] = m.intermediate;
      c["intermediate_size"] = m.intermediate * 3;
      c["norm_topk_prob"] = true;
    } else if (m.model_type == "gpt_oss") {
      c["architectures"] = {"GptOssForCausalLM"};
      c["num_local_experts"] = m.num_experts;
      c["experts_per_token"] = m.top_k;
      c["intermediate_size"] = m.intermediate;
      c["swiglu_limit"] = 7.0;
    } else if (m.model_type == "mixtral") {
      c["architectures"] = {"MixtralForCausalLM"};
      c["num_local_experts"] = m.num_experts;
      c["intermediate_size"] = m.intermediate;
    } else if (m.model_type == "llama4") {
      json text = c;
      text["model_type"] = "llama4_text";
      text["num_local_experts"] = m.num_experts;
      text["intermediate_size"] = m.intermediate;
      c = json{{"model_type", "llama4"}, {"architectures", {"Llama4ForConditionalGeneration"}},
               {"text_config", text}};
    } else {
      FP4MOE_FAIL("test checkpoint writer: unknown model_type " << m.model_type);
    }
    if (m.format == CheckpointFormat::compressed_tensors_nvfp4) {
      json scheme = {{"num_bits", 4}, {"type", "float"}, {"strategy", "tensor_group"},
                     {"group_size", 16}, {"symmetric", true}, {"dynamic", false}};
      json acts = scheme;
      acts["dynamic"] = "local";
      c["quantization_config"] = {
          {"quant_method", "compressed-tensors"},
          {"format", "nvfp4-pack-quantized"},
          {"quantization_status", "compressed"},
          {"config_groups",
           {{"group_0", {{"targets", {"Linear"}}, {"weights", scheme}, {"input_activations", acts}}}}},
          {"ignore", {"lm_head", "re:.*mlp.gate$"}}};
    } else if (m.format == CheckpointFormat::gpt_oss_mxfp4) {
      c["quantization_config"] = {
          {"quant_method", "mxfp4"},
          {"modules_to_not_convert", {"model.layers.*.self_attn", "model.layers.*.mlp.router",
                                      "model.embed_tokens", "lm_head"}}};
    }
    return c;
  }
};

std::string shard_name(int i, int n) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05d-of-%05d.safetensors", i, n);
  return buf;
}

}  // namespace

WrittenCheckpoint write_test_checkpoint(const std::string& dir, const TestModel& m) {
  WrittenCheckpoint out;
  Builder b{m, out, {}, std::mt19937_64(m.seed)};
  std::vector<float> norm(m.hidden, 1.0f);
  b.add("model.norm.weight", Dtype::bf16, {m.hidden}, bf16_bytes(norm));
  for (int l = 0; l < m.num_layers; ++l) {
    if (std::find(m.moe_layers.begin(), m.moe_layers.end(), l) == m.moe_layers.end()) {
      b.dense(l);
      continue;
    }
    WrittenLayer& wl = out.layers[l];
    b.moe(l, wl);
    const bool gpt_oss = m.format == CheckpointFormat::gpt_oss_mxfp4;
    MoeProblem& p = wl.problem;
    p.hidden = m.hidden;
    p.intermediate = m.intermediate;
    p.num_experts = m.num_experts;
    p.top_k = m.top_k;
    p.format = wl.weights.format;
    p.has_bias = gpt_oss;
    if (m.model_type == "deepseek_v3") {
      p.routing = {RoutingMethod::deepseek_v3, true, 2, 1, 2.5f, true, DType::f32};
    } else if (gpt_oss) {
      p.routing.method = RoutingMethod::topk_softmax;
      p.routing.has_bias = true;
      p.activation.kind = Activation::swiglu_oai;
    } else if (m.model_type == "llama4") {
      p.routing.method = RoutingMethod::llama4;
    } else {
      p.routing.method = RoutingMethod::softmax_topk;
      p.routing.renormalize = true;
    }
  }

  const int shards = m.sharded ? 2 : 1;
  std::vector<std::vector<st::TensorToWrite>> files(shards);
  for (size_t i = 0; i < b.order.size(); ++i) {
    // Contiguous halves, as the Hugging Face writer fills shards in order.
    const int s = m.sharded ? static_cast<int>(2 * i / b.order.size()) : 0;
    const std::string file = m.sharded ? shard_name(s + 1, shards) : "model.safetensors";
    out.shard_of[b.order[i]] = file;
    files[s].push_back(out.tensors.at(b.order[i]));
  }
  for (int s = 0; s < shards; ++s)
    st::write_file(dir + "/" + (m.sharded ? shard_name(s + 1, shards) : "model.safetensors"), files[s],
                   {{"format", "pt"}});
  if (m.sharded) {
    json index = {{"metadata", {{"total_size", 0}}}, {"weight_map", out.shard_of}};
    std::ofstream(dir + "/model.safetensors.index.json") << index.dump(2);
  }
  std::ofstream(dir + "/config.json") << b.config().dump(2);
  if (m.format == CheckpointFormat::modelopt_nvfp4) {
    const json q = {{"producer", {{"name", "modelopt"}, {"version", "0.29.0"}}},
                    {"quantization", {{"quant_algo", "NVFP4"},
                                      {"kv_cache_quant_algo", nullptr},
                                      {"group_size", 16},
                                      {"exclude_modules", {"lm_head"}}}}};
    std::ofstream(dir + "/hf_quant_config.json") << q.dump(4);
  }
  return out;
}

void overwrite_tensor_bytes(const std::string& dir, const WrittenCheckpoint& ckpt,
                            const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = dir + "/" + ckpt.shard_of.at(name);
  uint64_t begin = 0, size = 0;
  {
    const auto f = st::File::open(path);
    const auto& t = f.at(name);
    begin = t.begin;
    size = t.end - t.begin;
  }
  FP4MOE_CHECK(bytes.size() == size, "overwrite_tensor_bytes: " << name << " has " << size
                                                                << " bytes, got " << bytes.size());
  std::fstream io(path, std::ios::in | std::ios::out | std::ios::binary);
  uint8_t len[8];
  io.read(reinterpret_cast<char*>(len), 8);
  uint64_t header = 0;
  for (int i = 7; i >= 0; --i) header = (header << 8) | len[i];
  io.seekp(static_cast<std::streamoff>(8 + header + begin));
  io.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  FP4MOE_CHECK(io, "overwrite_tensor_bytes: cannot write " << path);
}

}  // namespace fp4moe::test
