// The CPU reference: the oracle every GPU result is checked against. It dequantizes the FP4 weights
// and computes in fp64 with fp32 inputs, following SPEC exactly (bf16 rounding of `a` and `out`).
#pragma once
#include <cstdint>
#include <vector>

#include "fp4moe/problem.h"
#include "fp4moe/weights.h"

namespace fp4moe {

// Host inputs of one layer call. Either logits (+ optional router bias) or topk_ids / topk_weights.
struct HostInputs {
  const uint16_t* x = nullptr;            // [T, H] bf16 bits
  const void* logits = nullptr;           // [T, E], dtype problem.routing.logits_dtype
  const float* router_bias = nullptr;     // [E] when problem.routing.has_bias
  const int32_t* topk_ids = nullptr;      // [T, k] for RoutingMethod::precomputed
  const float* topk_weights = nullptr;    // [T, k]
};

// Routing on the host: ids[T, k], weights[T, k]. Ties go to the lower expert index.
void route_reference(const MoeProblem& p, const void* logits, const float* router_bias,
                     int32_t* topk_ids, float* topk_weights);

// Activation of one (gate, up) pair in fp32 (gate ignored for relu2).
float activation_reference(const ActivationConfig& a, float gate, float up);

// NVFP4 quantize-dequantize of one block of 16 activations with global scale g (W4A4 numerics).
void fake_quantize_nvfp4_block(const float* in, float* out, float g);

// The layer: out[T, H] (bf16 bits). Optionally also returns the fp32 output before rounding
// and the routing it used. Runs on `threads` host threads (0: hardware concurrency).
struct ReferenceResult {
  std::vector<uint16_t> out;     // [T, H] bf16 bits
  std::vector<float> out_f32;    // [T, H] before the final rounding
  std::vector<int32_t> topk_ids;
  std::vector<float> topk_weights;
};
ReferenceResult moe_reference(const MoeProblem& p, const MoeWeights& w, const HostInputs& in,
                              int threads = 0);

}  // namespace fp4moe
