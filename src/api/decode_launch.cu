// Host side of the decode path: validation, planning, workspace sizing and the cooperative launches.
#include <cuda_runtime.h>

#include <cstdio>
#include <algorithm>
#include <cstdlib>
#include <map>
#include <mutex>
#include <set>

#include "common/cuda_check.h"
#include "fp4moe/moe.h"
#include "kernels/decode/moe_decode.cuh"

namespace fp4moe {
namespace {

using kernels::DecodeParams;
using kernels::kDecodeThreads;
using kernels::SmemLayout;

struct DeviceInfo {
  int device = -1, sms = 0, major = 0, minor = 0, l2_bytes = 0;
  size_t smem_optin = 0;
};

DeviceInfo device_info() {
  DeviceInfo d;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&d.device));
  cudaDeviceProp prop;
  FP4MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, d.device));
  d.sms = prop.multiProcessorCount;
  d.major = prop.major;
  d.minor = prop.minor;
  d.smem_optin = prop.sharedMemPerBlockOptin;
  d.l2_bytes = prop.l2CacheSize;
  return d;
}

// Warps that split K of one task. The K split fixes the order of the fp32 sums, so it depends on the
// layer's shape only, never on T: a token's output must not depend on the rest of the batch. It is
// tuned for T = 1, where fixed costs dominate: estimated phase time = rounds of tasks over the teams
// times (k-tiles per warp + a fixed per-task cost of about three k-tiles).
int pick_team(int64_t tasks, int64_t tiles_per_task, int blocks) {
  int best = 8;
  double best_cost = 1e30;
  for (int tw : {8, 4, 2, 1}) {
    const int64_t teams = int64_t(blocks) * (kernels::kDecodeWarps / tw);
    const double cost = double(ceil_div(tasks, teams)) * (double(tiles_per_task) / tw + 3.0);
    if (cost < best_cost - 1e-9) {
      best_cost = cost;
      best = tw;
    }
  }
  return best;
}

using KernelFn = void (*)(DecodeParams);

// The instantiation set: W4A4 exists for NVFP4 only (validate() rejects it with MXFP4).
KernelFn pick_kernel(Format f, bool gated, bool w4a4) {
  using namespace kernels;
  if (f == Format::mxfp4) return gated ? moe_decode_kernel<Format::mxfp4, true, false> : moe_decode_kernel<Format::mxfp4, false, false>;
  if (w4a4) return gated ? moe_decode_kernel<Format::nvfp4, true, true> : moe_decode_kernel<Format::nvfp4, false, true>;
  return gated ? moe_decode_kernel<Format::nvfp4, true, false> : moe_decode_kernel<Format::nvfp4, false, false>;
}

size_t align256(size_t v) { return (v + 255) / 256 * 256; }

struct WorkspaceLayout {
  size_t ids = 0, tw = 0, act = 0, y = 0, total = 0;
};

WorkspaceLayout workspace_layout(const MoeProblem& p) {
  WorkspaceLayout w;
  if (p.tokens == 0) return w;
  const size_t slots = size_t(kTokenChunk) * p.top_k;
  const size_t i_pad = size_t(ceil_div(p.intermediate, kTileCols) * kTileCols);
  w.ids = 0;
  w.tw = align256(slots * 4);
  w.act = w.tw + align256(slots * 4);
  w.y = w.act + align256(slots * i_pad * 2);
  w.total = w.y + align256(slots * size_t(p.hidden) * 4);
  return w;
}

void check_device_ok() {
  static std::once_flag once;
  static std::string problem;
  std::call_once(once, [] {
    std::string why;
    if (!gpu_available(&why)) problem = why;
  });
  FP4MOE_CHECK(problem.empty(), problem);
}

}  // namespace

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
    if (why) *why = "the decode kernels need a Hopper GPU (compute capability 9.x); device " +
                    std::to_string(dev) + " is " + std::to_string(major) + ".x";
    return false;
  }
  return true;
}

std::string Plan::to_string() const {
  ::fp4moe::detail::Message o;
  o << "plan{sms=" << sms << " blocks=" << blocks << " threads=" << threads << " team1=" << team_warps1
    << " team2=" << team_warps2 << " chunks=" << chunks << " smem=" << smem_bytes
    << " l2_prefetch=" << l2_prefetch_bytes << "}";
  return o.str();
}

size_t workspace_size(const MoeProblem& p) {
  p.validate();
  return workspace_layout(p).total;
}

namespace {

// The plan of a validated problem. Per-kernel facts (the dynamic shared-memory limit it was raised to,
// its occupancy for a shared-memory size) are cached: run() calls this on every layer call.
Plan plan_validated(const MoeProblem& p) {
  check_device_ok();
  static std::mutex mu;
  static DeviceInfo info;
  static std::map<const void*, size_t> smem_limit;                  // kernel -> attribute set
  static std::map<std::pair<const void*, size_t>, int> occupancy;  // (kernel, smem) -> blocks/SM
  static std::set<std::string> logged;
  static const bool log_plans = [] {
    const char* env = std::getenv("FP4MOE_LOG_PLAN");
    return env != nullptr && env[0] == '1';
  }();
  std::lock_guard<std::mutex> lock(mu);
  int dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  if (info.device != dev) {
    info = device_info();
    smem_limit.clear();
    occupancy.clear();
  }

  const PackedLayout L = PackedLayout::make(p.hidden, p.intermediate, p.local_experts(), p.format,
                                            p.gated(), p.has_bias);
  Plan plan;
  plan.sms = info.sms;
  plan.threads = kDecodeThreads;
  plan.chunks = ceil_div(p.tokens, kTokenChunk);
  // Half of L2 for GEMM2's weights: the rest keeps the activations and the GEMM1 stream.
  plan.l2_prefetch_bytes = info.l2_bytes / 2;
  const int slots = int(std::min<int64_t>(p.tokens, kTokenChunk)) * p.top_k;
  plan.smem_bytes = size_t(SmemLayout::make(p.local_experts(), slots, p.num_experts).total);
  FP4MOE_CHECK(plan.smem_bytes <= info.smem_optin,
               "problem needs " << plan.smem_bytes << " bytes of shared memory per block, the device allows "
                                << info.smem_optin << " (too many local experts?)");
  const void* fn = reinterpret_cast<const void*>(pick_kernel(p.format, p.gated(), p.input_mode == InputMode::w4a4));
  size_t& limit = smem_limit[fn];
  if (plan.smem_bytes > limit) {  // only ever raised: a smaller value would break larger problems
    FP4MOE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(plan.smem_bytes)));
    limit = plan.smem_bytes;
  }
  auto [it, fresh] = occupancy.try_emplace({fn, plan.smem_bytes}, 0);
  if (fresh) {
    FP4MOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, fn, kDecodeThreads, plan.smem_bytes));
  }
  FP4MOE_CHECK(it->second > 0, "decode kernel cannot be resident with " << plan.smem_bytes << " bytes of shared memory");
  plan.blocks = it->second * info.sms;
  // Experts a single token touches on this rank: the tasks of each phase at T = 1.
  const int64_t local_k = std::max<int64_t>(1, ceil_div(int64_t(p.top_k) * p.local_experts(), p.num_experts));
  plan.team_warps1 = pick_team(local_k * L.i_blocks, L.k_tiles13, plan.blocks);
  plan.team_warps2 = pick_team(local_k * (L.m_tiles2 / kernels::kTask2Tiles), L.k_tiles2, plan.blocks);
  if (log_plans) {
    std::string key = p.to_string() + plan.to_string();
    if (logged.insert(key).second) std::fprintf(stderr, "fp4moe: %s -> %s\n", p.to_string().c_str(), plan.to_string().c_str());
  }
  return plan;
}

}  // namespace

Plan make_plan(const MoeProblem& p) {
  p.validate();
  return plan_validated(p);
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
  const WorkspaceLayout wl = workspace_layout(p);
  FP4MOE_CHECK(workspace != nullptr && workspace_bytes >= wl.total,
               "workspace too small: " << workspace_bytes << " bytes given, " << wl.total << " needed (workspace_size())");
  FP4MOE_CHECK(reinterpret_cast<uintptr_t>(workspace) % 256 == 0, "workspace must be 256-byte aligned");
  const Plan plan = plan_validated(p);

  DecodeParams kp{};
  kp.L = L;
  kp.wts = w.data();
  kp.H = p.hidden;
  kp.E = p.num_experts;
  kp.k = p.top_k;
  kp.local_offset = p.local_expert_offset;
  kp.num_local = p.local_experts();
  kp.router_bias = in.router_bias;
  kp.act = reinterpret_cast<__nv_bfloat16*>(static_cast<uint8_t*>(workspace) + wl.act);
  kp.y = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + wl.y);
  kp.method = p.routing.method;
  kp.route_on_device = routed;
  kp.renormalize = p.routing.renormalize;
  kp.has_router_bias = p.routing.has_bias;
  kp.logits_bf16 = p.routing.logits_dtype == DType::bf16;
  kp.n_group = p.routing.n_group;
  kp.topk_group = p.routing.topk_group;
  kp.routed_scaling_factor = p.routing.routed_scaling_factor;
  kp.act_kind = p.activation.kind;
  kp.alpha = p.activation.alpha;
  kp.limit = p.activation.limit;
  kp.team1 = plan.team_warps1;
  kp.team2 = plan.team_warps2;
  kp.l2_prefetch_bytes = plan.l2_prefetch_bytes;
  kp.timeline = static_cast<uint64_t*>(in.timeline);

  KernelFn fn = pick_kernel(p.format, p.gated(), p.input_mode == InputMode::w4a4);
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  const size_t lsize = p.routing.logits_dtype == DType::bf16 ? 2 : 4;
  for (int64_t c = 0; c < plan.chunks; ++c) {
    const int64_t t0 = c * kTokenChunk;
    kp.T = int(std::min<int64_t>(kTokenChunk, p.tokens - t0));
    kp.x = static_cast<const __nv_bfloat16*>(in.x) + t0 * p.hidden;
    kp.out = static_cast<__nv_bfloat16*>(in.out) + t0 * p.hidden;
    if (routed) {
      kp.logits = static_cast<const uint8_t*>(in.logits) + t0 * p.num_experts * lsize;
      kp.ids = reinterpret_cast<int32_t*>(static_cast<uint8_t*>(workspace) + wl.ids);
      kp.tw = reinterpret_cast<float*>(static_cast<uint8_t*>(workspace) + wl.tw);
    } else {
      kp.logits = nullptr;
      kp.ids = const_cast<int32_t*>(in.topk_ids) + t0 * p.top_k;
      kp.tw = const_cast<float*>(in.topk_weights) + t0 * p.top_k;
    }
    cudaLaunchConfig_t cfg{};
    cfg.gridDim = dim3(unsigned(plan.blocks));
    cfg.blockDim = dim3(kDecodeThreads);
    cfg.dynamicSmemBytes = plan.smem_bytes;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    FP4MOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, kp));
  }
}

// ---- DeviceWeights --------------------------------------------------------------------------------
DeviceWeights::DeviceWeights(const PackedWeights& host, cudaStream_t stream) : layout_(host.layout) {
  FP4MOE_CHECK(host.bytes.size() == size_t(host.layout.total_bytes),
               "packed weights hold " << host.bytes.size() << " bytes, the layout needs " << host.layout.total_bytes);
  check_device_ok();
  FP4MOE_CUDA_CHECK(cudaMalloc(&data_, host.bytes.size()));
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
