// Layer loaders for the supported checkpoint formats, inspect_checkpoint and router logits.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <set>

#include "checkpoint/model.h"
#include "checkpoint/safetensors.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"

namespace fp4moe {

std::string_view to_string(CheckpointFormat f) {
  switch (f) {
    case CheckpointFormat::modelopt_nvfp4: return "modelopt-nvfp4";
    case CheckpointFormat::compressed_tensors_nvfp4: return "compressed-tensors-nvfp4";
    case CheckpointFormat::gpt_oss_mxfp4: return "gpt-oss-mxfp4";
  }
  return "?";
}

namespace {

constexpr size_t kMaxListedMissing = 64;

using st::Dtype;
using Ref = st::Checkpoint::Ref;

std::string shape_string(const std::vector<int64_t>& s) {
  ::fp4moe::detail::Message o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

// Checks dtype (one of `dtypes`) and shape; the message names the file, tensor, and what was
// expected and why.
void expect(const Ref& r, std::initializer_list<Dtype> dtypes, const std::vector<int64_t>& shape,
            const char* why) {
  bool dtype_ok = false;
  std::string names;
  for (Dtype d : dtypes) {
    dtype_ok = dtype_ok || r.info->dtype == d;
    names += (names.empty() ? "" : " or ") + std::string(st::dtype_name(d));
  }
  FP4MOE_CHECK(dtype_ok && r.info->shape == shape,
               r.file->path() << ": tensor '" << r.info->name << "' is " << st::dtype_name(r.info->dtype)
                              << " " << r.info->shape_string() << ", expected " << names << " "
                              << shape_string(shape) << " (" << why << ")");
}

// A per-tensor scale: one element of a float dtype (shape [] or [1]).
float scalar(const Ref& r) {
  FP4MOE_CHECK(r.info->numel() == 1 && (r.info->dtype == Dtype::f32 || r.info->dtype == Dtype::bf16 ||
                                        r.info->dtype == Dtype::f16 || r.info->dtype == Dtype::f64),
               r.file->path() << ": tensor '" << r.info->name << "' is " << st::dtype_name(r.info->dtype)
                              << " " << r.info->shape_string()
                              << ", expected one floating-point value (a per-tensor scale)");
  return st::to_float(*r.file, *r.info)[0];
}

float positive_scale(const Ref& r) {
  const float g = scalar(r);
  FP4MOE_CHECK(std::isfinite(g) && g > 0.0f,
               r.file->path() << ": tensor '" << r.info->name << "' holds " << g
                              << "; a per-tensor scale must be finite and positive (the export is "
                                 "damaged or was calibrated on empty data)");
  return g;
}

std::vector<uint8_t> copy_bytes(const Ref& r) {
  const auto b = r.file->bytes(*r.info);
  return {b.begin(), b.end()};
}

std::string layer_list(const std::map<int, ckpt::LayerTensors>& layers) {
  ::fp4moe::detail::Message o;
  int run_start = -2, prev = -2;
  bool first = true;
  auto flush = [&] {
    if (run_start < 0) return;
    o << (first ? "" : ", ") << run_start;
    if (prev != run_start) o << "-" << prev;
    first = false;
  };
  for (const auto& [l, t] : layers) {
    if (l != prev + 1) {
      flush();
      run_start = l;
    }
    prev = l;
  }
  flush();
  return first ? std::string("none") : o.str();
}

// NaN block scales are refused (SPEC "Non-finite inputs"), naming the file, tensor, expert, row
// and block; negative E4M3 scales (which flip signs) only warn. A row r of `m` is row
// r * row_stride + row_offset of the tensor (gpt-oss interleaves gate and up).
void check_scales(const QuantizedMatrix& m, const Ref& r, const std::string& what, int64_t row_stride,
                  int64_t row_offset, std::vector<std::string>& warnings) {
  const int64_t kcols = m.scale_cols();
  int64_t negative = 0;
  for (size_t i = 0; i < m.scales.size(); ++i) {
    const uint8_t s = m.scales[i];
    const bool nan = m.format == Format::nvfp4 ? (s & 0x7F) == 0x7F : s == 0xFF;
    if (nan) {
      const int64_t row = int64_t(i) / kcols, block = int64_t(i) % kcols;
      const bool fused = row_stride != 1 || row_offset != 0;
      FP4MOE_FAIL(r.file->path() << ": tensor '" << r.info->name << "'"
                                 << (fused ? " (" + what + ")" : std::string()) << ": block scale of row "
                                 << row << ", block " << block
                                 << (fused ? " (tensor row " + std::to_string(row * row_stride + row_offset) + ")"
                                           : std::string())
                                 << " is NaN (" << (m.format == Format::nvfp4 ? "E4M3" : "E8M0") << " code "
                                 << detail::hex_byte(s) << "); the export is damaged");
    }
    negative += m.format == Format::nvfp4 && (s & 0x80) != 0;
  }
  if (negative) warnings.push_back(what + ": " + std::to_string(negative) + " negative block scales");
}

struct Loader {
  const st::Checkpoint& c;
  const ckpt::ModelSpec& spec;
  const LoadOptions& opt;
  LoadedLayer& out;
  std::string prefix;

  // NVFP4 matrix [rows, cols] of one expert projection ("<prefix>experts.<e>.<proj>.").
  QuantizedMatrix nvfp4(const std::string& base, int64_t rows, int64_t cols, float* input_scale) {
    const bool ct = spec.format == CheckpointFormat::compressed_tensors_nvfp4;
    const ScaleDirection dir = ct ? ScaleDirection::encode : ScaleDirection::decode;
    const Ref w = c.at(base + (ct ? "weight_packed" : "weight"));
    const Ref s = c.at(base + "weight_scale");
    const Ref g = c.at(base + (ct ? "weight_global_scale" : "weight_scale_2"));
    expect(w, {Dtype::u8}, {rows, cols / 2}, "two E2M1 values per byte, sizes from config.json");
    expect(s, {Dtype::f8_e4m3, Dtype::u8}, {rows, cols / 16}, "one E4M3 scale per 16 values, linear");
    QuantizedMatrix m;
    m.format = Format::nvfp4;
    m.rows = rows;
    m.cols = cols;
    m.data = copy_bytes(w);
    m.scales = copy_bytes(s);
    m.global_scale = convert_global_scale(positive_scale(g), dir, ScaleDirection::decode);
    const Ref in = c.find(base + (ct ? "input_global_scale" : "input_scale"));
    if (in) {
      *input_scale = convert_global_scale(positive_scale(in), dir, ScaleDirection::decode);
    } else {
      FP4MOE_CHECK(opt.input_mode != InputMode::w4a4,
                   c.dir() << ": W4A4 needs activation scales but '" << base
                           << (ct ? "input_global_scale" : "input_scale")
                           << "' is missing (a weight-only export); load with w4a16");
      *input_scale = 1.0f;
    }
    check_scales(m, s, base + "weight_scale", 1, 0, out.warnings);
    return m;
  }

  std::string proj(const std::string& e, const char* hf, const char* mixtral) const {
    const std::string a = prefix + "experts." + e + "." + hf + ".";
    if (c.find(a + "weight") || c.find(a + "weight_packed")) return a;
    const std::string b = prefix + "experts." + e + "." + mixtral + ".";
    if (c.find(b + "weight") || c.find(b + "weight_packed")) return b;
    return a;  // absent: the lookup that follows names the tensor
  }

  void per_expert_nvfp4(int first, int count) {
    const int64_t H = spec.hidden, I = spec.intermediate;
    FP4MOE_CHECK(H % 16 == 0 && I % 16 == 0,
                 c.dir() << ": hidden_size " << H << " and intermediate size " << I
                         << " must be multiples of 16 for NVFP4");
    const bool gated = is_gated(spec.activation.kind);
    for (int e = first; e < first + count; ++e) {
      const std::string id = std::to_string(e);
      ExpertWeights x;
      float in_gate = 1.0f, in_up = 1.0f;
      if (gated) x.gate = nvfp4(proj(id, "gate_proj", "w1"), I, H, &in_gate);
      x.up = nvfp4(gated ? proj(id, "up_proj", "w3") : proj(id, "up_proj", "w1"), I, H, &in_up);
      x.down = nvfp4(proj(id, "down_proj", "w2"), H, I, &x.input_scale2);
      x.input_scale13 = gated ? std::max(in_gate, in_up) : in_up;
      if (gated && x.gate.global_scale != x.up.global_scale) {
        ::fp4moe::detail::Message o;
        o << prefix << "experts." << e << ": gate and up global scales differ (" << x.gate.global_scale
          << " vs " << x.up.global_scale << "); each is kept for its half";
        out.warnings.push_back(o.str());
      }
      if (gated && in_gate != in_up) {
        ::fp4moe::detail::Message o;
        o << prefix << "experts." << e << ": gate and up input scales differ (" << in_gate << " vs "
          << in_up << "); GEMM1 quantizes x once, with the larger";
        out.warnings.push_back(o.str());
      }
      out.weights.experts.push_back(std::move(x));
    }
  }

  void gpt_oss(int first, int count) {
    const int64_t E = spec.num_experts, H = spec.hidden, I = spec.intermediate;
    FP4MOE_CHECK(H % 32 == 0 && I % 32 == 0,
                 c.dir() << ": hidden_size " << H << " and intermediate_size " << I
                         << " must be multiples of 32 for MXFP4");
    const std::string base = prefix + "experts.";
    const Ref gub = c.at(base + "gate_up_proj_blocks"), gus = c.at(base + "gate_up_proj_scales");
    const Ref gubias = c.at(base + "gate_up_proj_bias");
    const Ref db = c.at(base + "down_proj_blocks"), ds = c.at(base + "down_proj_scales");
    const Ref dbias = c.at(base + "down_proj_bias");
    expect(gub, {Dtype::u8}, {E, 2 * I, H / 32, 16}, "[E, 2I, H/32, 16], sizes from config.json");
    expect(gus, {Dtype::u8, Dtype::f8_e8m0}, {E, 2 * I, H / 32}, "E8M0 scales [E, 2I, H/32]");
    expect(gubias, {Dtype::bf16, Dtype::f32, Dtype::f16}, {E, 2 * I}, "bias [E, 2I]");
    expect(db, {Dtype::u8}, {E, H, I / 32, 16}, "[E, H, I/32, 16], sizes from config.json");
    expect(ds, {Dtype::u8, Dtype::f8_e8m0}, {E, H, I / 32}, "E8M0 scales [E, H, I/32]");
    expect(dbias, {Dtype::bf16, Dtype::f32, Dtype::f16}, {E, H}, "bias [E, H]");
    const auto gu_data = gub.file->bytes(*gub.info), gu_scales = gus.file->bytes(*gus.info);
    const auto d_data = db.file->bytes(*db.info), d_scales = ds.file->bytes(*ds.info);
    const std::vector<float> gu_bias = st::to_float(*gubias.file, *gubias.info);
    const std::vector<float> d_bias = st::to_float(*dbias.file, *dbias.info);

    auto matrix = [](int64_t rows, int64_t cols) {
      QuantizedMatrix m;
      m.format = Format::mxfp4;
      m.rows = rows;
      m.cols = cols;
      m.data.resize(rows * cols / 2);
      m.scales.resize(rows * cols / 32);
      return m;
    };
    const int64_t row_bytes = H / 2, row_scales = H / 32;
    for (int64_t e = first; e < first + count; ++e) {
      ExpertWeights x;
      x.gate = matrix(I, H);
      x.up = matrix(I, H);
      x.gate_bias.resize(I);
      x.up_bias.resize(I);
      // Rows are interleaved: gate row i is fused row 2i, up row i is fused row 2i + 1.
      for (int64_t i = 0; i < I; ++i) {
        for (int half = 0; half < 2; ++half) {
          QuantizedMatrix& m = half ? x.up : x.gate;
          const int64_t src = e * 2 * I + 2 * i + half;
          std::memcpy(&m.data[i * row_bytes], &gu_data[src * row_bytes], row_bytes);
          std::memcpy(&m.scales[i * row_scales], &gu_scales[src * row_scales], row_scales);
          (half ? x.up_bias : x.gate_bias)[i] = gu_bias[src];
        }
      }
      x.down = matrix(H, I);
      const size_t dn = H * I / 2, dsn = H * I / 32;
      std::memcpy(x.down.data.data(), &d_data[e * dn], dn);
      std::memcpy(x.down.scales.data(), &d_scales[e * dsn], dsn);
      x.down_bias.assign(d_bias.begin() + e * H, d_bias.begin() + (e + 1) * H);
      const std::string what = base + std::to_string(e);
      check_scales(x.gate, gus, "expert " + std::to_string(e) + " gate", 2, e * 2 * I, out.warnings);
      check_scales(x.up, gus, "expert " + std::to_string(e) + " up", 2, e * 2 * I + 1, out.warnings);
      check_scales(x.down, ds, "expert " + std::to_string(e) + " down", 1, e * H, out.warnings);
      out.weights.experts.push_back(std::move(x));
    }
  }

  void router() {
    const int64_t E = spec.num_experts, H = spec.hidden;
    Ref w = c.find(prefix + "gate.weight");
    if (!w) w = c.find(prefix + "router.weight");
    FP4MOE_CHECK(w, c.dir() << ": no router weight for this layer (looked for '" << prefix
                            << "gate.weight' and '" << prefix << "router.weight')");
    expect(w, {Dtype::bf16, Dtype::f32, Dtype::f16}, {E, H}, "router [E, H], unquantized");
    out.router_weight = st::to_float(*w.file, *w.info);
    Ref b;
    if (spec.routing.method == RoutingMethod::deepseek_v3) {
      b = c.find(prefix + "gate.e_score_correction_bias");
    } else if (spec.routing.method == RoutingMethod::topk_softmax) {
      b = c.find(prefix + "router.bias");
      if (!b) b = c.find(prefix + "gate.bias");
    }
    out.problem.routing.has_bias = static_cast<bool>(b);
    if (b) {
      expect(b, {Dtype::bf16, Dtype::f32, Dtype::f16}, {E}, "router bias [E]");
      out.router_bias = st::to_float(*b.file, *b.info);
      for (float v : out.router_bias)
        FP4MOE_CHECK(std::isfinite(v), b.file->path() << ": tensor '" << b.info->name
                                                      << "' holds a non-finite value");
    }
    for (float v : out.router_weight)
      FP4MOE_CHECK(std::isfinite(v), w.file->path() << ": tensor '" << w.info->name
                                                    << "' holds a non-finite value");
  }
};

}  // namespace

CheckpointInfo inspect_checkpoint(const std::string& dir) {
  const ckpt::ModelSpec spec = ckpt::read_model_spec(dir);
  const st::Checkpoint c = st::Checkpoint::open(dir);
  CheckpointInfo info;
  info.dir = dir;
  info.format = spec.format;
  info.fp4 = spec.format == CheckpointFormat::gpt_oss_mxfp4 ? Format::mxfp4 : Format::nvfp4;
  info.stored_scale_direction = spec.format == CheckpointFormat::compressed_tensors_nvfp4
                                    ? ScaleDirection::encode : ScaleDirection::decode;
  info.model_type = spec.model_type;
  info.hidden = spec.hidden;
  info.intermediate = spec.intermediate;
  info.num_experts = spec.num_experts;
  info.top_k = spec.top_k;
  info.num_layers = spec.num_layers;
  info.routing = spec.routing;
  info.activation = spec.activation;
  info.files = static_cast<int>(c.files().size());
  info.sharded = c.sharded();
  for (const auto& f : c.files()) info.tensors += static_cast<int64_t>(f.tensors().size());
  info.warnings = spec.warnings;

  const auto layers = ckpt::scan_layers(c);
  for (const auto& [l, t] : layers) {
    CheckpointLayer cl;
    cl.layer = l;
    cl.prefix = t.prefix;
    // Missing experts: the count is exact, the list keeps the first kMaxListedMissing (config.json
    // may claim any number of experts; memory follows what the files hold, not the claim).
    if (t.fused) {
      const Ref r = c.find(t.prefix + "experts.gate_up_proj_blocks");
      const int64_t stored = r && !r.info->shape.empty() ? r.info->shape[0] : 0;
      cl.experts_found = static_cast<int>(std::min<int64_t>(stored, spec.num_experts));
      cl.missing_count = spec.num_experts - cl.experts_found;
      for (int e = cl.experts_found; e < spec.num_experts && cl.missing_experts.size() < kMaxListedMissing; ++e)
        cl.missing_experts.push_back(e);
    } else {
      cl.experts_found = static_cast<int>(t.experts.size());
      // The gaps between the experts present, in order, instead of every index of [0, E).
      int64_t present = 0;
      int next = 0;
      auto list_gap = [&](int end) {
        for (int m = next; m < end && cl.missing_experts.size() < kMaxListedMissing; ++m)
          cl.missing_experts.push_back(m);
      };
      for (const auto& [e, n] : t.experts) {
        if (e >= spec.num_experts) break;
        list_gap(e);
        ++present;
        next = e + 1;
      }
      list_gap(spec.num_experts);
      cl.missing_count = spec.num_experts - present;
      std::map<int, int> counts;  // tensors per expert -> experts with that many
      for (const auto& [e, n] : t.experts) ++counts[n];
      int usual = 0, most = 0;
      for (const auto& [n, k] : counts)
        if (k > most) most = k, usual = n;
      for (const auto& [e, n] : t.experts) {
        if (e >= spec.num_experts)
          info.warnings.push_back("layer " + std::to_string(l) + ": expert " + std::to_string(e) +
                                  " is beyond the " + std::to_string(spec.num_experts) +
                                  " experts of config.json");
        else if (n != usual)
          info.warnings.push_back("layer " + std::to_string(l) + ": expert " + std::to_string(e) +
                                  " has " + std::to_string(n) + " tensors where the others have " +
                                  std::to_string(usual));
      }
    }
    if (cl.missing_count > 0)
      info.warnings.push_back("layer " + std::to_string(l) + ": " +
                              std::to_string(cl.missing_count) + " of " +
                              std::to_string(spec.num_experts) + " experts missing (first: " +
                              std::to_string(cl.missing_experts.front()) + ")");
    info.moe_layers.push_back(std::move(cl));
  }
  if (layers.empty()) {
    info.warnings.push_back("no tensor names with routed experts ('layers.<L>.<block>.experts.') found");
  } else {
    const auto& first = layers.begin()->second;
    const bool bias = spec.routing.method == RoutingMethod::deepseek_v3
                          ? static_cast<bool>(c.find(first.prefix + "gate.e_score_correction_bias"))
                      : spec.routing.method == RoutingMethod::topk_softmax
                          ? static_cast<bool>(c.find(first.prefix + "router.bias"))
                          : false;
    info.routing.has_bias = bias;
  }
  return info;
}

LoadedLayer load_moe_layer(const std::string& dir, int layer, int64_t tokens,
                           const LoadOptions& options) {
  const ckpt::ModelSpec spec = ckpt::read_model_spec(dir);
  const st::Checkpoint c = st::Checkpoint::open(dir);
  const auto layers = ckpt::scan_layers(c);
  const auto it = layers.find(layer);
  FP4MOE_CHECK(it != layers.end(), dir << ": layer " << layer
                                       << " has no routed experts (layers with experts: "
                                       << layer_list(layers) << ")");
  const int E = spec.num_experts;
  const int first = options.local_expert_offset;
  FP4MOE_CHECK(options.num_local_experts >= 0,
               "LoadOptions.num_local_experts must be >= 0 (0 loads all experts), got "
                   << options.num_local_experts);
  FP4MOE_CHECK(first >= 0 && first < E, "LoadOptions.local_expert_offset = "
                                            << first << " must be in [0, " << E
                                            << "), the experts of " << dir);
  // 64-bit: an end past INT_MAX is reported as a range, never wrapped into a tensor lookup.
  const int64_t count = options.num_local_experts > 0 ? options.num_local_experts : int64_t{E} - first;
  FP4MOE_CHECK(int64_t{first} + count <= E,
               "local experts [" << first << ", " << int64_t{first} + count << ") are outside the "
                                 << E << " experts of " << dir);

  LoadedLayer out;
  MoeProblem& p = out.problem;
  p.tokens = tokens;
  p.hidden = spec.hidden;
  p.intermediate = spec.intermediate;
  p.num_experts = E;
  p.top_k = spec.top_k;
  p.local_expert_offset = first;
  p.num_local_experts = options.num_local_experts;
  p.format = spec.format == CheckpointFormat::gpt_oss_mxfp4 ? Format::mxfp4 : Format::nvfp4;
  p.input_mode = options.input_mode;
  p.activation = spec.activation;
  p.routing = spec.routing;
  p.has_bias = spec.format == CheckpointFormat::gpt_oss_mxfp4;
  out.warnings = spec.warnings;
  out.weights.format = p.format;
  out.weights.hidden = p.hidden;
  out.weights.intermediate = p.intermediate;
  // Sizes, ranges and routing from config.json are checked before any tensor is read.
  p.validate();

  Loader loader{c, spec, options, out, it->second.prefix};
  if (spec.format == CheckpointFormat::gpt_oss_mxfp4) {
    FP4MOE_CHECK(it->second.fused, dir << ": layer " << layer << " of an mxfp4 checkpoint has no '"
                                       << it->second.prefix
                                       << "experts.gate_up_proj_blocks' (the gpt-oss layout)");
    loader.gpt_oss(first, static_cast<int>(count));
  } else {
    loader.per_expert_nvfp4(first, static_cast<int>(count));
  }
  loader.router();
  p.validate();
  validate(p, out.weights);
  return out;
}

std::vector<float> router_logits(const LoadedLayer& layer, const uint16_t* x, int64_t tokens) {
  const int64_t E = layer.problem.num_experts, H = layer.problem.hidden;
  FP4MOE_CHECK(tokens >= 0, "router_logits: tokens must be >= 0, got " << tokens);
  if (tokens == 0) return {};
  FP4MOE_CHECK(x != nullptr, "router_logits: x is null for " << tokens << " tokens");
  detail::check_host_bytes(detail::checked_add(detail::checked_mul(tokens, H * 4, "router_logits x"),
                                               detail::checked_mul(tokens, E * 4, "router_logits logits"),
                                               "router_logits"),
                           "router_logits (x in fp32 and the [T, E] logits)");
  FP4MOE_CHECK(static_cast<int64_t>(layer.router_weight.size()) == E * H,
               "router_logits: the layer has " << layer.router_weight.size()
                                               << " router weights, expected E * H = " << E * H);
  std::vector<float> xf(static_cast<size_t>(tokens * H));
  for (size_t i = 0; i < xf.size(); ++i) xf[i] = bf16_to_float(x[i]);
  std::vector<float> logits(static_cast<size_t>(tokens * E));
  for (int64_t t = 0; t < tokens; ++t)
    for (int64_t e = 0; e < E; ++e) {
      double acc = 0.0;
      const float* w = &layer.router_weight[e * H];
      const float* xt = &xf[t * H];
      for (int64_t h = 0; h < H; ++h) acc += static_cast<double>(xt[h]) * w[h];
      logits[t * E + e] = static_cast<float>(acc);
    }
  return logits;
}

}  // namespace fp4moe
