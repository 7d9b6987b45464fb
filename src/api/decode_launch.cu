// Host side of the decode path: the cooperative launches of the decode kernel for a plan's
// DecodeTactic (planning: plan.cpp; validation and dispatch: run.cpp).
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "api/launch.h"
#include "common/cuda_check.h"
#include "kernels/decode/moe_decode.cuh"

namespace fp4moe::detail {
namespace {

using kernels::DecodeParams;
using kernels::kDecodeThreads;

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

// The kernel's dynamic shared-memory limit is raised once per size, and its occupancy checked
// against the plan's blocks per SM (a cooperative launch needs every block resident).
void prepare_kernel(const void* fn, size_t smem, int blocks_per_sm) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> limit;        // (device, kernel) -> attribute
  static std::map<std::tuple<int, const void*, size_t>, int> occupancy;
  int dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  size_t& l = limit[{dev, fn}];
  if (smem > l) {  // only ever raised: a smaller value would break larger problems
    FP4MOE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    l = smem;
  }
  auto [it, fresh] = occupancy.try_emplace({dev, fn, smem}, 0);
  if (fresh) FP4MOE_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&it->second, fn, kDecodeThreads, smem));
  FP4MOE_CHECK(it->second >= blocks_per_sm, "the decode kernel fits " << it->second << " blocks per SM with " << smem
                                            << " bytes of shared memory; the plan needs " << blocks_per_sm);
}

}  // namespace

size_t decode_workspace_bytes(const MoeProblem& p) { return workspace_layout(p).total; }

void launch_decode(const MoeProblem& p, const DecodeTactic& t, const DeviceWeights& w, const DeviceInputs& in,
                   void* workspace, cudaStream_t stream) {
  const PackedLayout& L = w.layout();
  const bool routed = p.routing.method != RoutingMethod::precomputed;
  const WorkspaceLayout wl = workspace_layout(p);
  KernelFn fn = pick_kernel(p.format, p.gated(), p.input_mode == InputMode::w4a4);
  int sms = 0, dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  FP4MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  prepare_kernel(reinterpret_cast<const void*>(fn), t.smem_bytes, (t.blocks + sms - 1) / sms);
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
  kp.xq = reinterpret_cast<__nv_bfloat16*>(kp.y);  // W4A4: dead before GEMM2 writes y (grid barrier between)
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
  kp.team1 = t.team_warps1;
  kp.team2 = t.team_warps2;
  kp.l2_prefetch_bytes = t.l2_prefetch_bytes;
  kp.timeline = static_cast<uint64_t*>(in.timeline);

  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeCooperative;
  attr[0].val.cooperative = 1;
  const size_t lsize = p.routing.logits_dtype == DType::bf16 ? 2 : 4;
  for (int64_t c = 0; c < t.chunks; ++c) {
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
    cfg.gridDim = dim3(unsigned(t.blocks));
    cfg.blockDim = dim3(kDecodeThreads);
    cfg.dynamicSmemBytes = t.smem_bytes;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    FP4MOE_CUDA_CHECK(cudaLaunchKernelEx(&cfg, fn, kp));
  }
}


}  // namespace fp4moe::detail
