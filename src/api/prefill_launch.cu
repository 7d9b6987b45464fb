// Host side of the prefill path (work in progress).
#include "api/launch.h"
#include "fp4moe/error.h"
#include "kernels/prefill/params.h"

namespace fp4moe::detail {

size_t prefill_workspace_bytes(const MoeProblem& p) {
  const Plan plan = make_plan(p, DeviceDesc::h200());
  (void)plan;
  const int64_t chunk = std::min<int64_t>(p.tokens, prefill_token_chunk(p));
  return size_t(kernels::PrefillWorkspace::make(chunk, p.top_k, p.local_experts(), p.hidden, p.intermediate,
                                                kernels::kPrefillBlockN[0])
                    .total);
}

void launch_prefill(const MoeProblem&, const PrefillTactic&, const DeviceWeights&, const DeviceInputs&, void*,
                    cudaStream_t) {
  FP4MOE_FAIL("the prefill kernels are not built yet");
}

}  // namespace fp4moe::detail
