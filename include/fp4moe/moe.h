// The GPU path: prepack standard-layout weights into the kernel layout, upload them, size the
// workspace, and run a layer on a CUDA stream. The run call allocates nothing, never synchronizes
// and reads no device data on the host, so it can be captured in a CUDA graph.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "fp4moe/layout.h"
#include "fp4moe/plan.h"
#include "fp4moe/problem.h"
#include "fp4moe/weights.h"

namespace fp4moe {

// Weights in the packed kernel layout, on the host.
struct PackedWeights {
  PackedLayout layout;
  std::vector<uint8_t> bytes;  // layout.total_bytes
};

// Converts the local experts of `w` into the packed layout; validates everything first.
PackedWeights prepack(const MoeProblem& p, const MoeWeights& w);

// Packed weights in device memory. Owns the allocation (cudaFree on destruction).
class DeviceWeights {
 public:
  DeviceWeights() = default;
  DeviceWeights(const PackedWeights& host, cudaStream_t stream = nullptr);
  // Uninitialized device memory for `layout` (what prepack_device fills).
  explicit DeviceWeights(const PackedLayout& layout);
  ~DeviceWeights();
  DeviceWeights(DeviceWeights&&) noexcept;
  DeviceWeights& operator=(DeviceWeights&&) noexcept;
  DeviceWeights(const DeviceWeights&) = delete;
  DeviceWeights& operator=(const DeviceWeights&) = delete;

  const PackedLayout& layout() const { return layout_; }
  const uint8_t* data() const { return data_; }
  uint8_t* mutable_data() { return data_; }

 private:
  PackedLayout layout_;
  uint8_t* data_ = nullptr;
};

// Device pointers of one call. x and out are [T, H] bf16, row-major, 16-byte aligned rows.
struct DeviceInputs {
  const void* x = nullptr;
  const void* logits = nullptr;         // [T, E] (routing.logits_dtype) unless precomputed
  const float* router_bias = nullptr;   // [E] when routing.has_bias
  const int32_t* topk_ids = nullptr;    // [T, k] for RoutingMethod::precomputed
  const float* topk_weights = nullptr;  // [T, k]
  void* out = nullptr;                  // [T, H] bf16, every element written
  // Diagnostics (optional, decode tactic): device buffer of Plan::blocks() * 8 uint64 that receives each block's
  // global-timer stamps at the phase boundaries of the last chunk and its SM clock at start and end
  // (see `fp4moe bench --timeline`).
  void* timeline = nullptr;
};

// Workspace bytes a call with this problem needs (0 for T = 0), whichever tactic the planner picks
// on any device. It grows with T up to the prefill token chunk (PrefillTactic::token_chunk) and stays
// constant above it.
size_t workspace_size(const MoeProblem& p);

// Workspace bytes a call with this problem needs under this plan (at most workspace_size(p) for
// plans of make_plan; more for a plan whose prefill token chunk exceeds the planner's).
size_t workspace_size(const MoeProblem& p, const Plan& plan);

// Runs the layer. Validates the problem, pointers (non-null, alignment), the weights' layout against
// the problem and the device (sm_90) before anything launches; throws fp4moe::Error otherwise.
void run(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
         size_t workspace_bytes, cudaStream_t stream);

// Runs the layer with a given plan instead of make_plan(p): for measurements that time both tactics
// at the same T (make_plan(p, DeviceDesc::current(), tactic)) or try other tile shapes. Validates as
// above, then the plan against the problem (validate_plan) and the device (shared memory per block;
// a batch_invariant problem needs the tactic and tile width make_plan picks for it).
void run(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
         size_t workspace_bytes, cudaStream_t stream, const Plan& plan);

// Checks that `plan` can run `p` without a GPU: made for the same problem shape (tokens, sizes,
// experts, local range, format, input mode, gating, biases, batch_invariant) and with tactic fields
// the kernels support (tile shapes compiled, stages and shared memory consistent, chunks covering
// T). Throws fp4moe::Error naming the field, its expected and its given value.
void validate_plan(const MoeProblem& p, const Plan& plan);

// True when a CUDA device of compute capability 9.x is present (the GPU path needs sm_90a).
bool gpu_available(std::string* why = nullptr);

}  // namespace fp4moe
