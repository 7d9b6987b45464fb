// Names of the enumerations, one table per enum so printing and parsing cannot disagree.
#include "fp4moe/types.h"

#include <array>
#include <string>
#include <utility>

#include "fp4moe/error.h"

namespace fp4moe {
namespace {

template <typename E, size_t N>
using NameTable = std::array<std::pair<E, std::string_view>, N>;

constexpr NameTable<Format, 2> kFormats{{{Format::nvfp4, "nvfp4"}, {Format::mxfp4, "mxfp4"}}};
constexpr NameTable<ScaleDirection, 2> kDirections{
    {{ScaleDirection::decode, "decode"}, {ScaleDirection::encode, "encode"}}};
constexpr NameTable<ScaleLayout, 2> kLayouts{
    {{ScaleLayout::linear, "linear"}, {ScaleLayout::swizzled_128x4, "swizzled_128x4"}}};
constexpr NameTable<RoutingMethod, 6> kRoutings{{{RoutingMethod::softmax_topk, "softmax_topk"},
                                                 {RoutingMethod::topk_softmax, "topk_softmax"},
                                                 {RoutingMethod::deepseek_v3, "deepseek_v3"},
                                                 {RoutingMethod::llama4, "llama4"},
                                                 {RoutingMethod::sigmoid_topk, "sigmoid_topk"},
                                                 {RoutingMethod::precomputed, "precomputed"}}};
constexpr NameTable<Activation, 4> kActivations{{{Activation::swiglu, "swiglu"},
                                                 {Activation::swiglu_oai, "swiglu_oai"},
                                                 {Activation::relu2, "relu2"},
                                                 {Activation::geglu_tanh, "geglu_tanh"}}};
constexpr NameTable<InputMode, 2> kInputModes{
    {{InputMode::w4a16, "w4a16"}, {InputMode::w4a4, "w4a4"}}};
constexpr NameTable<DType, 2> kDTypes{{{DType::f32, "f32"}, {DType::bf16, "bf16"}}};

template <typename E, size_t N>
std::string_view name_of(const NameTable<E, N>& table, E v) {
  for (const auto& [value, name] : table)
    if (value == v) return name;
  return "<invalid>";
}

template <typename E, size_t N>
E parse_name(const NameTable<E, N>& table, std::string_view s, const char* what) {
  for (const auto& [value, name] : table)
    if (name == s) return value;
  std::string accepted;
  for (const auto& [value, name] : table) {
    if (!accepted.empty()) accepted += ", ";
    accepted += name;
  }
  FP4MOE_FAIL("unknown " << what << " '" << s << "'; accepted names: " << accepted);
}

}  // namespace

std::string_view to_string(Format v) { return name_of(kFormats, v); }
std::string_view to_string(ScaleDirection v) { return name_of(kDirections, v); }
std::string_view to_string(ScaleLayout v) { return name_of(kLayouts, v); }
std::string_view to_string(RoutingMethod v) { return name_of(kRoutings, v); }
std::string_view to_string(Activation v) { return name_of(kActivations, v); }
std::string_view to_string(InputMode v) { return name_of(kInputModes, v); }
std::string_view to_string(DType v) { return name_of(kDTypes, v); }

Format parse_format(std::string_view s) { return parse_name(kFormats, s, "format"); }
RoutingMethod parse_routing(std::string_view s) { return parse_name(kRoutings, s, "routing method"); }
Activation parse_activation(std::string_view s) { return parse_name(kActivations, s, "activation"); }
InputMode parse_input_mode(std::string_view s) { return parse_name(kInputModes, s, "input mode"); }
DType parse_dtype(std::string_view s) { return parse_name(kDTypes, s, "dtype"); }

}  // namespace fp4moe
