// An independent host implementation of SPEC "The layer" for `fp4moe check`: plain loops over
// tokens and slots, decoding the packed weights itself. It shares nothing with src/reference but
// the routing result it is given, so a bug in one shows as a mismatch against the other.
#pragma once
#include <cstdint>
#include <vector>

#include "fp4moe/problem.h"
#include "fp4moe/weights.h"

namespace fp4moe::cli {

// out[T, H] in fp64 before any output rounding. ids / weights are [T, k]; slots whose expert is not
// local are skipped. Runs on `threads` threads over tokens (0: hardware concurrency).
std::vector<double> naive_moe(const MoeProblem& p, const MoeWeights& w, const uint16_t* x,
                              const int32_t* ids, const float* weights, int threads);

}  // namespace fp4moe::cli
