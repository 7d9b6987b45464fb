// Host side of the prefill path: workspace sizing, the TMA tensor maps, and the launches of one pass
// per PrefillTactic::token_chunk tokens (route, count, scan, place, gather, GEMM1, GEMM2, finalize),
// all on the caller's stream: nothing is allocated or synchronized, so a call can be captured in a
// CUDA graph (the tensor maps are kernel parameters, captured by value).
#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <map>
#include <mutex>

#include "api/launch.h"
#include "common/cuda_check.h"
#include "kernels/prefill/grouped_gemm.cuh"
#include "kernels/prefill/lists.cuh"

namespace fp4moe::detail {
namespace {

using kernels::PrefillParams;
using kernels::PrefillWorkspace;

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver, found through the runtime (no link against libcuda).
EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    FP4MOE_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    FP4MOE_CHECK(q == cudaDriverEntryPointSuccess && f != nullptr,
                 "the CUDA driver does not provide cuTensorMapEncodeTiled (needed by the prefill kernels)");
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

void check_encode(CUresult r, const char* what) {
  FP4MOE_CHECK(r == CUDA_SUCCESS, "cuTensorMapEncodeTiled failed for the " << what << " (CUresult " << int(r) << ")");
}

// Packed tiles of `tile_bytes` seen as a [m_tiles][k_tiles][tile_bytes] tensor of 32-bit words; a box is
// one k-tile of 8 consecutive m-tiles. Boxes that run past the last m-tile read zeros.
CUtensorMap packed_map(const uint8_t* base, int64_t m_tiles, int k_tiles, int tile_bytes, const char* what) {
  CUtensorMap m;
  const cuuint64_t dims[3] = {cuuint64_t(tile_bytes / 4), cuuint64_t(k_tiles), cuuint64_t(m_tiles)};
  const cuuint64_t strides[2] = {cuuint64_t(tile_bytes), cuuint64_t(tile_bytes) * cuuint64_t(k_tiles)};
  const cuuint32_t box[3] = {cuuint32_t(tile_bytes / 4), 1, cuuint32_t(kernels::kPrefillBlockM / kTileRows)};
  const cuuint32_t estr[3] = {1, 1, 1};
  check_encode(encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_UINT32, 3, const_cast<uint8_t*>(base), dims, strides, box,
                              estr, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               what);
  return m;
}

// A bf16 [rows, cols] row-major operand; a box is 64 columns (128 bytes, swizzled) of box_rows rows.
CUtensorMap rows_map(const void* base, int64_t rows, int cols, int box_rows, const char* what) {
  CUtensorMap m;
  const cuuint64_t dims[2] = {cuuint64_t(cols), cuuint64_t(rows)};
  const cuuint64_t strides[1] = {cuuint64_t(cols) * 2};
  const cuuint32_t box[2] = {cuuint32_t(kTileCols), cuuint32_t(box_rows)};
  const cuuint32_t estr[2] = {1, 1};
  check_encode(encode_tiled()(&m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(base), dims, strides, box, estr,
                              CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
               what);
  return m;
}

using GemmFn = void (*)(PrefillParams, CUtensorMap, CUtensorMap, kernels::BMaps, int);

// The instantiation set: {NVFP4, MXFP4} x {GEMM1, GEMM2}; the tile widths live inside each kernel.
template <int PHASE>
GemmFn pick_gemm(Format f) {
  using namespace kernels;
  return f == Format::nvfp4 ? prefill_gemm_kernel<Format::nvfp4, PHASE> : prefill_gemm_kernel<Format::mxfp4, PHASE>;
}

kernels::BMaps b_maps(const void* base, int64_t rows, int cols, const char* what) {
  return {rows_map(base, rows, cols, 32, what), rows_map(base, rows, cols, 64, what),
          rows_map(base, rows, cols, kernels::kPrefillTileMax, what)};
}

// Raises a kernel's dynamic shared-memory limit (once per device and size).
void raise_smem(const void* fn, size_t bytes) {
  static std::mutex mu;
  static std::map<std::pair<int, const void*>, size_t> limit;
  if (bytes <= 48 * 1024) return;
  int dev = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  std::lock_guard<std::mutex> lock(mu);
  size_t& l = limit[{dev, fn}];
  if (bytes > l) {
    FP4MOE_CUDA_CHECK(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes)));
    l = bytes;
  }
}

template <class... Args>
void launch(void (*fn)(Args...), int grid, int block, size_t smem, cudaStream_t s, Args... args) {
  raise_smem(reinterpret_cast<const void*>(fn), smem);
  fn<<<grid, block, smem, s>>>(args...);
  FP4MOE_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

size_t prefill_workspace_bytes(const MoeProblem& p) {
  const int64_t chunk = std::min<int64_t>(p.tokens, prefill_token_chunk(p));
  return size_t(PrefillWorkspace::make(chunk, p.top_k, p.local_experts(), p.hidden, p.intermediate,
                                       kernels::kPrefillTileBase)
                    .total);
}

void launch_prefill(const MoeProblem& p, const PrefillTactic& t, const DeviceWeights& w, const DeviceInputs& in,
                    void* workspace, cudaStream_t stream) {
  const PackedLayout& L = w.layout();
  const int NL = p.local_experts();
  FP4MOE_CHECK(size_t(NL) * 4 * (kernels::kListChunk / 32) <= 200 * 1024,
               "the prefill expert lists support up to " << 200 * 1024 / (4 * (kernels::kListChunk / 32))
                                                         << " local experts, got " << NL);
  const bool routed = p.routing.method != RoutingMethod::precomputed;
  const size_t lsize = p.routing.logits_dtype == DType::bf16 ? 2 : 4;
  int dev = 0, sms = 0;
  FP4MOE_CUDA_CHECK(cudaGetDevice(&dev));
  FP4MOE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));

  PrefillParams kp{};
  kp.L = L;
  kp.wts = w.data();
  kp.H = p.hidden;
  kp.E = p.num_experts;
  kp.k = p.top_k;
  kp.local_offset = p.local_expert_offset;
  kp.num_local = NL;
  kp.router_bias = in.router_bias;
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
  kp.w4a4 = p.input_mode == InputMode::w4a4;
  kp.tile_base = kernels::kPrefillTileBase;
  kp.tile_max = kernels::kPrefillTileMax;
  kp.ws = static_cast<uint8_t*>(workspace);

  const GemmFn gemm1 = pick_gemm<1>(p.format), gemm2 = pick_gemm<2>(p.format);
  const int stile = scale_tile_bytes(p.format);
  const CUtensorMap a13 = packed_map(w.data() + L.w13_off, int64_t(NL) * L.m_tiles13, L.k_tiles13, kTileBytes, "W13 tiles");
  const CUtensorMap s13 = packed_map(w.data() + L.s13_off, int64_t(NL) * L.m_tiles13, L.k_tiles13, stile, "W13 scales");
  const CUtensorMap a2 = packed_map(w.data() + L.w2_off, int64_t(NL) * L.m_tiles2, L.k_tiles2, kTileBytes, "W2 tiles");
  const CUtensorMap s2 = packed_map(w.data() + L.s2_off, int64_t(NL) * L.m_tiles2, L.k_tiles2, stile, "W2 scales");

  for (int64_t t0 = 0; t0 < p.tokens; t0 += t.token_chunk) {
    const int Tp = int(std::min<int64_t>(t.token_chunk, p.tokens - t0));
    kp.T = Tp;
    kp.W = PrefillWorkspace::make(Tp, p.top_k, NL, p.hidden, p.intermediate, kp.tile_base);
    kp.x = static_cast<const __nv_bfloat16*>(in.x) + t0 * p.hidden;
    kp.out = static_cast<__nv_bfloat16*>(in.out) + t0 * p.hidden;
    if (routed) {
      kp.logits = static_cast<const uint8_t*>(in.logits) + t0 * p.num_experts * lsize;
      kp.ids_out = reinterpret_cast<int32_t*>(kp.ws + kp.W.ids_off);
      kp.tw_out = reinterpret_cast<float*>(kp.ws + kp.W.tw_off);
      kp.ids = kp.ids_out;
      kp.tw = kp.tw_out;
    } else {
      kp.logits = nullptr;
      kp.ids_out = nullptr;
      kp.tw_out = nullptr;
      kp.ids = in.topk_ids + t0 * p.top_k;
      kp.tw = in.topk_weights + t0 * p.top_k;
    }
    const int64_t slots = int64_t(Tp) * p.top_k;
    const kernels::BMaps b13 = b_maps(kp.ws + kp.W.xs_off, slots, kp.W.h_pad, "gathered tokens");
    const kernels::BMaps b2 = b_maps(kp.ws + kp.W.act_off, slots, kp.W.i_pad, "intermediate activations");

    if (routed)
      launch(kernels::prefill_route_kernel, int(ceil_div(Tp, kernels::kPrefillRouteWarps)), kernels::kPrefillRouteWarps * 32,
             size_t(kernels::kPrefillRouteWarps) * 2 * p.num_experts * 4, stream, kp);
    launch(kernels::prefill_count_kernel, kp.W.chunks, kernels::kListChunk, size_t(NL) * 4, stream, kp);
    launch(kernels::prefill_scan_kernel, 1, kernels::kScanThreads, 0, stream, kp);
    launch(kernels::prefill_place_kernel, kp.W.chunks, kernels::kListChunk,
           size_t(NL) * 4 * (kernels::kListChunk / 32), stream, kp);
    const int64_t segments = slots * ceil_div(kp.W.h_pad / kTileCols, 4);
    launch(kernels::prefill_gather_kernel, int(ceil_div(segments, kernels::kGatherWarps)), kernels::kGatherWarps * 32, 0,
           stream, kp);
    launch(gemm1, t.blocks, t.threads, t.smem_bytes, stream, kp, a13, s13, b13, t.stages);
    launch(gemm2, t.blocks, t.threads, t.smem_bytes, stream, kp, a2, s2, b2, t.stages);
    const int64_t fin = int64_t(Tp) * (p.hidden / 4);
    launch(kernels::prefill_finalize_kernel, int(std::min<int64_t>(ceil_div(fin, 256), int64_t(sms) * 8)), 256, 0,
           stream, kp);
  }
}

}  // namespace fp4moe::detail
