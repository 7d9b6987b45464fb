// Expert weights on the host in the standard (checkpoint) layout: what loaders produce and what the
// CPU reference and `prepack` consume.
#pragma once
#include <cstdint>
#include <vector>

#include "fp4moe/formats.h"
#include "fp4moe/problem.h"

namespace fp4moe {

struct ExpertWeights {
  QuantizedMatrix gate;  // [I, H]; empty for non-gated activations (relu2)
  QuantizedMatrix up;    // [I, H] (the single W1 for relu2)
  QuantizedMatrix down;  // [H, I]
  std::vector<float> gate_bias, up_bias, down_bias;  // empty, or [I], [I], [H]
  float input_scale13 = 1.0f;  // W4A4: NVFP4 global scale (decode) of x for GEMM1
  float input_scale2 = 1.0f;   // W4A4: NVFP4 global scale (decode) of a for GEMM2
};

// The local experts [local_expert_offset, local_expert_offset + experts.size()) of one layer.
struct MoeWeights {
  Format format = Format::nvfp4;
  int hidden = 0;
  int intermediate = 0;
  std::vector<ExpertWeights> experts;
};

// Checks every matrix against the problem (format, shapes, scale sizes, biases iff has_bias, one
// expert per local expert); throws fp4moe::Error naming the expert and tensor.
void validate(const MoeProblem& p, const MoeWeights& w);

// Rejects NaN block scales (E4M3 0x7F / 0xFF for NVFP4, E8M0 0xFF for MXFP4, SPEC "Non-finite
// inputs"): throws fp4moe::Error naming the expert, matrix, row and block of the first one. `make`,
// `prepack` and the checkpoint loader call it; validate() does not (it stays O(1) per matrix).
void check_block_scales(const MoeProblem& p, const MoeWeights& w);

// Random weights for tests and the CLI: N(0, 0.02)-like values quantized with the library's quantizer
// (NVFP4 with a per-matrix global scale, or MXFP4), biases when p.has_bias, input scales for W4A4.
// Deterministic in (p, seed); expert e is the same whatever the local range. Large layers copy rows
// from a pool of at most 2048 quantized rows per tensor kind (quantizing 10^10 values takes minutes).
MoeWeights random_weights(const MoeProblem& p, uint64_t seed);

}  // namespace fp4moe
