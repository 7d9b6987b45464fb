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

void run(const MoeProblem& p, const DeviceWeights& w, const DeviceInputs& in, void* workspace,
         size_t workspace_bytes, cudaStream_t stream) {
  p.validate();
  if (p.tokens == 0) return;
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
  const size_t need = workspace_size(p);
  FP4MOE_CHECK(workspace != nullptr && workspace_bytes >= need,
               "workspace too small: " << workspace_bytes << " bytes given, " << need << " needed (workspace_size())");
  FP4MOE_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
  detail::check_device_ok();
  const Plan plan = make_plan(p);
  if (plan.tactic == Tactic::decode)
    detail::launch_decode(p, plan.decode, w, in, workspace, stream);
  else
    detail::launch_prefill(p, plan.prefill, w, in, workspace, stream);
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
