// Internal interface between the dispatch (run.cpp) and the launchers of each kernel family.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "fp4moe/moe.h"
#include "fp4moe/plan.h"

namespace fp4moe::detail {

// Throws fp4moe::Error unless a Hopper GPU is usable (checked once per process).
void check_device_ok();

// Workspace bytes of each family for a validated problem.
size_t decode_workspace_bytes(const MoeProblem& p);
size_t prefill_workspace_bytes(const MoeProblem& p);

// Launchers: the problem, weights, inputs and workspace are validated by run().
void launch_decode(const MoeProblem& p, const DecodeTactic& t, const DeviceWeights& w, const DeviceInputs& in,
                   void* workspace, cudaStream_t stream);
void launch_prefill(const MoeProblem& p, const PrefillTactic& t, const DeviceWeights& w, const DeviceInputs& in,
                    void* workspace, cudaStream_t stream);

}  // namespace fp4moe::detail

namespace fp4moe {
// Tokens per prefill pass for this problem's shape (plan.cpp): bounds the workspace.
int64_t prefill_token_chunk(const MoeProblem& p);
}  // namespace fp4moe
