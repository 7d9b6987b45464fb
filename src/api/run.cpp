// The GPU entry point: validation of everything before anything launches, the plan, and the dispatch
// to the kernel family the plan names. Also the device check, workspace sizing and DeviceWeights.
#include <cuda_runtime_api.h>

#include <algorithm>
#include <mutex>
#include <string>

#include "api/launch.h"
#include "common/cuda_check.h"
#include "fp4moe/moe.h"
#include "kernels/decode/params.h"
#include "kernels/prefill/params.h"

namespace fp4moe {

bool gpu_available(std::string* why) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess || n == 0) {
    if (why) *why = std::string("no CUDA device (") + cudaGetErrorString(err) + ")";
    cudaGetLastError();
    return false;
  }
  int dev = 0, major = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (major != 9) {
    if (why) *why = "the GPU kernels need a Hopper GPU (compute capability 9.x); device " +
                    std::to_string(dev) + " is " + std::to_string(major) + ".x";
    return false;
  }
  return true;
}

namespace detail {

void check_device_ok() {
  static std::once_flag once;
  static std::string problem;
  std::call_once(once, [] {
    std::string why;
    if (!gpu_available(&why)) problem = why;
  });
  FP4MOE_CHECK(problem.empty(), problem);
}

}  // namespace detail

size_t workspace_size(const MoeProblem& p) {
  p.validate();
  if (p.tokens == 0) return 0;
  return std::max(detail::decode_workspace_bytes(p), detail::prefill_workspace_bytes(p));
}

namespace {

// What every call checks before anything launches: the problem, the weights against it, the
// pointers. False for T = 0 (nothing to do).
bool validate_call(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in) {
  p.validate();
  if (p.tokens == 0) return false;
  const PackedLayout& L = w.layout();
  FP4MOE_CHECK(w.data() != nullptr, "weights are empty: upload packed weights with DeviceWeights first");
  FP4MOE_CHECK(L.hidden == p.hidden && L.intermediate == p.intermediate && L.experts == p.local_experts() &&
                   L.format == p.format && L.gated == p.gated() && L.has_bias == p.has_bias,
               "packed weights (H=" << L.hidden << " I=" << L.intermediate << " experts=" << L.experts
                                    << " format=" << to_string(L.format) << " gated=" << L.gated
                                    << " bias=" << L.has_bias << ") do not match the problem " << p.to_string());
  FP4MOE_CHECK(in.x != nullptr && in.out != nullptr, "x and out must be device pointers, got null");
  FP4MOE_CHECK(reinterpret_cast<uintptr_t>(in.x) % 16 == 0 && reinterpret_cast<uintptr_t>(in.out) % 16 == 0,
               "x and out must be 16-byte aligned");
  const bool routed = p.routing.method != RoutingMethod::precomputed;
  if (routed) {
    FP4MOE_CHECK(in.logits != nullptr, "routing method " << to_string(p.routing.method) << " needs logits");
    FP4MOE_CHECK(!p.routing.has_bias || in.router_bias != nullptr, "routing.has_bias is set but router_bias is null");
    FP4MOE_CHECK(p.num_experts <= kernels::kMaxRoutedExperts,
                 "GPU routing supports up to " << kernels::kMaxRoutedExperts << " experts; pass precomputed top-k for E="
                                               << p.num_experts);
  } else {
    FP4MOE_CHECK(in.topk_ids != nullptr && in.topk_weights != nullptr,
                 "precomputed routing needs topk_ids and topk_weights");
  }
  return true;
}

// The workspace, then the device (in this order, as callers' error tests expect).
void check_workspace_and_device(void* workspace, size_t workspace_bytes, size_t need) {
  FP4MOE_CHECK(workspace != nullptr && workspace_bytes >= need,
               "workspace too small: " << workspace_bytes << " bytes given, " << need << " needed (workspace_size())");
  FP4MOE_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
  detail::check_device_ok();
}

void dispatch(const MoeProblem& p, const Plan& plan, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
              cudaStream_t stream) {
  if (plan.tactic == Tactic::decode)
    detail::launch_decode(p, plan.decode, w, in, workspace, stream);
  else
    detail::launch_prefill(p, plan.prefill, w, in, workspace, stream);
}

bool same_shape(const MoeProblem& a, const MoeProblem& b) {
  return a.tokens == b.tokens && a.hidden == b.hidden && a.intermediate == b.intermediate &&
         a.num_experts == b.num_experts && a.top_k == b.top_k && a.local_expert_offset == b.local_expert_offset &&
         a.local_experts() == b.local_experts() && a.format == b.format && a.input_mode == b.input_mode &&
         a.gated() == b.gated() && a.has_bias == b.has_bias && a.batch_invariant == b.batch_invariant;
}

}  // namespace

void validate_plan(const MoeProblem& p, const Plan& plan) {
  p.validate();
  FP4MOE_CHECK(same_shape(p, plan.problem), "the plan was made for the problem " << plan.problem.to_string()
                                                << ", the call's problem is " << p.to_string()
                                                << ": make the plan with make_plan(p, ...) for this problem");
  FP4MOE_CHECK(plan.tactic == Tactic::decode || plan.tactic == Tactic::prefill,
               "plan.tactic = " << int(plan.tactic) << " is neither decode (0) nor prefill (1)");
  FP4MOE_CHECK(!p.batch_invariant || plan.tactic == Tactic::prefill,
               "a batch_invariant problem runs the prefill tactic only, the plan's tactic is decode");
  const int64_t T = p.tokens;
  if (T == 0) return;  // nothing runs
  if (plan.tactic == Tactic::decode) {
    const DecodeTactic& t = plan.decode;
    FP4MOE_CHECK(t.threads == kernels::kDecodeThreads,
                 "plan.decode.threads = " << t.threads << ", the decode kernel is built for " << kernels::kDecodeThreads);
    FP4MOE_CHECK(t.blocks >= 1, "plan.decode.blocks = " << t.blocks << " must be at least 1");
    for (const int tw : {t.team_warps1, t.team_warps2})
      FP4MOE_CHECK(tw == 1 || tw == 2 || tw == 4 || tw == 8,
                   "plan.decode.team_warps1/2 = " << tw << " must be 1, 2, 4 or 8 (a divisor of the "
                                                  << kernels::kDecodeWarps << " warps of a block)");
    FP4MOE_CHECK(t.chunks == ceil_div(T, kTokenChunk),
                 "plan.decode.chunks = " << t.chunks << ", T = " << T << " needs " << ceil_div(T, kTokenChunk)
                                         << " launches of " << kTokenChunk << " tokens");
    const int slots = int(std::min<int64_t>(T, kTokenChunk)) * p.top_k;
    const size_t smem = size_t(kernels::SmemLayout::make(p.local_experts(), slots, p.num_experts).total);
    FP4MOE_CHECK(t.smem_bytes >= smem,
                 "plan.decode.smem_bytes = " << t.smem_bytes << ", this problem needs at least " << smem);
    FP4MOE_CHECK(t.l2_prefetch_bytes >= 0, "plan.decode.l2_prefetch_bytes = " << t.l2_prefetch_bytes << " is negative");
  } else {
    const PrefillTactic& t = plan.prefill;
    FP4MOE_CHECK(t.block_m == kernels::kPrefillBlockM,
                 "plan.prefill.block_m = " << t.block_m << ", the prefill kernels are built for " << kernels::kPrefillBlockM);
    // Tiles are cut from each expert's rows at run time (up to kPrefillTileMax, each at the narrowest
    // compiled wgmma width); the stage layout is sized for the widest.
    FP4MOE_CHECK(t.block_n == kernels::kPrefillTileMax,
                 "plan.prefill.block_n = " << t.block_n << ": the prefill kernels cut token tiles of up to "
                                           << kernels::kPrefillTileMax << " rows and size their stages for that");
    FP4MOE_CHECK(t.threads == kernels::kPrefillThreads,
                 "plan.prefill.threads = " << t.threads << ", the prefill kernels are built for " << kernels::kPrefillThreads);
    FP4MOE_CHECK(t.stages >= 2 && t.stages <= kernels::kPrefillMaxStages,
                 "plan.prefill.stages = " << t.stages << " must be in [2, " << kernels::kPrefillMaxStages << "]");
    const size_t smem = size_t(t.stages) * kernels::prefill_stage_bytes(t.block_m, t.block_n, p.format) +
                        kernels::kPrefillSmemReserve;
    FP4MOE_CHECK(t.smem_bytes >= smem, "plan.prefill.smem_bytes = " << t.smem_bytes << ", " << t.stages
                                                                    << " stages of " << t.block_m << "x" << t.block_n
                                                                    << " tiles need " << smem);
    FP4MOE_CHECK(t.blocks >= 1, "plan.prefill.blocks = " << t.blocks << " must be at least 1");
    FP4MOE_CHECK(t.token_chunk >= 1 && t.token_chunk <= T,
                 "plan.prefill.token_chunk = " << t.token_chunk << " must be in [1, T = " << T << "]");
    FP4MOE_CHECK(t.passes == ceil_div(T, t.token_chunk),
                 "plan.prefill.passes = " << t.passes << ", T = " << T << " in chunks of " << t.token_chunk << " needs "
                                          << ceil_div(T, t.token_chunk));
  }
}

size_t workspace_size(const MoeProblem& p, const Plan& plan) {
  validate_plan(p, plan);
  if (p.tokens == 0) return 0;
  if (plan.tactic == Tactic::decode) return detail::decode_workspace_bytes(p);
  return size_t(kernels::PrefillWorkspace::make(plan.prefill.token_chunk, p.top_k, p.local_experts(), p.hidden,
                                                p.intermediate, kernels::kPrefillTileBase)
                    .total);
}

void run(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
         size_t workspace_bytes, cudaStream_t stream) {
  if (!validate_call(p, w, in)) return;
  check_workspace_and_device(workspace, workspace_bytes, workspace_size(p));
  dispatch(p, make_plan(p), w, in, workspace, stream);
}

void run(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
         size_t workspace_bytes, cudaStream_t stream, const Plan& plan) {
  if (!validate_call(p, w, in)) return;
  const size_t need = workspace_size(p, plan);  // validates the plan against the problem
  check_workspace_and_device(workspace, workspace_bytes, need);
  const DeviceDesc d = DeviceDesc::current();
  const size_t smem = plan.tactic == Tactic::decode ? plan.decode.smem_bytes : plan.prefill.smem_bytes;
  FP4MOE_CHECK(smem <= d.smem_per_block, "the plan needs " << smem << " bytes of shared memory per block, "
                                                           << d.name << " allows " << d.smem_per_block
                                                           << " (plan made for " << plan.device << ")");
  if (p.batch_invariant) {
    const Plan ref = make_plan(p, d);
    FP4MOE_CHECK(plan.prefill.block_n == ref.prefill.block_n,
                 "a batch_invariant problem needs the tile width make_plan picks for it ("
                     << ref.prefill.block_n << " tokens: one summation order for every T), the plan has "
                     << plan.prefill.block_n);
  }
  dispatch(p, plan, w, in, workspace, stream);
}

// ---- DeviceWeights --------------------------------------------------------------------------------
DeviceWeights::DeviceWeights(const PackedWeights& host, cudaStream_t stream) : layout_(host.layout) {
  FP4MOE_CHECK(host.bytes.size() == size_t(host.layout.total_bytes),
               "packed weights hold " << host.bytes.size() << " bytes, the layout needs " << host.layout.total_bytes);
  detail::check_device_ok();
  FP4MOE_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&data_), host.bytes.size()));
  FP4MOE_CUDA_CHECK(cudaMemcpyAsync(data_, host.bytes.data(), host.bytes.size(), cudaMemcpyHostToDevice, stream));
  FP4MOE_CUDA_CHECK(cudaStreamSynchronize(stream));
}

DeviceWeights::~DeviceWeights() {
  if (data_ != nullptr) cudaFree(data_);
}

DeviceWeights::DeviceWeights(DeviceWeights&& o) noexcept : layout_(o.layout_), data_(o.data_) { o.data_ = nullptr; }

DeviceWeights& DeviceWeights::operator=(DeviceWeights&& o) noexcept {
  if (this != &o) {
    if (data_ != nullptr) cudaFree(data_);
    layout_ = o.layout_;
    data_ = o.data_;
    o.data_ = nullptr;
  }
  return *this;
}


}  // namespace fp4moe
