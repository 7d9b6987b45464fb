// prepack_device against the host prepack: the same bytes for every checkpoint layout (linear and
// swizzled scales, both global-scale directions, separate / concatenated / interleaved gate-up,
// biases in fp32 and bf16, W4A4 input scales, expert-parallel ranges), the same errors for NaN
// scales; and deepseek_v3 routing without renormalization on the decode path.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <memory>

#include "gpu/gpu_harness.h"

namespace fp4moe {
namespace {

using testing::DevBuf;

struct Layout {
  std::string name;
  GateUpLayout gate_up = GateUpLayout::separate;
  ScaleLayout scales = ScaleLayout::linear;
  ScaleDirection direction = ScaleDirection::decode;
  DType bias_dtype = DType::f32;
};

// Device copies of a layer's tensors in one checkpoint layout, owning their buffers.
struct DeviceLayer {
  std::vector<std::unique_ptr<DevBuf<uint8_t>>> bytes;
  std::vector<std::unique_ptr<DevBuf<float>>> floats;
  std::vector<std::unique_ptr<DevBuf<uint16_t>>> halves;
  DeviceCheckpointLayer in;

  const void* put(const std::vector<uint8_t>& v) {
    bytes.push_back(std::make_unique<DevBuf<uint8_t>>(v));
    return bytes.back()->ptr;
  }
  const void* put_bias(const std::vector<float>& v, DType t) {
    if (t == DType::f32) {
      floats.push_back(std::make_unique<DevBuf<float>>(v));
      return floats.back()->ptr;
    }
    std::vector<uint16_t> h(v.size());
    for (size_t i = 0; i < v.size(); ++i) h[i] = float_to_bf16(v[i]);
    halves.push_back(std::make_unique<DevBuf<uint16_t>>(h));
    return halves.back()->ptr;
  }
};

std::vector<uint8_t> scales_in(const QuantizedMatrix& m, ScaleLayout l) {
  return l == ScaleLayout::linear ? m.scales : swizzle_scales_128x4(m.scales, m.rows, m.scale_cols());
}

// Makes the host weights exactly what the device path will see: global scales that survive the
// chosen direction exactly, one global scale for a fused gate_up, biases rounded to bf16 when they
// travel as bf16.
void align_host(MoeWeights& w, const Layout& l) {
  for (auto& x : w.experts) {
    for (QuantizedMatrix* m : {&x.gate, &x.up, &x.down})
      // A power of two: its reciprocal is exact, so both paths see the same decode value.
      if (!m->empty() && m->format == Format::nvfp4 && l.direction == ScaleDirection::encode)
        m->global_scale = std::exp2(std::round(std::log2(m->global_scale)));
    if (l.gate_up != GateUpLayout::separate && x.gate.format == Format::nvfp4) x.up.global_scale = x.gate.global_scale;
    if (l.bias_dtype == DType::bf16)
      for (auto* b : {&x.gate_bias, &x.up_bias, &x.down_bias})
        for (float& v : *b) v = bf16_to_float(float_to_bf16(v));
  }
}

float stored(float decode, const Layout& l) {
  return convert_global_scale(decode, ScaleDirection::decode, l.direction);
}

DeviceLayer upload_layer(const MoeProblem& p, const MoeWeights& w, const Layout& l) {
  DeviceLayer d;
  d.in.scale_layout = l.scales;
  d.in.direction = l.direction;
  d.in.gate_up_layout = l.gate_up;
  const bool nv = p.format == Format::nvfp4;
  for (const ExpertWeights& x : w.experts) {
    if (l.gate_up == GateUpLayout::separate) {
      if (p.gated()) {
        d.in.gate.data.push_back(d.put(x.gate.data));
        d.in.gate.scales.push_back(d.put(scales_in(x.gate, l.scales)));
        if (nv) d.in.gate.global_scale.push_back(stored(x.gate.global_scale, l));
        if (p.has_bias) d.in.gate_bias.data.push_back(d.put_bias(x.gate_bias, l.bias_dtype));
      }
      d.in.up.data.push_back(d.put(x.up.data));
      d.in.up.scales.push_back(d.put(scales_in(x.up, l.scales)));
      if (nv) d.in.up.global_scale.push_back(stored(x.up.global_scale, l));
      if (p.has_bias) d.in.up_bias.data.push_back(d.put_bias(x.up_bias, l.bias_dtype));
    } else {
      // Fused [2I, H]: concatenated (gate rows, then up rows) or interleaved (2i gate, 2i + 1 up).
      QuantizedMatrix f = x.gate;
      f.rows = 2 * x.gate.rows;
      f.data.assign(x.gate.data.size() * 2, 0);
      f.scales.assign(x.gate.scales.size() * 2, 0);
      std::vector<float> bias(x.gate_bias.size() * 2);
      const int64_t rb = x.gate.cols / 2, rs = x.gate.scale_cols();
      for (int64_t i = 0; i < x.gate.rows; ++i)
        for (int h = 0; h < 2; ++h) {
          const QuantizedMatrix& src = h ? x.up : x.gate;
          const int64_t dst = l.gate_up == GateUpLayout::interleaved ? 2 * i + h : h * x.gate.rows + i;
          std::copy_n(src.data.begin() + i * rb, rb, f.data.begin() + dst * rb);
          std::copy_n(src.scales.begin() + i * rs, rs, f.scales.begin() + dst * rs);
          if (p.has_bias) bias[size_t(dst)] = (h ? x.up_bias : x.gate_bias)[size_t(i)];
        }
      d.in.gate_up.data.push_back(d.put(f.data));
      d.in.gate_up.scales.push_back(d.put(scales_in(f, l.scales)));
      if (nv) d.in.gate_up.global_scale.push_back(stored(x.gate.global_scale, l));
      if (p.has_bias) d.in.gate_up_bias.data.push_back(d.put_bias(bias, l.bias_dtype));
    }
    d.in.down.data.push_back(d.put(x.down.data));
    d.in.down.scales.push_back(d.put(scales_in(x.down, l.scales)));
    if (nv) d.in.down.global_scale.push_back(stored(x.down.global_scale, l));
    if (p.has_bias) d.in.down_bias.data.push_back(d.put_bias(x.down_bias, l.bias_dtype));
    if (p.input_mode == InputMode::w4a4) {
      d.in.input_scale13.push_back(x.input_scale13);
      d.in.input_scale2.push_back(x.input_scale2);
    }
  }
  d.in.gate_bias.dtype = d.in.up_bias.dtype = d.in.gate_up_bias.dtype = d.in.down_bias.dtype = l.bias_dtype;
  return d;
}

std::string region(const PackedLayout& L, int64_t off) {
  const std::pair<const char*, int64_t> r[] = {{"w13", L.w13_off}, {"s13", L.s13_off}, {"w2", L.w2_off},
                                               {"s2", L.s2_off},   {"scales", L.scales_off}, {"b13", L.b13_off},
                                               {"b2", L.b2_off}};
  std::string name = "?";
  for (const auto& [n, o] : r)
    if (off >= o) name = n;
  return name;
}

struct Case {
  std::string name;
  MoeProblem p;
  Layout layout;
};
void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

MoeProblem base(int H, int I, int E, int k, Format f) {
  MoeProblem p;
  p.tokens = 1;
  p.hidden = H;
  p.intermediate = I;
  p.num_experts = E;
  p.top_k = k;
  p.format = f;
  return p;
}

std::vector<Case> cases() {
  std::vector<Case> v;
  v.push_back({"nvfp4_linear_decode", base(320, 96, 6, 2, Format::nvfp4), {"l"}});
  v.push_back({"nvfp4_swizzled_encode", base(320, 96, 5, 2, Format::nvfp4),
               {"s", GateUpLayout::separate, ScaleLayout::swizzled_128x4, ScaleDirection::encode}});
  v.push_back({"nvfp4_concatenated_swizzled", base(256, 160, 4, 2, Format::nvfp4),
               {"c", GateUpLayout::concatenated, ScaleLayout::swizzled_128x4}});
  {
    MoeProblem p = base(288, 160, 6, 2, Format::mxfp4);
    p.activation.kind = Activation::swiglu_oai;
    p.routing.method = RoutingMethod::topk_softmax;
    p.routing.has_bias = true;
    p.has_bias = true;
    v.push_back({"mxfp4_gpt_oss_interleaved_bf16_bias", p, {"i", GateUpLayout::interleaved, ScaleLayout::linear,
                                                             ScaleDirection::decode, DType::bf16}});
    v.push_back({"mxfp4_separate_f32_bias", p, {"m"}});
  }
  {
    MoeProblem p = base(256, 80, 4, 2, Format::nvfp4);
    p.activation.kind = Activation::relu2;
    p.has_bias = true;
    v.push_back({"nvfp4_relu2_bias", p, {"r"}});
  }
  {
    MoeProblem p = base(512, 256, 16, 4, Format::nvfp4);
    p.input_mode = InputMode::w4a4;
    p.local_expert_offset = 4;
    p.num_local_experts = 7;
    v.push_back({"nvfp4_w4a4_expert_parallel", p, {"w", GateUpLayout::separate, ScaleLayout::linear,
                                                    ScaleDirection::encode}});
  }
  return v;
}

class PrepackDevice : public ::testing::TestWithParam<Case> {};

TEST_P(PrepackDevice, BitwiseEqualToHostPrepack) {
  GPU_TEST_PREAMBLE();
  const Case& c = GetParam();
  MoeWeights w = random_weights(c.p, 77 + std::hash<std::string>{}(c.name) % 100);
  align_host(w, c.layout);
  const PackedWeights host = prepack(c.p, w);
  DeviceLayer d = upload_layer(c.p, w, c.layout);
  const DeviceWeights dw = prepack_device(c.p, d.in, nullptr);
  ASSERT_EQ(dw.layout().total_bytes, host.layout.total_bytes);
  std::vector<uint8_t> got(size_t(host.layout.total_bytes));
  CUDA_OK(cudaMemcpy(got.data(), dw.data(), got.size(), cudaMemcpyDeviceToHost));
  for (size_t i = 0; i < got.size(); ++i)
    ASSERT_EQ(int(got[i]), int(host.bytes[i])) << c.name << ": first mismatch at byte " << i << " (region "
                                               << region(host.layout, int64_t(i)) << ")";
  std::printf("  %-40s %lld bytes identical\n", c.name.c_str(), (long long)got.size());
}

INSTANTIATE_TEST_SUITE_P(Layouts, PrepackDevice, ::testing::ValuesIn(cases()),
                         [](const auto& info) { return info.param.name; });

std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A NaN block scale is found on the device and reported like the host does: the first one in
// (expert, matrix, row, block) order, whatever the layout.
TEST(PrepackDeviceErrors, NaNScalesNameExpertMatrixRowBlock) {
  GPU_TEST_PREAMBLE();
  for (Format f : {Format::nvfp4, Format::mxfp4}) {
    for (const Layout& l : {Layout{"sep"}, Layout{"int", GateUpLayout::interleaved}}) {
      if (f == Format::nvfp4 && l.gate_up == GateUpLayout::interleaved) continue;
      MoeProblem p = base(256, 96, 5, 2, f);
      MoeWeights w = random_weights(p, 9);
      const uint8_t nan = f == Format::nvfp4 ? 0xFF : 0xFF;
      const int64_t kc = w.experts[3].up.scale_cols();
      w.experts[3].up.scales[size_t(7 * kc + 2)] = nan;   // expert 3 up row 7 block 2
      w.experts[3].down.scales[0] = nan;                  // later in order
      w.experts[4].gate.scales[1] = nan;                  // later expert
      const std::string host = error_of([&] { prepack(p, w); });
      DeviceLayer d = upload_layer(p, w, l);
      const std::string dev = error_of([&] { prepack_device(p, d.in, nullptr); });
      EXPECT_NE(host.find("expert 3 up: block scale of row 7, block 2"), std::string::npos) << host;
      EXPECT_EQ(host, dev);
    }
  }
}

TEST(PrepackDeviceErrors, BadArgumentsAreRejectedBeforeAnyLaunch) {
  GPU_TEST_PREAMBLE();
  MoeProblem p = base(256, 96, 4, 2, Format::nvfp4);
  MoeWeights w = random_weights(p, 3);
  DeviceLayer d = upload_layer(p, w, Layout{"l"});
  DeviceCheckpointLayer bad = d.in;
  bad.up.data.pop_back();
  EXPECT_NE(error_of([&] { prepack_device(p, bad); }).find("up needs data and scales of the 4 local experts"),
            std::string::npos);
  bad = d.in;
  bad.down.global_scale[2] = -1.0f;
  EXPECT_NE(error_of([&] { prepack_device(p, bad); }).find("expert 2 down global_scale must be a finite positive"),
            std::string::npos);
  bad = d.in;
  bad.gate.data[1] = static_cast<const uint8_t*>(bad.gate.data[1]) + 4;
  EXPECT_NE(error_of([&] { prepack_device(p, bad); }).find("must be 8-byte aligned"), std::string::npos);
  bad = d.in;
  bad.gate_up_layout = GateUpLayout::interleaved;
  EXPECT_NE(error_of([&] { prepack_device(p, bad); }).find("gate must be empty"), std::string::npos);
  MoeProblem a4 = p;
  a4.input_mode = InputMode::w4a4;
  EXPECT_NE(error_of([&] { prepack_device(a4, d.in); }).find("W4A4 needs the activations' input scales"),
            std::string::npos);
}

// deepseek_v3 routing with renormalize = false (norm_topk_prob false) on the decode path.
TEST(RoutingOptionsGpu, DeepseekWithoutRenormalizeMatchesReference) {
  GPU_TEST_PREAMBLE();
  for (bool renorm : {false, true}) {
    MoeProblem p = base(256, 128, 32, 6, Format::nvfp4);
    p.tokens = 9;
    p.routing.method = RoutingMethod::deepseek_v3;
    p.routing.n_group = 4;
    p.routing.topk_group = 2;
    p.routing.routed_scaling_factor = 2.5f;
    p.routing.has_bias = true;
    p.routing.renormalize = renorm;
    const MoeWeights w = random_weights(p, 31);
    const auto data = testing::random_inputs(p, 32);
    const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, data));
    DeviceWeights dw(prepack(p, w));
    const auto got = testing::run_gpu(p, dw, data);
    const auto st = testing::compare(got, ref.out);
    EXPECT_EQ(st.nan_count, 0);
    EXPECT_LT(st.rel_l2, 1e-2) << "renormalize " << renorm;
  }
}

}  // namespace
}  // namespace fp4moe
