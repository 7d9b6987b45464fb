// Bindings of the host expert weights (built from NumPy arrays in the checkpoint layout, or random),
// host routing and the CPU reference layer.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>

#include <cmath>
#include <optional>
#include <string>

#include "common.h"
#include "fp4moe/reference.h"
#include "fp4moe/weights.h"

namespace fp4moe::py {
namespace {

using OptArray = std::optional<Array>;

// Expert e's [rows, cols] slab of a stacked uint8 array [E, rows, cols] as a 2-D view.
Array slab(const Array& a, int64_t e) {
  const size_t shape[2] = {a.shape(1), a.shape(2)};
  const auto* base = static_cast<const uint8_t*>(a.data()) + e * int64_t(a.shape(1) * a.shape(2));
  return Array(base, 2, shape, nb::handle(), nullptr, a.dtype(), a.device_type(), a.device_id());
}

void check_stack(const Array& a, const std::string& name, int64_t E, int64_t rows, int64_t cols) {
  check_array(a, name.c_str(), dtype_of<uint8_t>(), {E, rows, cols}, Where::cpu);
}

// Per-expert float32 values [E] (global or input scales).
std::vector<float> per_expert(const OptArray& a, const char* name, int64_t E, float fallback) {
  if (!a) return std::vector<float>(size_t(E), fallback);
  return to_vector<float>(*a, name, {E});
}

std::vector<float> bias_row(const OptArray& a, const char* name, int64_t e, int64_t E, int64_t n) {
  if (!a) return {};
  const float* p = host_data<float>(*a, name, {E, n});
  return std::vector<float>(p + e * n, p + (e + 1) * n);
}

MoeWeights weights_from_arrays(const MoeProblem& p, const OptArray& gate, const OptArray& gate_scales,
                               const Array& up, const Array& up_scales, const Array& down,
                               const Array& down_scales, const OptArray& gate_global,
                               const OptArray& up_global, const OptArray& down_global,
                               const OptArray& gate_bias, const OptArray& up_bias,
                               const OptArray& down_bias, const OptArray& input_scale13,
                               const OptArray& input_scale2, ScaleDirection direction,
                               ScaleLayout layout);

// make_weights from arbitrary objects: scales in uint8 or the format's own ml_dtypes float8 type,
// everything else in the dtype the table of docs/python.md gives.
MoeWeights weights_from_objects(const MoeProblem& p, nb::handle gate, nb::handle gate_scales,
                                nb::handle up, nb::handle up_scales, nb::handle down,
                                nb::handle down_scales, nb::handle gate_global, nb::handle up_global,
                                nb::handle down_global, nb::handle gate_bias, nb::handle up_bias,
                                nb::handle down_bias, nb::handle input_scale13,
                                nb::handle input_scale2, ScaleDirection direction,
                                ScaleLayout layout) {
  p.validate();
  const char* f8 = p.format == Format::nvfp4 ? "float8_e4m3fn" : "float8_e8m0fnu";
  MoeWeights w = weights_from_arrays(
      p, to_opt_array(gate, "gate"), to_opt_array(gate_scales, "gate_scales", f8), to_array(up, "up"),
      to_array(up_scales, "up_scales", f8), to_array(down, "down"),
      to_array(down_scales, "down_scales", f8), to_opt_array(gate_global, "gate_global_scale"),
      to_opt_array(up_global, "up_global_scale"), to_opt_array(down_global, "down_global_scale"),
      to_opt_array(gate_bias, "gate_bias"), to_opt_array(up_bias, "up_bias"),
      to_opt_array(down_bias, "down_bias"), to_opt_array(input_scale13, "input_scale13"),
      to_opt_array(input_scale2, "input_scale2"), direction, layout);
  check_block_scales(p, w);  // SPEC: NaN block scales are refused when weights are made
  return w;
}

MoeWeights weights_from_arrays(const MoeProblem& p, const OptArray& gate, const OptArray& gate_scales,
                               const Array& up, const Array& up_scales, const Array& down,
                               const Array& down_scales, const OptArray& gate_global,
                               const OptArray& up_global, const OptArray& down_global,
                               const OptArray& gate_bias, const OptArray& up_bias,
                               const OptArray& down_bias, const OptArray& input_scale13,
                               const OptArray& input_scale2, ScaleDirection direction,
                               ScaleLayout layout) {
  p.validate();
  const int64_t E = p.local_experts(), H = p.hidden, I = p.intermediate;
  const int blk = block_size(p.format);
  const bool nv = p.format == Format::nvfp4;
  FP4MOE_CHECK(layout == ScaleLayout::linear || nv,
               "the swizzled_128x4 scale layout exists only for nvfp4 scales");
  FP4MOE_CHECK(p.gated() == gate.has_value(),
               (p.gated() ? "gate is required for the gated activation "
                          : "gate must be None for the non-gated activation ")
                   << to_string(p.activation.kind));
  FP4MOE_CHECK(gate.has_value() == gate_scales.has_value(), "pass gate and gate_scales together");
  FP4MOE_CHECK(!p.has_bias || (up_bias && down_bias && (!p.gated() || gate_bias)),
               "the problem has has_bias = True: pass gate_bias (gated), up_bias and down_bias");
  FP4MOE_CHECK(p.has_bias || !(gate_bias || up_bias || down_bias),
               "the problem has has_bias = False: pass no biases");
  if (nv) {
    FP4MOE_CHECK(up_global && down_global && (!p.gated() || gate_global),
                 "nvfp4 weights need per-expert global scales: gate_global_scale (gated), "
                 "up_global_scale and down_global_scale, float32 [" << E << "]");
  } else {
    FP4MOE_CHECK(!gate_global && !up_global && !down_global,
                 "mxfp4 has no global scales; pass None");
  }
  if (p.input_mode == InputMode::w4a4) {
    FP4MOE_CHECK(input_scale13 && input_scale2,
                 "W4A4 needs the activations' input scales: input_scale13 and input_scale2, "
                 "float32 [" << E << "] in the decode direction");
  }

  auto check_scales = [&](const Array& s, const std::string& name, int64_t rows, int64_t kcols) {
    if (layout == ScaleLayout::linear) {
      check_stack(s, name, E, rows, kcols);
    } else {
      check_array(s, name.c_str(), dtype_of<uint8_t>(), {E, int64_t(swizzled_128x4_size(rows, kcols))},
                  Where::cpu);
    }
  };
  auto scale_slab = [&](const Array& s, int64_t e) {
    if (layout == ScaleLayout::linear) return slab(s, e);
    const size_t shape[1] = {s.shape(1)};
    const auto* base = static_cast<const uint8_t*>(s.data()) + e * int64_t(s.shape(1));
    return Array(base, 1, shape, nb::handle(), nullptr, s.dtype(), s.device_type(), s.device_id());
  };
  if (gate) {
    check_stack(*gate, "gate", E, I, H / 2);
    check_scales(*gate_scales, "gate_scales", I, H / blk);
  }
  check_stack(up, "up", E, I, H / 2);
  check_scales(up_scales, "up_scales", I, H / blk);
  check_stack(down, "down", E, H, I / 2);
  check_scales(down_scales, "down_scales", H, I / blk);

  const auto g_gate = per_expert(gate_global, "gate_global_scale", E, 1.0f);
  const auto g_up = per_expert(up_global, "up_global_scale", E, 1.0f);
  const auto g_down = per_expert(down_global, "down_global_scale", E, 1.0f);
  const auto in13 = per_expert(input_scale13, "input_scale13", E, 1.0f);
  const auto in2 = per_expert(input_scale2, "input_scale2", E, 1.0f);

  MoeWeights w;
  w.format = p.format;
  w.hidden = p.hidden;
  w.intermediate = p.intermediate;
  w.experts.resize(size_t(E));
  for (int64_t e = 0; e < E; ++e) {
    ExpertWeights& x = w.experts[size_t(e)];
    const std::string pre = "expert " + std::to_string(e) + " ";
    if (gate) {
      x.gate = make_matrix(p.format, slab(*gate, e), scale_slab(*gate_scales, e), g_gate[size_t(e)],
                           direction, layout, (pre + "gate").c_str());
    }
    x.up = make_matrix(p.format, slab(up, e), scale_slab(up_scales, e), g_up[size_t(e)], direction,
                       layout, (pre + "up").c_str());
    x.down = make_matrix(p.format, slab(down, e), scale_slab(down_scales, e), g_down[size_t(e)],
                         direction, layout, (pre + "down").c_str());
    if (p.has_bias) {
      if (p.gated()) x.gate_bias = bias_row(gate_bias, "gate_bias", e, E, I);
      x.up_bias = bias_row(up_bias, "up_bias", e, E, I);
      x.down_bias = bias_row(down_bias, "down_bias", e, E, H);
    }
    x.input_scale13 = in13[size_t(e)];
    x.input_scale2 = in2[size_t(e)];
  }
  validate(p, w);
  return w;
}

// bf16 bits of x [T, H]: uint16 (bf16 bits) as is, float32 rounded to nearest even.
std::vector<uint16_t> bf16_bits(const Array& x, const char* name, int64_t cols) {
  FP4MOE_CHECK(x.ndim() == 2, name << " must be 2-D [tokens, " << cols << "], got " << x.ndim()
                                   << " dimensions");
  if (same_dtype(x.dtype(), dtype_of<float>())) {
    const float* p = host_data<float>(x, name, {-1, cols});
    std::vector<uint16_t> out(x.size());
    for (size_t i = 0; i < out.size(); ++i) out[i] = float_to_bf16(p[i]);
    return out;
  }
  FP4MOE_CHECK(same_dtype(x.dtype(), dtype_of<uint16_t>()),
               name << " must be float32 or uint16 (bfloat16 bits), got " << dtype_name(x.dtype()));
  return to_vector<uint16_t>(x, name, {-1, cols});
}

struct HostCall {
  MoeProblem p;
  std::vector<uint16_t> x;
  std::vector<uint8_t> logits;  // raw bytes of f32 or bf16 logits
  std::vector<float> bias, weights;
  std::vector<int32_t> ids;
  HostInputs inputs() const {
    HostInputs in;
    in.x = x.data();
    if (p.routing.method == RoutingMethod::precomputed) {
      in.topk_ids = ids.data();
      in.topk_weights = weights.data();
    } else {
      in.logits = logits.data();
      in.router_bias = p.routing.has_bias ? bias.data() : nullptr;
    }
    return in;
  }
};

// Copies and checks the host inputs of one layer call; the problem's token count comes from x and
// its routing method becomes `precomputed` when topk_ids are given.
HostCall host_call(const MoeProblem& problem, const std::optional<Array>& x, int64_t tokens,
                   const OptArray& logits, const OptArray& router_bias, const OptArray& topk_ids,
                   const OptArray& topk_weights) {
  HostCall c;
  c.p = problem;
  if (x) {
    c.x = bf16_bits(*x, "x", problem.hidden);
    tokens = int64_t(x->shape(0));
  }
  c.p.tokens = tokens;
  const int64_t T = tokens, E = problem.num_experts, k = problem.top_k;
  if (topk_ids || topk_weights) {
    FP4MOE_CHECK(topk_ids && topk_weights, "pass topk_ids and topk_weights together");
    FP4MOE_CHECK(!logits, "pass either router logits or topk_ids / topk_weights, not both");
    FP4MOE_CHECK(!router_bias, "router_bias is used by the routing on logits; with topk_ids / "
                               "topk_weights pass none");
    c.p = c.p.with_precomputed_routing();
    c.ids = to_vector<int32_t>(*topk_ids, "topk_ids", {T, k});
    c.weights = to_vector<float>(*topk_weights, "topk_weights", {T, k});
  } else {
    FP4MOE_CHECK(logits, "pass router logits [tokens, " << E << "] or topk_ids / topk_weights");
    FP4MOE_CHECK(c.p.routing.method != RoutingMethod::precomputed,
                 "the problem's routing method is precomputed: pass topk_ids and topk_weights");
    if (same_dtype(logits->dtype(), dtype_of<float>())) {
      c.p.routing.logits_dtype = DType::f32;
      host_data<float>(*logits, "logits", {T, E});
    } else {
      FP4MOE_CHECK(same_dtype(logits->dtype(), dtype_of<uint16_t>()),
                   "logits must be float32 or uint16 (bfloat16 bits), got "
                       << dtype_name(logits->dtype()));
      c.p.routing.logits_dtype = DType::bf16;
      host_data<uint16_t>(*logits, "logits", {T, E});
    }
    const auto* b = static_cast<const uint8_t*>(logits->data());
    c.logits.assign(b, b + logits->nbytes());
    FP4MOE_CHECK(c.p.routing.has_bias == router_bias.has_value(),
                 (c.p.routing.has_bias ? "routing.has_bias is set: pass router_bias float32 ["
                                       : "routing.has_bias is not set: pass no router_bias [")
                     << E << "]");
    if (router_bias) c.bias = to_vector<float>(*router_bias, "router_bias", {E});
  }
  c.p.validate();
  return c;
}

nb::dict reference_forward(const MoeProblem& problem, const MoeWeights& w, nb::handle x_h,
                           nb::handle logits_h, nb::handle router_bias_h, nb::handle topk_ids_h,
                           nb::handle topk_weights_h, nb::handle threads_h) {
  const int threads = to_int<int>(threads_h, "threads");
  FP4MOE_CHECK(threads >= 0, "threads must be >= 0 (0: all cores), got " << threads);
  HostCall c = host_call(problem, to_array(x_h, "x", "bfloat16"), 0,
                         to_opt_array(logits_h, "logits", "bfloat16"),
                         to_opt_array(router_bias_h, "router_bias"), to_opt_array(topk_ids_h, "topk_ids"),
                         to_opt_array(topk_weights_h, "topk_weights"));
  ReferenceResult r;
  {
    nb::gil_scoped_release nogil;
    r = moe_reference(c.p, w, c.inputs(), threads);
  }
  const size_t T = size_t(c.p.tokens), H = size_t(c.p.hidden), k = size_t(c.p.top_k);
  std::vector<float> out(r.out.size());
  for (size_t i = 0; i < out.size(); ++i) out[i] = bf16_to_float(r.out[i]);
  nb::dict d;
  d["out"] = to_numpy(std::move(out), {T, H});
  d["out_bf16_bits"] = to_numpy(std::move(r.out), {T, H});
  d["out_f32"] = to_numpy(std::move(r.out_f32), {T, H});
  d["topk_ids"] = to_numpy(std::move(r.topk_ids), {T, k});
  d["topk_weights"] = to_numpy(std::move(r.topk_weights), {T, k});
  return d;
}

}  // namespace

void bind_weights(nb::module_& m) {
  nb::class_<ExpertWeights>(m, "ExpertWeights", "One expert's FP4 matrices, biases and input scales.")
      .def_ro("gate", &ExpertWeights::gate)
      .def_ro("up", &ExpertWeights::up)
      .def_ro("down", &ExpertWeights::down)
      .def_prop_ro("gate_bias", [](const ExpertWeights& x) { return to_numpy(x.gate_bias, {x.gate_bias.size()}); }, nb::rv_policy::move)
      .def_prop_ro("up_bias", [](const ExpertWeights& x) { return to_numpy(x.up_bias, {x.up_bias.size()}); }, nb::rv_policy::move)
      .def_prop_ro("down_bias", [](const ExpertWeights& x) { return to_numpy(x.down_bias, {x.down_bias.size()}); }, nb::rv_policy::move)
      .def_ro("input_scale13", &ExpertWeights::input_scale13)
      .def_ro("input_scale2", &ExpertWeights::input_scale2);

  nb::class_<MoeWeights>(m, "MoeWeights",
                         "The local experts of one layer on the host, in the checkpoint layout.")
      .def_ro("format", &MoeWeights::format)
      .def_ro("hidden", &MoeWeights::hidden)
      .def_ro("intermediate", &MoeWeights::intermediate)
      .def_prop_ro("num_experts", [](const MoeWeights& w) { return w.experts.size(); })
      .def(
          "expert",
          [](const MoeWeights& w, nb::handle e_h) -> const ExpertWeights& {
            const int64_t e = to_int<int64_t>(e_h, "e");
            FP4MOE_CHECK(e >= 0 && e < int64_t(w.experts.size()),
                         "expert " << e << " is out of range [0, " << w.experts.size() << ")");
            return w.experts[size_t(e)];
          },
          nb::arg("e"), nb::rv_policy::reference_internal)
      .def("__len__", [](const MoeWeights& w) { return w.experts.size(); })
      .def("__repr__", [](const MoeWeights& w) {
        return "MoeWeights(" + std::string(to_string(w.format)) + ", experts=" +
               std::to_string(w.experts.size()) + ", hidden=" + std::to_string(w.hidden) +
               ", intermediate=" + std::to_string(w.intermediate) + ")";
      });

  m.def("make_weights", &weights_from_objects, nb::arg("problem"), nb::arg("gate").none(),
        nb::arg("gate_scales").none(), nb::arg("up"), nb::arg("up_scales"), nb::arg("down"),
        nb::arg("down_scales"), nb::arg("gate_global_scale").none(),
        nb::arg("up_global_scale").none(), nb::arg("down_global_scale").none(),
        nb::arg("gate_bias").none(), nb::arg("up_bias").none(), nb::arg("down_bias").none(),
        nb::arg("input_scale13").none(), nb::arg("input_scale2").none(), nb::arg("direction"),
        nb::arg("scale_layout"));

  m.def(
      "random_weights",
      [](const MoeProblem& p, nb::handle seed_h) {
        const uint64_t seed = to_int<uint64_t>(seed_h, "seed");
        nb::gil_scoped_release nogil;
        return random_weights(p, seed);
      },
      nb::arg("problem"), nb::arg("seed"),
      "Random weights for tests and benchmarks, quantized with the library's quantizer.");
  m.def(
      "validate_weights", [](const MoeProblem& p, const MoeWeights& w) { validate(p, w); },
      nb::arg("problem"), nb::arg("weights"));

  m.def("reference_forward", &reference_forward, nb::arg("problem"), nb::arg("weights"), nb::arg("x"),
        nb::arg("logits").none(), nb::arg("router_bias").none(), nb::arg("topk_ids").none(),
        nb::arg("topk_weights").none(), nb::arg("threads"));

  m.def(
      "route",
      [](const MoeProblem& problem, nb::handle logits_h, nb::handle router_bias_h) {
        const Array logits = to_array(logits_h, "logits", "bfloat16");
        const OptArray router_bias = to_opt_array(router_bias_h, "router_bias");
        FP4MOE_CHECK(logits.ndim() == 2, "logits must be 2-D [tokens, " << problem.num_experts
                                                                        << "], got " << logits.ndim()
                                                                        << " dimensions");
        HostCall c = host_call(problem, std::nullopt, int64_t(logits.shape(0)), logits, router_bias,
                               std::nullopt, std::nullopt);
        const size_t T = size_t(c.p.tokens), k = size_t(c.p.top_k);
        std::vector<int32_t> ids(T * k);
        std::vector<float> wts(T * k);
        route_reference(c.p, c.logits.data(), c.bias.empty() ? nullptr : c.bias.data(), ids.data(),
                        wts.data());
        return nb::make_tuple(to_numpy(std::move(ids), {T, k}), to_numpy(std::move(wts), {T, k}));
      },
      nb::arg("problem"), nb::arg("logits"), nb::arg("router_bias").none() = nb::none(),
      "Host routing: (topk_ids int32 [T, k], topk_weights float32 [T, k]).");
}

}  // namespace fp4moe::py
