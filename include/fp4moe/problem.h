// The problem description: what one MoE layer call computes (SPEC "The layer"). Every backend takes
// an MoeProblem; the planner turns it into a printable plan.
#pragma once
#include <cstdint>
#include <string>

#include "fp4moe/types.h"

namespace fp4moe {

// Routing options. A method reads only its own (table in docs/reference.md); every other option
// must keep the default below, or MoeProblem::validate throws naming it.
struct RoutingConfig {
  RoutingMethod method = RoutingMethod::softmax_topk;
  bool renormalize = true;  // softmax_topk / sigmoid_topk / deepseek_v3: rescale the k weights to
                            // sum 1 (deepseek_v3: the config's norm_topk_prob)
  int n_group = 1;                     // deepseek_v3: expert groups
  int topk_group = 1;                  // deepseek_v3: groups kept
  float routed_scaling_factor = 1.0f;  // deepseek_v3: multiplies the (normalized) weights
  bool has_bias = false;  // topk_softmax: router bias; deepseek_v3: e_score_correction_bias ([E] fp32)
  DType logits_dtype = DType::f32;
};

struct ActivationConfig {
  Activation kind = Activation::swiglu;
  float alpha = 1.702f;  // swiglu_oai
  float limit = 7.0f;    // swiglu_oai
};

struct MoeProblem {
  int64_t tokens = 0;       // T (0 is valid and does nothing)
  int hidden = 0;           // H
  int intermediate = 0;     // I (moe intermediate size)
  int num_experts = 0;      // E, global expert count (routing is over E)
  int top_k = 0;            // k
  int local_expert_offset = 0;  // expert parallelism: this layer holds experts
  int num_local_experts = 0;    //   [offset, offset + num_local); 0 means all E
  Format format = Format::nvfp4;
  InputMode input_mode = InputMode::w4a16;
  ActivationConfig activation;
  RoutingConfig routing;
  bool has_bias = false;  // b13 [2I] (or [I]) and b2 [H] per expert
  // One summation order for every T (SPEC "Batch invariance"): a token's output is bitwise the same
  // whatever else shares the call, also where the planner would otherwise switch kernel families.
  bool batch_invariant = false;

  int local_experts() const { return num_local_experts > 0 ? num_local_experts : num_experts; }
  bool gated() const { return is_gated(activation.kind); }
  int w13_rows() const { return gated() ? 2 * intermediate : intermediate; }
  // Throws fp4moe::Error naming the first inconsistent field (sizes, block multiples, ranges,
  // routing parameters and options the routing method does not use, W4A4 with MXFP4, ...).
  void validate() const;
  // The same layer called with caller-computed topk_ids / topk_weights: routing method precomputed,
  // every other routing option back to its default (the logits dtype is kept).
  MoeProblem with_precomputed_routing() const;
  std::string to_string() const;
};

}  // namespace fp4moe
