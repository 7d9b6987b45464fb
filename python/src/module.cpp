// fp4moe._C: the nanobind extension behind the fp4moe Python package. This file defines the module,
// the exception mapping and the enumerations, configurations, problem and presets.
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/string_view.h>
#include <nanobind/stl/vector.h>

#include <string>

#include "common.h"
#include "fp4moe/presets.h"
#include "fp4moe/problem.h"
#include "fp4moe/types.h"

namespace fp4moe::py {
namespace {

// fp4moe.Error derives from both ValueError (most failures are bad arguments) and RuntimeError (the
// C++ type derives from std::runtime_error), so callers can catch either.
PyObject* g_error = nullptr;

template <class E, class Parse>
void enum_from_string(nb::enum_<E>& e, Parse parse) {
  e.def_static("parse", [parse](std::string_view s) { return parse(s); }, nb::arg("name"),
               "The member with this name; raises fp4moe.Error listing the accepted names.");
  e.def_prop_ro("label", [](E v) { return std::string(to_string(v)); },
                "The name the library prints and parses.");
}

// Field setters that convert through the checked helpers of common.h (convert_field): an
// out-of-range int or a wrong type is an fp4moe.Error naming "Class.field", the expected and the
// given value.
template <class C, class T>
void def_field(nb::class_<C>& cls, const char* name, T C::*member, const char* label) {
  cls.def_prop_rw(
      name, [member](const C& c) { return c.*member; },
      [member, label](C& c, nb::handle v) { c.*member = convert_field<T>(v, label); });
}

}  // namespace

void bind_types(nb::module_& m) {
  nb::enum_<Format> fmt(m, "Format", "FP4 weight format (SPEC \"FP4 formats\").");
  fmt.value("nvfp4", Format::nvfp4).value("mxfp4", Format::mxfp4);
  enum_from_string(fmt, [](std::string_view s) { return parse_format(s); });

  nb::enum_<ScaleDirection>(m, "ScaleDirection",
                            "Direction of an NVFP4 global scale: decode (value = e2m1 * s * g, "
                            "ModelOpt weight_scale_2) or encode (value = e2m1 * s / g).")
      .value("decode", ScaleDirection::decode)
      .value("encode", ScaleDirection::encode);
  nb::enum_<ScaleLayout>(m, "ScaleLayout", "Layout of a block-scale matrix.")
      .value("linear", ScaleLayout::linear)
      .value("swizzled_128x4", ScaleLayout::swizzled_128x4);

  nb::enum_<RoutingMethod> rm(m, "RoutingMethod");
  rm.value("softmax_topk", RoutingMethod::softmax_topk)
      .value("topk_softmax", RoutingMethod::topk_softmax)
      .value("deepseek_v3", RoutingMethod::deepseek_v3)
      .value("llama4", RoutingMethod::llama4)
      .value("sigmoid_topk", RoutingMethod::sigmoid_topk)
      .value("precomputed", RoutingMethod::precomputed);
  enum_from_string(rm, [](std::string_view s) { return parse_routing(s); });

  nb::enum_<Activation> act(m, "Activation");
  act.value("swiglu", Activation::swiglu)
      .value("swiglu_oai", Activation::swiglu_oai)
      .value("relu2", Activation::relu2)
      .value("geglu_tanh", Activation::geglu_tanh);
  enum_from_string(act, [](std::string_view s) { return parse_activation(s); });

  nb::enum_<InputMode> im(m, "InputMode");
  im.value("w4a16", InputMode::w4a16).value("w4a4", InputMode::w4a4);
  enum_from_string(im, [](std::string_view s) { return parse_input_mode(s); });

  nb::enum_<DType> dt(m, "DType", "Element type of router logits.");
  dt.value("f32", DType::f32).value("bf16", DType::bf16);
  enum_from_string(dt, [](std::string_view s) { return parse_dtype(s); });

  nb::class_<RoutingConfig> rc(m, "RoutingConfig");
  rc.def(nb::init<>());
  def_field(rc, "method", &RoutingConfig::method, "RoutingConfig.method");
  def_field(rc, "renormalize", &RoutingConfig::renormalize, "RoutingConfig.renormalize");
  def_field(rc, "n_group", &RoutingConfig::n_group, "RoutingConfig.n_group");
  def_field(rc, "topk_group", &RoutingConfig::topk_group, "RoutingConfig.topk_group");
  def_field(rc, "routed_scaling_factor", &RoutingConfig::routed_scaling_factor,
            "RoutingConfig.routed_scaling_factor");
  def_field(rc, "has_bias", &RoutingConfig::has_bias, "RoutingConfig.has_bias");
  def_field(rc, "logits_dtype", &RoutingConfig::logits_dtype, "RoutingConfig.logits_dtype");

  nb::class_<ActivationConfig> ac(m, "ActivationConfig");
  ac.def(nb::init<>());
  def_field(ac, "kind", &ActivationConfig::kind, "ActivationConfig.kind");
  def_field(ac, "alpha", &ActivationConfig::alpha, "ActivationConfig.alpha");
  def_field(ac, "limit", &ActivationConfig::limit, "ActivationConfig.limit");

  nb::class_<MoeProblem> mp(m, "MoeProblem",
                            "What one MoE layer call computes (SPEC \"The layer\"). Fields are plain "
                            "attributes; validate() checks their consistency.");
  def_field(mp, "tokens", &MoeProblem::tokens, "MoeProblem.tokens");
  def_field(mp, "hidden", &MoeProblem::hidden, "MoeProblem.hidden");
  def_field(mp, "intermediate", &MoeProblem::intermediate, "MoeProblem.intermediate");
  def_field(mp, "num_experts", &MoeProblem::num_experts, "MoeProblem.num_experts");
  def_field(mp, "top_k", &MoeProblem::top_k, "MoeProblem.top_k");
  def_field(mp, "local_expert_offset", &MoeProblem::local_expert_offset, "MoeProblem.local_expert_offset");
  def_field(mp, "num_local_experts", &MoeProblem::num_local_experts, "MoeProblem.num_local_experts");
  def_field(mp, "format", &MoeProblem::format, "MoeProblem.format");
  def_field(mp, "input_mode", &MoeProblem::input_mode, "MoeProblem.input_mode");
  def_field(mp, "has_bias", &MoeProblem::has_bias, "MoeProblem.has_bias");
  mp.def(nb::init<>())
      .def("__copy__", [](const MoeProblem& p) { return MoeProblem(p); })
      .def("copy", [](const MoeProblem& p) { return MoeProblem(p); }, "An independent copy.")
      .def_rw("activation", &MoeProblem::activation)
      .def_rw("routing", &MoeProblem::routing)
      .def("local_experts", &MoeProblem::local_experts, "Experts this layer holds.")
      .def("gated", &MoeProblem::gated)
      .def("w13_rows", &MoeProblem::w13_rows)
      .def("validate", &MoeProblem::validate,
           "Raises fp4moe.Error naming the first inconsistent field.")
      .def("__repr__", &MoeProblem::to_string);

  nb::class_<Preset>(m, "Preset", "A model preset of SPEC \"Model presets\".")
      .def_prop_ro("name", [](const Preset& p) { return std::string(p.name); })
      .def_ro("hidden", &Preset::hidden)
      .def_ro("intermediate", &Preset::intermediate)
      .def_ro("num_experts", &Preset::num_experts)
      .def_ro("top_k", &Preset::top_k)
      .def_ro("routing", &Preset::routing)
      .def_ro("activation", &Preset::activation)
      .def_ro("format", &Preset::format)
      .def_ro("has_bias", &Preset::has_bias)
      .def_prop_ro("notes", [](const Preset& p) { return std::string(p.notes); })
      .def("problem", [](const Preset& p, nb::handle tokens) {
             return p.problem(to_int<int64_t>(tokens, "tokens"));
           }, nb::arg("tokens"),
           "A problem for `tokens` tokens with this preset's shapes, routing and activation.")
      .def("__repr__", [](const Preset& p) { return "Preset(" + std::string(p.name) + ")"; });

  m.def(
      "presets",
      [] {
        std::vector<Preset> out;
        for (const Preset& p : presets()) out.push_back(p);
        return out;
      },
      "Every model preset.");
  m.def(
      "find_preset", [](std::string_view name) { return find_preset(name); }, nb::arg("name"),
      "The preset called `name`; raises fp4moe.Error listing the known names otherwise.");
}

}  // namespace fp4moe::py

NB_MODULE(_C, m) {
  namespace nb = nanobind;
  using namespace fp4moe::py;
  m.doc() = "fp4moe: FP4 Mixture-of-Experts layers on Hopper (native extension).";

  nb::object bases = nb::make_tuple(nb::handle(PyExc_ValueError), nb::handle(PyExc_RuntimeError));
  g_error = PyErr_NewExceptionWithDoc(
      "fp4moe.Error",
      "Every failure fp4moe reports: bad shapes, dtypes, devices, sizes, values, CUDA errors. The "
      "message names the argument and says what was expected.",
      bases.ptr(), nullptr);
  if (!g_error) throw nb::python_error();
  m.attr("Error") = nb::handle(g_error);
  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const fp4moe::Error& e) {
      PyErr_SetString(g_error, e.what());
    }
  });

  bind_types(m);
  bind_formats(m);
  bind_weights(m);
  bind_gpu(m);
  bind_checkpoint(m);
}
