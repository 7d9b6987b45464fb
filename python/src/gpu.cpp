// Bindings of the GPU path: prepack, upload (DeviceWeights), workspace sizing and the forward call.
//
// The forward call launches on the stream the caller passes (an int: a cudaStream_t, e.g.
// torch.cuda.current_stream().cuda_stream), allocates nothing and never synchronizes, so it can be
// captured in a CUDA graph. The caller provides the workspace (workspace_size(problem) bytes,
// 256-byte aligned); fp4moe.torch caches one per (device, stream, size).
#include <cuda_runtime_api.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
#include <nanobind/stl/unique_ptr.h>

#include <chrono>
#include <memory>
#include <optional>
#include <string>

#include "common.h"
#include "fp4moe/moe.h"

namespace fp4moe::py {
namespace {

#define PY_CUDA_CHECK(expr)                                                                    \
  do {                                                                                         \
    cudaError_t e_ = (expr);                                                                   \
    FP4MOE_CHECK(e_ == cudaSuccess, "CUDA call `" #expr "` failed: " << cudaGetErrorName(e_) \
                                                                     << ": " << cudaGetErrorString(e_)); \
  } while (0)

// Makes `device` current for a scope and restores the previous device (the caller's framework may
// keep its own notion of the current device).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    PY_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) PY_CUDA_CHECK(cudaSetDevice(device));
    set_ = prev_ != device;
  }
  ~DeviceScope() {
    if (set_) cudaSetDevice(prev_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int prev_ = 0;
  bool set_ = false;
};

// Packed weights on one device, with the problem they were packed for (its token count is ignored:
// each call takes T from x).
struct GpuWeights {
  MoeProblem problem;
  int device = 0;
  std::unique_ptr<DeviceWeights> w;

  ~GpuWeights() { release(); }
  void release() {
    if (!w) return;
    int prev = 0;
    cudaGetDevice(&prev);
    if (prev != device) cudaSetDevice(device);
    w.reset();
    if (prev != device) cudaSetDevice(prev);
  }
  const DeviceWeights& get() const {
    FP4MOE_CHECK(w != nullptr, "these DeviceWeights were released; upload the weights again");
    return *w;
  }
};

std::unique_ptr<GpuWeights> upload(const MoeProblem& p, const PackedWeights& packed, nb::handle device_h,
                                   nb::handle stream_h) {
  const int device = to_int<int>(device_h, "device");
  const uintptr_t stream = to_int<uintptr_t>(stream_h, "stream");
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "cannot upload weights: " << why);
  int count = 0;
  PY_CUDA_CHECK(cudaGetDeviceCount(&count));
  FP4MOE_CHECK(device >= 0 && device < count,
               "device " << device << " does not exist (" << count << " CUDA devices)");
  const PackedLayout& L = packed.layout;
  FP4MOE_CHECK(L.hidden == p.hidden && L.intermediate == p.intermediate &&
                   L.experts == p.local_experts() && L.format == p.format && L.gated == p.gated() &&
                   L.has_bias == p.has_bias,
               "packed weights do not match the problem " << p.to_string()
                                                          << ": prepack them for this problem");
  auto g = std::make_unique<GpuWeights>();
  g->problem = p;
  g->device = device;
  DeviceScope scope(device);
  nb::gil_scoped_release nogil;
  g->w = std::make_unique<DeviceWeights>(packed, reinterpret_cast<cudaStream_t>(stream));
  return g;
}

// The per-call problem: T from the caller, routing precomputed when top-k ids are given, the logits
// dtype from the logits.
MoeProblem call_problem(const GpuWeights& g, int64_t tokens, bool precomputed, bool logits_bf16) {
  MoeProblem p = precomputed ? g.problem.with_precomputed_routing() : g.problem;
  p.tokens = tokens;
  if (!precomputed) {
    FP4MOE_CHECK(p.routing.method != RoutingMethod::precomputed,
                 "these weights were uploaded for precomputed routing: pass topk_ids and "
                 "topk_weights");
    p.routing.logits_dtype = logits_bf16 ? DType::bf16 : DType::f32;
  }
  return p;
}

template <class A>
void check_device(const A& a, const char* name, const GpuWeights& g) {
  FP4MOE_CHECK(a.device_id() == g.device, name << " is on cuda:" << a.device_id()
                                               << " but the weights are on cuda:" << g.device);
}

// Forward from DLPack arrays. Checks everything against the weights' problem before launching.
void forward_dlpack(const GpuWeights& g, nb::handle x_h, nb::handle out_h, nb::handle workspace_h,
                    nb::handle stream_h, nb::handle logits_h, nb::handle router_bias_h,
                    nb::handle topk_ids_h, nb::handle topk_weights_h) {
  const Array x = to_array(x_h, "x");
  MutArray out = to_mut_array(out_h, "out");
  MutArray workspace = to_mut_array(workspace_h, "workspace");
  const uintptr_t stream = to_int<uintptr_t>(stream_h, "stream");
  const std::optional<Array> logits = to_opt_array(logits_h, "logits");
  const std::optional<Array> router_bias = to_opt_array(router_bias_h, "router_bias");
  const std::optional<Array> topk_ids = to_opt_array(topk_ids_h, "topk_ids");
  const std::optional<Array> topk_weights = to_opt_array(topk_weights_h, "topk_weights");
  const DeviceWeights& w = g.get();
  const MoeProblem& base = g.problem;
  FP4MOE_CHECK(x.ndim() == 2, "x must be 2-D [tokens, " << base.hidden << "], got " << x.ndim()
                                                        << " dimensions");
  const int64_t T = int64_t(x.shape(0)), H = base.hidden, E = base.num_experts, k = base.top_k;
  check_array(x, "x", bf16_dtype(), {T, H}, Where::cuda);
  check_array(out, "out", bf16_dtype(), {T, H}, Where::cuda);
  check_device(x, "x", g);
  check_device(out, "out", g);
  const bool pre = topk_ids.has_value() || topk_weights.has_value();
  DeviceInputs in;
  in.x = x.data();
  in.out = out.data();
  bool bf16_logits = false;
  if (pre) {
    FP4MOE_CHECK(topk_ids && topk_weights, "pass topk_ids and topk_weights together");
    FP4MOE_CHECK(!logits, "pass either router logits or topk_ids / topk_weights, not both");
    FP4MOE_CHECK(!router_bias, "router_bias is used by the routing on logits; with topk_ids / "
                               "topk_weights pass none");
    check_array(*topk_ids, "topk_ids", dtype_of<int32_t>(), {T, k}, Where::cuda);
    check_array(*topk_weights, "topk_weights", dtype_of<float>(), {T, k}, Where::cuda);
    check_device(*topk_ids, "topk_ids", g);
    check_device(*topk_weights, "topk_weights", g);
    in.topk_ids = static_cast<const int32_t*>(topk_ids->data());
    in.topk_weights = static_cast<const float*>(topk_weights->data());
  } else {
    FP4MOE_CHECK(logits, "pass router logits [tokens, " << E << "] or topk_ids / topk_weights");
    bf16_logits = same_dtype(logits->dtype(), bf16_dtype());
    check_array(*logits, "logits", bf16_logits ? bf16_dtype() : dtype_of<float>(), {T, E}, Where::cuda);
    check_device(*logits, "logits", g);
    in.logits = logits->data();
    FP4MOE_CHECK(base.routing.has_bias == router_bias.has_value(),
                 (base.routing.has_bias ? "routing.has_bias is set: pass router_bias float32 ["
                                        : "routing.has_bias is not set: pass no router_bias [")
                     << E << "]");
    if (router_bias) {
      check_array(*router_bias, "router_bias", dtype_of<float>(), {E}, Where::cuda);
      check_device(*router_bias, "router_bias", g);
      in.router_bias = static_cast<const float*>(router_bias->data());
    }
  }
  const MoeProblem p = call_problem(g, T, pre, bf16_logits);
  check_array(workspace, "workspace", dtype_of<uint8_t>(), {-1}, Where::cuda);
  check_device(workspace, "workspace", g);
  DeviceScope scope(g.device);
  run(p, w, in, workspace.data(), workspace.nbytes(), reinterpret_cast<cudaStream_t>(stream));
}

// Forward from raw device pointers that the caller (fp4moe.torch) has already checked: dtype,
// shape, contiguity and device. Still validated here: the problem, nulls, alignment, workspace size.
void forward_ptr(const GpuWeights& g, int64_t tokens, uintptr_t x, uintptr_t out, uintptr_t logits,
                 bool logits_bf16, uintptr_t router_bias, uintptr_t topk_ids, uintptr_t topk_weights,
                 uintptr_t workspace, size_t workspace_bytes, uintptr_t stream) {
  const DeviceWeights& w = g.get();
  const bool pre = topk_ids != 0 || topk_weights != 0;
  const MoeProblem p = call_problem(g, tokens, pre, logits_bf16);
  DeviceInputs in;
  in.x = reinterpret_cast<const void*>(x);
  in.out = reinterpret_cast<void*>(out);
  in.logits = reinterpret_cast<const void*>(logits);
  in.router_bias = reinterpret_cast<const float*>(router_bias);
  in.topk_ids = reinterpret_cast<const int32_t*>(topk_ids);
  in.topk_weights = reinterpret_cast<const float*>(topk_weights);
  DeviceScope scope(g.device);
  run(p, w, in, reinterpret_cast<void*>(workspace), workspace_bytes,
      reinterpret_cast<cudaStream_t>(stream));
}

// The C++ side of bench/python_overhead.py: `iters` back-to-back calls of run() on `stream`, timed
// with CUDA events (device time per call) and the host clock (host time per call, launch cost).
std::tuple<double, double> time_run(const GpuWeights& g, int64_t tokens, uintptr_t x, uintptr_t out,
                                    uintptr_t logits, bool logits_bf16, uintptr_t topk_ids,
                                    uintptr_t topk_weights, uintptr_t workspace,
                                    size_t workspace_bytes, uintptr_t stream, int iters) {
  FP4MOE_CHECK(iters > 0, "iters must be positive");
  const DeviceWeights& w = g.get();
  const bool pre = topk_ids != 0;
  const MoeProblem p = call_problem(g, tokens, pre, logits_bf16);
  FP4MOE_CHECK(!p.routing.has_bias, "time_run does not take a router bias");
  DeviceInputs in;
  in.x = reinterpret_cast<const void*>(x);
  in.out = reinterpret_cast<void*>(out);
  in.logits = reinterpret_cast<const void*>(logits);
  in.topk_ids = reinterpret_cast<const int32_t*>(topk_ids);
  in.topk_weights = reinterpret_cast<const float*>(topk_weights);
  auto s = reinterpret_cast<cudaStream_t>(stream);
  void* ws = reinterpret_cast<void*>(workspace);
  DeviceScope scope(g.device);
  nb::gil_scoped_release nogil;
  cudaEvent_t e0, e1;
  PY_CUDA_CHECK(cudaEventCreate(&e0));
  PY_CUDA_CHECK(cudaEventCreate(&e1));
  for (int i = 0; i < 3; ++i) run(p, w, in, ws, workspace_bytes, s);
  PY_CUDA_CHECK(cudaStreamSynchronize(s));
  PY_CUDA_CHECK(cudaEventRecord(e0, s));
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) run(p, w, in, ws, workspace_bytes, s);
  const auto t1 = std::chrono::steady_clock::now();
  PY_CUDA_CHECK(cudaEventRecord(e1, s));
  PY_CUDA_CHECK(cudaEventSynchronize(e1));
  float ms = 0;
  PY_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  const double host_us = std::chrono::duration<double, std::micro>(t1 - t0).count() / iters;
  return {1e3 * double(ms) / iters, host_us};
}

}  // namespace

void bind_gpu(nb::module_& m) {
  nb::class_<PackedLayout>(m, "PackedLayout", "Sizes of the library's packed kernel layout.")
      .def_ro("hidden", &PackedLayout::hidden)
      .def_ro("intermediate", &PackedLayout::intermediate)
      .def_ro("experts", &PackedLayout::experts)
      .def_ro("format", &PackedLayout::format)
      .def_ro("gated", &PackedLayout::gated)
      .def_ro("has_bias", &PackedLayout::has_bias)
      .def_ro("total_bytes", &PackedLayout::total_bytes)
      .def("checkpoint_bytes_per_expert", &PackedLayout::checkpoint_bytes_per_expert);

  nb::class_<PackedWeights>(m, "PackedWeights", "Weights in the packed kernel layout, on the host.")
      .def_ro("layout", &PackedWeights::layout)
      .def_prop_ro("nbytes", [](const PackedWeights& p) { return p.bytes.size(); })
      .def_prop_ro("bytes", [](const PackedWeights& p) { return to_numpy(p.bytes, {p.bytes.size()}); },
                   nb::rv_policy::move, "A copy of the packed bytes, uint8 [nbytes].");

  m.def(
      "prepack",
      [](const MoeProblem& p, const MoeWeights& w) {
        nb::gil_scoped_release nogil;
        return prepack(p, w);
      },
      nb::arg("problem"), nb::arg("weights"),
      "Converts host weights into the packed kernel layout; validates everything first.");

  nb::class_<GpuWeights>(m, "DeviceWeights", nb::is_weak_referenceable(),
                         "Packed weights in the memory of one CUDA device, with the problem they "
                         "were packed for. Freed when the object is collected or on release().")
      .def_prop_ro("problem", [](const GpuWeights& g) { return g.problem; },
                   "A copy of the problem (its token count is ignored: calls take T from x).")
      .def_ro("device", &GpuWeights::device)
      .def_prop_ro("nbytes", [](const GpuWeights& g) { return g.get().layout().total_bytes; })
      .def_prop_ro("released", [](const GpuWeights& g) { return g.w == nullptr; })
      .def("release", &GpuWeights::release, "Frees the device memory now.")
      .def("__repr__", [](const GpuWeights& g) {
        return "DeviceWeights(cuda:" + std::to_string(g.device) + ", " + g.problem.to_string() +
               (g.w ? ")" : ", released)");
      });

  m.def("upload", &upload, nb::arg("problem"), nb::arg("packed"), nb::arg("device") = 0,
        nb::arg("stream") = 0,
        "Copies packed weights to `device` (synchronizes `stream` once: not for use in capture).");

  m.def(
      "workspace_size",
      [](const MoeProblem& p, nb::handle tokens) {
        MoeProblem q = p;
        if (!tokens.is_none()) q.tokens = to_int<int64_t>(tokens, "tokens");
        if (q.tokens == 0) q.tokens = 1;  // the smallest size, so a buffer made for T = 0 is usable
        return workspace_size(q);
      },
      nb::arg("problem"), nb::arg("tokens").none() = nb::none(),
      "Workspace bytes a GPU call of `tokens` tokens (default: problem.tokens) needs. It grows with "
      "the token count up to the prefill's token chunk, and is the same for every T <= 64 (decode).");

  m.def(
      "gpu_available",
      [] {
        std::string why;
        const bool ok = gpu_available(&why);
        return nb::make_tuple(ok, why);
      },
      "(True, '') when a Hopper (sm_90) CUDA device is present, else (False, reason).");

  m.def(
      "make_plan",
      [](const MoeProblem& p, nb::handle device_h) {
        const int device = to_int<int>(device_h, "device");
        std::string why;
        FP4MOE_CHECK(gpu_available(&why), "make_plan needs the GPU: " << why);
        int count = 0;
        PY_CUDA_CHECK(cudaGetDeviceCount(&count));
        FP4MOE_CHECK(device >= 0 && device < count,
                     "device " << device << " does not exist (" << count << " CUDA devices)");
        DeviceScope scope(device);
        return make_plan(p).to_string();
      },
      nb::arg("problem"), nb::arg("device") = 0, "The launch plan run() would use, printed.");

  m.def("moe_forward_dlpack", &forward_dlpack, nb::arg("weights"), nb::arg("x"), nb::arg("out"),
        nb::arg("workspace"), nb::arg("stream"), nb::arg("logits").none() = nb::none(),
        nb::arg("router_bias").none() = nb::none(), nb::arg("topk_ids").none() = nb::none(),
        nb::arg("topk_weights").none() = nb::none());
  m.def("moe_forward_ptr", &forward_ptr, nb::arg("weights"), nb::arg("tokens"), nb::arg("x"),
        nb::arg("out"), nb::arg("logits"), nb::arg("logits_bf16"), nb::arg("router_bias"),
        nb::arg("topk_ids"), nb::arg("topk_weights"), nb::arg("workspace"),
        nb::arg("workspace_bytes"), nb::arg("stream"));
  m.def("time_run", &time_run, nb::arg("weights"), nb::arg("tokens"), nb::arg("x"), nb::arg("out"),
        nb::arg("logits"), nb::arg("logits_bf16"), nb::arg("topk_ids"), nb::arg("topk_weights"),
        nb::arg("workspace"), nb::arg("workspace_bytes"), nb::arg("stream"), nb::arg("iters"));
}

}  // namespace fp4moe::py
