// Enum names, MoeProblem validation and the model presets.
#include <gtest/gtest.h>

#include <string>

#include "fp4moe/error.h"
#include "fp4moe/presets.h"
#include "fp4moe/problem.h"
#include "fp4moe/types.h"

namespace fp4moe {
namespace {

// Runs fn and returns the message of the fp4moe::Error it must throw.
template <typename Fn>
std::string error_of(Fn&& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an fp4moe::Error";
  return "";
}

#define EXPECT_ERROR_HAS(stmt, text) \
  EXPECT_NE(error_of([&] { stmt; }).find(text), std::string::npos) << error_of([&] { stmt; })

TEST(Types, NamesRoundTrip) {
  for (Format f : {Format::nvfp4, Format::mxfp4}) EXPECT_EQ(parse_format(to_string(f)), f);
  for (RoutingMethod m :
       {RoutingMethod::softmax_topk, RoutingMethod::topk_softmax, RoutingMethod::deepseek_v3,
        RoutingMethod::llama4, RoutingMethod::sigmoid_topk, RoutingMethod::precomputed})
    EXPECT_EQ(parse_routing(to_string(m)), m);
  for (Activation a : {Activation::swiglu, Activation::swiglu_oai, Activation::relu2,
                       Activation::geglu_tanh})
    EXPECT_EQ(parse_activation(to_string(a)), a);
  for (InputMode m : {InputMode::w4a16, InputMode::w4a4}) EXPECT_EQ(parse_input_mode(to_string(m)), m);
  for (DType d : {DType::f32, DType::bf16}) EXPECT_EQ(parse_dtype(to_string(d)), d);
  EXPECT_EQ(to_string(ScaleDirection::encode), "encode");
  EXPECT_EQ(to_string(ScaleLayout::swizzled_128x4), "swizzled_128x4");
}

TEST(Types, ParseErrorsListAcceptedNames) {
  EXPECT_ERROR_HAS(parse_format("fp4"), "nvfp4, mxfp4");
  EXPECT_ERROR_HAS(parse_routing("top2"), "softmax_topk, topk_softmax, deepseek_v3, llama4, "
                                          "sigmoid_topk, precomputed");
  EXPECT_ERROR_HAS(parse_activation("gelu"), "swiglu, swiglu_oai, relu2, geglu_tanh");
  EXPECT_ERROR_HAS(parse_input_mode("w8a8"), "w4a16, w4a4");
  EXPECT_ERROR_HAS(parse_dtype("f16"), "f32, bf16");
  EXPECT_ERROR_HAS(parse_format("NVFP4"), "'NVFP4'");
}

MoeProblem small() {
  MoeProblem p;
  p.tokens = 4;
  p.hidden = 64;
  p.intermediate = 32;
  p.num_experts = 8;
  p.top_k = 2;
  return p;
}

TEST(Problem, ValidAndPrintable) {
  MoeProblem p = small();
  EXPECT_NO_THROW(p.validate());
  EXPECT_EQ(p.local_experts(), 8);
  EXPECT_EQ(p.w13_rows(), 64);
  const std::string s = p.to_string();
  EXPECT_NE(s.find("T=4 H=64 I=32 E=8 k=2"), std::string::npos) << s;
  EXPECT_NE(s.find("routing=softmax_topk"), std::string::npos) << s;
  p.tokens = 0;
  EXPECT_NO_THROW(p.validate());
  p.activation.kind = Activation::relu2;
  EXPECT_EQ(p.w13_rows(), 32);
}

TEST(Problem, EachFieldIsChecked) {
  auto with = [](auto edit) {
    MoeProblem p = small();
    edit(p);
    return p;
  };
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.tokens = -1; }).validate(), "tokens (T)");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.hidden = 0; }).validate(), "hidden (H) must be positive, got 0");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.intermediate = -16; }).validate(), "intermediate (I)");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.num_experts = 0; }).validate(), "num_experts (E)");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.hidden = 72; }).validate(),
                   "hidden (H) = 72 must be a multiple of 16");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.format = Format::mxfp4; p.intermediate = 48; }).validate(),
                   "intermediate (I) = 48 must be a multiple of 32");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.top_k = 0; }).validate(), "top_k (k) = 0");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.top_k = 9; }).validate(), "top_k (k) = 9");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.num_experts = 64; p.top_k = 33; }).validate(),
                   "supported maximum 32");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.local_expert_offset = 8; }).validate(),
                   "local_expert_offset = 8");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.local_expert_offset = 4; p.num_local_experts = 5; }).validate(),
                   "local experts [4, 9) exceed num_experts = 8");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.local_expert_offset = 2; }).validate(),
                   "local experts [2, 10)");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.num_local_experts = -1; }).validate(), "num_local_experts");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) {
                     p.format = Format::mxfp4;
                     p.input_mode = InputMode::w4a4;
                   }).validate(),
                   "w4a4");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) { p.routing.has_bias = true; }).validate(),
                   "routing.has_bias");
  EXPECT_ERROR_HAS(with([](MoeProblem& p) {
                     p.activation.kind = Activation::swiglu_oai;
                     p.activation.limit = 0;
                   }).validate(),
                   "activation.limit");
  // Expert parallelism inside the range is fine.
  EXPECT_NO_THROW(with([](MoeProblem& p) { p.local_expert_offset = 4; p.num_local_experts = 4; }).validate());
}

TEST(Problem, RoutingParameters) {
  auto ds = [](int n_group, int topk_group, int k) {
    MoeProblem p = small();
    p.num_experts = 16;
    p.top_k = k;
    p.routing.method = RoutingMethod::deepseek_v3;
    p.routing.n_group = n_group;
    p.routing.topk_group = topk_group;
    return p;
  };
  EXPECT_NO_THROW(ds(4, 2, 8).validate());
  EXPECT_ERROR_HAS(ds(3, 2, 2).validate(), "routing.n_group = 3 must divide num_experts = 16");
  EXPECT_ERROR_HAS(ds(0, 1, 2).validate(), "routing.n_group");
  EXPECT_ERROR_HAS(ds(4, 5, 2).validate(), "routing.topk_group = 5");
  EXPECT_ERROR_HAS(ds(4, 0, 2).validate(), "routing.topk_group = 0");
  EXPECT_ERROR_HAS(ds(4, 2, 9).validate(), "top_k (k) = 9 exceeds the experts in the kept groups");
  MoeProblem l = small();
  l.routing.method = RoutingMethod::llama4;
  EXPECT_ERROR_HAS(l.validate(), "top_k must be 1, got 2");
  l.top_k = 1;
  EXPECT_NO_THROW(l.validate());
}

// Every option a method does not read is rejected unless left at its default (docs/reference.md).
TEST(Problem, OptionsAMethodDoesNotUseAreRejected) {
  auto with = [](RoutingMethod m) {
    MoeProblem p = small();
    p.num_experts = 16;
    p.top_k = m == RoutingMethod::llama4 ? 1 : 2;
    p.routing.method = m;
    return p;
  };
  const RoutingMethod all[] = {RoutingMethod::softmax_topk, RoutingMethod::topk_softmax,
                               RoutingMethod::deepseek_v3,  RoutingMethod::llama4,
                               RoutingMethod::sigmoid_topk, RoutingMethod::precomputed};
  for (RoutingMethod m : all) {
    SCOPED_TRACE(std::string(to_string(m)));
    EXPECT_NO_THROW(with(m).validate());
    const bool grouped = m == RoutingMethod::deepseek_v3;
    MoeProblem g = with(m);
    g.routing.n_group = 2;
    if (grouped) EXPECT_NO_THROW(g.validate());
    else EXPECT_ERROR_HAS(g.validate(), "routing.n_group / topk_group (expert groups) are only used by deepseek_v3");
    MoeProblem tg = with(m);
    tg.routing.n_group = grouped ? 4 : 1;
    tg.routing.topk_group = 2;
    if (grouped) EXPECT_NO_THROW(tg.validate());
    else EXPECT_ERROR_HAS(tg.validate(), "topk_group = 2");
    MoeProblem sc = with(m);
    sc.routing.routed_scaling_factor = 2.5f;
    if (grouped) EXPECT_NO_THROW(sc.validate());
    else EXPECT_ERROR_HAS(sc.validate(), "routing.routed_scaling_factor is only used by deepseek_v3");
    MoeProblem b = with(m);
    b.routing.has_bias = true;
    if (m == RoutingMethod::topk_softmax || grouped) EXPECT_NO_THROW(b.validate());
    else EXPECT_ERROR_HAS(b.validate(), "routing.has_bias (a router bias) is only used by topk_softmax and deepseek_v3");
    MoeProblem r = with(m);
    r.routing.renormalize = false;
    if (m == RoutingMethod::softmax_topk || m == RoutingMethod::sigmoid_topk || grouped)
      EXPECT_NO_THROW(r.validate());
    else if (m == RoutingMethod::topk_softmax)
      EXPECT_ERROR_HAS(r.validate(), "renormalize = false is not supported by topk_softmax");
    else
      EXPECT_ERROR_HAS(r.validate(), "routing.renormalize is not an option of");
  }
  // The precomputed form of a layer drops the options its routing method had.
  MoeProblem ds = with(RoutingMethod::deepseek_v3);
  ds.routing.n_group = 4;
  ds.routing.topk_group = 2;
  ds.routing.routed_scaling_factor = 2.5f;
  ds.routing.has_bias = true;
  ds.routing.renormalize = false;
  ds.routing.logits_dtype = DType::bf16;
  const MoeProblem pre = ds.with_precomputed_routing();
  EXPECT_NO_THROW(pre.validate());
  EXPECT_EQ(pre.routing.method, RoutingMethod::precomputed);
  EXPECT_EQ(pre.routing.n_group, 1);
  EXPECT_FALSE(pre.routing.has_bias);
  EXPECT_TRUE(pre.routing.renormalize);
  EXPECT_EQ(pre.routing.logits_dtype, DType::bf16);
  EXPECT_EQ(pre.hidden, ds.hidden);
}

TEST(Presets, AllValidateAndMatchTheSpecTable) {
  ASSERT_EQ(presets().size(), 11u);
  for (const Preset& pr : presets()) {
    SCOPED_TRACE(std::string(pr.name));
    EXPECT_NO_THROW(pr.problem(0).validate());
    EXPECT_NO_THROW(pr.problem(8).validate());
    EXPECT_EQ(&find_preset(pr.name), &pr);
    const MoeProblem p = pr.problem(3);
    EXPECT_EQ(p.tokens, 3);
    EXPECT_EQ(p.hidden, pr.hidden);
    EXPECT_EQ(p.format, pr.format);
    EXPECT_EQ(p.has_bias, pr.has_bias);
  }
  const Preset& ds = find_preset("deepseek-v3");
  EXPECT_EQ(ds.hidden, 7168);
  EXPECT_EQ(ds.intermediate, 2048);
  EXPECT_EQ(ds.num_experts, 256);
  EXPECT_EQ(ds.top_k, 8);
  EXPECT_EQ(ds.routing.method, RoutingMethod::deepseek_v3);
  EXPECT_EQ(ds.routing.n_group, 8);
  EXPECT_EQ(ds.routing.topk_group, 4);
  EXPECT_FLOAT_EQ(ds.routing.routed_scaling_factor, 2.5f);
  EXPECT_TRUE(ds.routing.has_bias);
  const Preset& kimi = find_preset("kimi-k2");
  EXPECT_EQ(kimi.num_experts, 384);
  EXPECT_FLOAT_EQ(kimi.routing.routed_scaling_factor, 2.827f);
  const Preset& glm = find_preset("glm-4.5");
  EXPECT_EQ(glm.num_experts, 160);
  EXPECT_EQ(glm.routing.n_group, 1);
  EXPECT_EQ(glm.routing.topk_group, 1);
  EXPECT_FLOAT_EQ(glm.routing.routed_scaling_factor, 2.5f);
  const Preset& oss = find_preset("gpt-oss-120b");
  EXPECT_EQ(oss.format, Format::mxfp4);
  EXPECT_EQ(oss.activation.kind, Activation::swiglu_oai);
  EXPECT_EQ(oss.routing.method, RoutingMethod::topk_softmax);
  EXPECT_TRUE(oss.routing.has_bias);
  EXPECT_TRUE(oss.has_bias);
  EXPECT_EQ(oss.num_experts, 128);
  EXPECT_EQ(find_preset("gpt-oss-20b").num_experts, 32);
  EXPECT_EQ(find_preset("llama4-maverick").top_k, 1);
  EXPECT_EQ(find_preset("llama4-scout").routing.method, RoutingMethod::llama4);
  EXPECT_EQ(find_preset("mixtral-8x7b").intermediate, 14336);
  EXPECT_EQ(find_preset("qwen3-next-80b-a3b").top_k, 10);
  EXPECT_EQ(find_preset("qwen3-30b-a3b").routing.method, RoutingMethod::softmax_topk);
  EXPECT_TRUE(find_preset("qwen3-235b-a22b").routing.renormalize);
}

TEST(Presets, UnknownNameListsKnownOnes) {
  EXPECT_ERROR_HAS(find_preset("deepseek-v4"), "unknown preset 'deepseek-v4'");
  EXPECT_ERROR_HAS(find_preset(""), "deepseek-v3, kimi-k2");
}

}  // namespace
}  // namespace fp4moe
