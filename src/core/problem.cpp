// MoeProblem: validation of every field against SPEC, and a one-line description.
#include "fp4moe/problem.h"

#include <algorithm>
#include <cmath>
#include <string_view>

#include "fp4moe/error.h"

namespace fp4moe {

namespace {
// The largest top-k any routing kernel supports (one warp holds the k candidates).
constexpr int kMaxTopK = 32;

bool uses_router_bias(RoutingMethod m) {
  return m == RoutingMethod::topk_softmax || m == RoutingMethod::deepseek_v3;
}
}  // namespace

void MoeProblem::validate() const {
  FP4MOE_CHECK(tokens >= 0, "tokens (T) must be >= 0, got " << tokens);
  FP4MOE_CHECK(hidden > 0, "hidden (H) must be positive, got " << hidden);
  FP4MOE_CHECK(intermediate > 0, "intermediate (I) must be positive, got " << intermediate);
  FP4MOE_CHECK(num_experts > 0, "num_experts (E) must be positive, got " << num_experts);
  const int blk = block_size(format);
  FP4MOE_CHECK(hidden % blk == 0, "hidden (H) = " << hidden << " must be a multiple of " << blk
                                                  << ", the " << fp4moe::to_string(format)
                                                  << " block size");
  FP4MOE_CHECK(intermediate % blk == 0, "intermediate (I) = "
                                            << intermediate << " must be a multiple of " << blk
                                            << ", the " << fp4moe::to_string(format)
                                            << " block size");
  FP4MOE_CHECK(top_k >= 1 && top_k <= num_experts,
               "top_k (k) = " << top_k << " must be in [1, num_experts = " << num_experts << "]");
  FP4MOE_CHECK(top_k <= kMaxTopK, "top_k (k) = " << top_k << " exceeds the supported maximum "
                                                 << kMaxTopK);
  FP4MOE_CHECK(num_local_experts >= 0,
               "num_local_experts must be >= 0 (0 means all experts), got " << num_local_experts);
  FP4MOE_CHECK(local_expert_offset >= 0 && local_expert_offset < num_experts,
               "local_expert_offset = " << local_expert_offset << " must be in [0, num_experts = "
                                        << num_experts << ")");
  FP4MOE_CHECK(int64_t{local_expert_offset} + local_experts() <= num_experts,
               "local experts [" << local_expert_offset << ", "
                                 << int64_t{local_expert_offset} + local_experts()
                                 << ") exceed num_experts = " << num_experts
                                 << "; set num_local_experts to at most "
                                 << num_experts - local_expert_offset);
  // Every size derived from the fields (T * H activations, T * E logits, the weights of the local
  // experts) must fit in 64-bit arithmetic; hostile field values are refused here, before any
  // backend computes a byte count from them.
  const int64_t widest = std::max<int64_t>({hidden, num_experts, top_k});
  FP4MOE_CHECK(tokens <= (int64_t{1} << 62) / (8 * widest),
               "tokens (T) = " << tokens << " is too large: T * max(H, E, k) * 8 bytes overflows "
                               << "64-bit sizes");
  {
    const int64_t rows13 = is_gated(activation.kind) ? 2 * int64_t{intermediate} : intermediate;
    const int64_t per_expert = detail::checked_add(
        detail::checked_mul(rows13, hidden, "weights of one expert (W13 rows * H)"),
        detail::checked_mul(hidden, intermediate, "weights of one expert (H * I)"),
        "weights of one expert");
    FP4MOE_CHECK(per_expert <= (int64_t{1} << 56) / std::max(1, local_experts()),
                 "the layer's weights (" << local_experts() << " local experts of " << per_expert
                                         << " FP4 values each) are too large for 64-bit sizes");
  }
  FP4MOE_CHECK(!(input_mode == InputMode::w4a4 && format != Format::nvfp4),
               "input_mode w4a4 quantizes activations to NVFP4 and needs format nvfp4, got format "
                   << fp4moe::to_string(format));

  if (activation.kind == Activation::swiglu_oai) {
    FP4MOE_CHECK(std::isfinite(activation.alpha),
                 "activation.alpha must be finite, got " << activation.alpha);
    FP4MOE_CHECK(std::isfinite(activation.limit) && activation.limit > 0,
                 "activation.limit must be positive and finite, got " << activation.limit);
  }

  const RoutingConfig& r = routing;
  const RoutingConfig unset{};
  const std::string_view method = fp4moe::to_string(r.method);
  // Options a method does not read must keep their defaults (RoutingConfig{}): a value that would
  // change nothing is a caller's mistake, never silently ignored (docs/reference.md, "Routing
  // options"). The method's own parameters are range-checked below.
  const bool reads_renormalize = r.method == RoutingMethod::softmax_topk ||
                                 r.method == RoutingMethod::sigmoid_topk ||
                                 r.method == RoutingMethod::deepseek_v3;
  const bool grouped = r.method == RoutingMethod::deepseek_v3;
  FP4MOE_CHECK(!r.has_bias || uses_router_bias(r.method),
               "routing.has_bias (a router bias) is only used by topk_softmax and deepseek_v3, not by "
                   << method);
  if (!reads_renormalize && !r.renormalize) {
    if (r.method == RoutingMethod::topk_softmax)
      FP4MOE_FAIL("routing.renormalize = false is not supported by topk_softmax: its softmax over the "
                  "k selected logits always sums to 1; leave renormalize at true");
    if (r.method == RoutingMethod::llama4)
      FP4MOE_FAIL("routing.renormalize is not an option of llama4 routing (one expert, weight "
                  "sigmoid(logit), never normalized); leave it at its default (true), got false");
    FP4MOE_FAIL("routing.renormalize is not an option of precomputed routing (the given weights are "
                "used as they are); leave it at its default (true), got false");
  }
  if (!grouped) {
    FP4MOE_CHECK(r.n_group == unset.n_group && r.topk_group == unset.topk_group,
                 "routing.n_group / topk_group (expert groups) are only used by deepseek_v3, not by "
                     << method << "; leave them at 1, got n_group = " << r.n_group
                     << ", topk_group = " << r.topk_group);
    FP4MOE_CHECK(r.routed_scaling_factor == unset.routed_scaling_factor,
                 "routing.routed_scaling_factor is only used by deepseek_v3, not by "
                     << method << "; leave it at 1, got " << r.routed_scaling_factor);
  }
  switch (r.method) {
    case RoutingMethod::deepseek_v3:
      FP4MOE_CHECK(r.n_group >= 1, "routing.n_group must be >= 1, got " << r.n_group);
      FP4MOE_CHECK(num_experts % r.n_group == 0, "routing.n_group = " << r.n_group
                                                     << " must divide num_experts = "
                                                     << num_experts);
      FP4MOE_CHECK(r.topk_group >= 1 && r.topk_group <= r.n_group,
                   "routing.topk_group = " << r.topk_group << " must be in [1, n_group = "
                                           << r.n_group << "]");
      FP4MOE_CHECK(top_k <= r.topk_group * (num_experts / r.n_group),
                   "top_k (k) = " << top_k << " exceeds the experts in the kept groups, topk_group * "
                                  << "(num_experts / n_group) = "
                                  << r.topk_group * (num_experts / r.n_group));
      FP4MOE_CHECK(std::isfinite(r.routed_scaling_factor),
                   "routing.routed_scaling_factor must be finite, got " << r.routed_scaling_factor);
      break;
    case RoutingMethod::llama4:
      FP4MOE_CHECK(top_k == 1, "llama4 routing picks one expert per token: top_k must be 1, got "
                                   << top_k);
      break;
    default:
      break;
  }
}

MoeProblem MoeProblem::with_precomputed_routing() const {
  MoeProblem p = *this;
  p.routing = RoutingConfig{};
  p.routing.method = RoutingMethod::precomputed;
  p.routing.logits_dtype = routing.logits_dtype;
  return p;
}

std::string MoeProblem::to_string() const {
  ::fp4moe::detail::Message s;
  s << "T=" << tokens << " H=" << hidden << " I=" << intermediate << " E=" << num_experts
    << " k=" << top_k;
  if (local_experts() != num_experts || local_expert_offset != 0)
    s << " experts=[" << local_expert_offset << "," << local_expert_offset + local_experts() << ")";
  s << " format=" << fp4moe::to_string(format) << " input=" << fp4moe::to_string(input_mode)
    << " act=" << fp4moe::to_string(activation.kind);
  if (activation.kind == Activation::swiglu_oai)
    s << "(alpha=" << activation.alpha << ",limit=" << activation.limit << ")";
  s << " routing=" << fp4moe::to_string(routing.method);
  switch (routing.method) {
    case RoutingMethod::deepseek_v3:
      s << "(n_group=" << routing.n_group << ",topk_group=" << routing.topk_group
        << ",scale=" << routing.routed_scaling_factor
        << (routing.renormalize ? ",renormalize)" : ",no renormalize)");
      break;
    case RoutingMethod::softmax_topk:
    case RoutingMethod::sigmoid_topk:
      s << (routing.renormalize ? "(renormalize)" : "(no renormalize)");
      break;
    default:
      break;
  }
  if (routing.method != RoutingMethod::precomputed)
    s << " logits=" << fp4moe::to_string(routing.logits_dtype);
  if (routing.has_bias) s << " router_bias";
  if (has_bias) s << " expert_bias";
  if (batch_invariant) s << " batch_invariant";
  return s.str();
}

}  // namespace fp4moe
