// Bindings of the GPU path: prepack, upload (DeviceWeights), the GPU prepack of checkpoint tensors
// already in device memory, workspace sizing and the forward call.
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
#include <tuple>
#include <vector>

#include "common.h"
#include "fp4moe/moe.h"
#include "fp4moe/prepack_device.h"

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


// ---- prepack_device: checkpoint tensors in device memory -> DeviceWeights ------------------------

// The arrays of one prepack_device call, kept alive until the packing is done, with their argument
// names.
struct DeviceArgs {
  std::vector<Array> keep;
  std::vector<std::string> names;
  int device = -1;  // set by check_devices

  // Every array a CUDA tensor on one device. Checked after all dtypes and shapes, so that a host array
  // with a wrong dtype or shape is reported as such.
  void check_devices() {
    for (size_t i = 0; i < keep.size(); ++i) {
      const Array& a = keep[i];
      FP4MOE_CHECK(a.device_type() == nb::device::cuda::value,
                   names[i] << " must be a CUDA tensor (device memory), got an array on "
                            << (a.device_type() == nb::device::cpu::value
                                    ? std::string("the host (CPU)")
                                    : "DLPack device type " + std::to_string(a.device_type())));
      const int dev = int(a.device_id());
      if (i == 0) device = dev;
      FP4MOE_CHECK(dev == device, names[i] << " is on cuda:" << dev << " but " << names[0] << " is on cuda:"
                                           << device << ": pass every tensor on one device");
    }
  }
};

std::string dims(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// dtype (one of `ok`, described by `ok_desc`), shape and contiguity; the device comes later.
void check_device_array(const Array& a, const std::string& name, const std::vector<nb::dlpack::dtype>& ok,
                        const std::string& ok_desc, const std::vector<int64_t>& shape,
                        const char* shape_hint) {
  bool dt = false;
  for (const auto& d : ok) dt = dt || same_dtype(a.dtype(), d);
  FP4MOE_CHECK(dt, name << " must have dtype " << ok_desc << ", got " << dtype_name(a.dtype()));
  bool same = a.ndim() == shape.size();
  for (size_t i = 0; same && i < shape.size(); ++i) same = int64_t(a.shape(i)) == shape[i];
  FP4MOE_CHECK(same, name << " must have shape " << dims(shape) << shape_hint << ", got " << shape_string(a));
  FP4MOE_CHECK(c_contiguous(a), name << " must be contiguous (row-major); pass a contiguous copy");
}

// One pointer per local expert from either a stacked array [E, *shape] or a list / tuple of E arrays
// of `shape`. `dtype_out` receives the dtype of the arrays (all the same).
std::vector<const void*> per_expert_pointers(nb::handle h, const std::string& name, int64_t E,
                                             const std::vector<nb::dlpack::dtype>& ok,
                                             const std::string& ok_desc, const std::vector<int64_t>& shape,
                                             const char* float8_ok, DeviceArgs& args,
                                             nb::dlpack::dtype* dtype_out = nullptr) {
  std::vector<const void*> ptrs;
  if (PyList_Check(h.ptr()) || PyTuple_Check(h.ptr())) {
    const size_t n = nb::len(h);
    FP4MOE_CHECK(int64_t(n) == E, name << " must hold one tensor per local expert (" << E << "), got " << n);
    for (size_t e = 0; e < n; ++e) {
      const std::string ne = name + "[" + std::to_string(e) + "]";
      Array a = to_array(nb::handle(PySequence_Fast_GET_ITEM(h.ptr(), Py_ssize_t(e))), ne.c_str(), float8_ok);
      check_device_array(a, ne, ok, ok_desc, shape, "");
      if (e > 0) {
        FP4MOE_CHECK(same_dtype(a.dtype(), args.keep.back().dtype()),
                     ne << " must have the dtype of " << name << "[0], " << dtype_name(args.keep.back().dtype())
                        << ", got " << dtype_name(a.dtype()));
      }
      ptrs.push_back(a.data());
      if (dtype_out) *dtype_out = a.dtype();
      args.keep.push_back(std::move(a));
      args.names.push_back(ne);
    }
    return ptrs;
  }
  Array a = to_array(h, name.c_str(), float8_ok);
  std::vector<int64_t> full{E};
  full.insert(full.end(), shape.begin(), shape.end());
  const std::string hint = " (dimension 0: the " + std::to_string(E) + " local experts)";
  check_device_array(a, name, ok, ok_desc, full, hint.c_str());
  int64_t per = a.dtype().bits / 8;
  for (int64_t d : shape) per *= d;
  for (int64_t e = 0; e < E; ++e) ptrs.push_back(static_cast<const uint8_t*>(a.data()) + e * per);
  if (dtype_out) *dtype_out = a.dtype();
  args.keep.push_back(std::move(a));
  args.names.push_back(name);
  return ptrs;
}

struct MatrixArgs {
  nb::handle data, scales, global_scale;
  bool given() const { return !data.is_none() || !scales.is_none() || !global_scale.is_none(); }
};

std::unique_ptr<GpuWeights> prepack_device_py(
    const MoeProblem& p, nb::handle gate_d, nb::handle gate_s, nb::handle gate_g, nb::handle up_d,
    nb::handle up_s, nb::handle up_g, nb::handle gate_up_d, nb::handle gate_up_s, nb::handle gate_up_g,
    nb::handle down_d, nb::handle down_s, nb::handle down_g, nb::handle gate_bias_h, nb::handle up_bias_h,
    nb::handle gate_up_bias_h, nb::handle down_bias_h, nb::handle input_scale13_h,
    nb::handle input_scale2_h, GateUpLayout gate_up_layout, ScaleLayout scale_layout,
    ScaleDirection direction, nb::handle stream_h) {
  p.validate();
  const uintptr_t stream = to_int<uintptr_t>(stream_h, "stream");
  const int64_t E = p.local_experts(), H = p.hidden, I = p.intermediate;
  const bool nv = p.format == Format::nvfp4;
  const bool fused = gate_up_layout != GateUpLayout::separate;
  const int blk = block_size(p.format);
  const char* layout_name = gate_up_layout == GateUpLayout::separate       ? "separate"
                            : gate_up_layout == GateUpLayout::concatenated ? "concatenated"
                                                                           : "interleaved";
  FP4MOE_CHECK(scale_layout == ScaleLayout::linear || nv,
               "the swizzled_128x4 scale layout exists only for nvfp4 scales");
  FP4MOE_CHECK(!fused || p.gated(), "gate_up_layout=\"" << layout_name << "\" needs a gated activation, not "
                                                        << to_string(p.activation.kind)
                                                        << ": pass gate_up_layout=\"separate\" with up and down");

  const MatrixArgs gate{gate_d, gate_s, gate_g}, up{up_d, up_s, up_g}, gate_up{gate_up_d, gate_up_s, gate_up_g},
      down{down_d, down_s, down_g};
  if (fused) {
    FP4MOE_CHECK(!gate.given() && !up.given(), "gate_up_layout=\"" << layout_name
                                                                     << "\" takes one gate_up matrix: pass no gate or up");
    FP4MOE_CHECK(gate_bias_h.is_none() && up_bias_h.is_none(),
                 "gate_up_layout=\"" << layout_name << "\" takes one gate_up_bias: pass no gate_bias or up_bias");
  } else {
    FP4MOE_CHECK(!gate_up.given() && gate_up_bias_h.is_none(),
                 "gate_up and gate_up_bias need gate_up_layout=\"concatenated\" or \"interleaved\"; with "
                 "\"separate\" pass gate and up");
    FP4MOE_CHECK(p.gated() || !gate.given(), "gate must be None for the non-gated activation "
                                                 << to_string(p.activation.kind));
    FP4MOE_CHECK(p.gated() || gate_bias_h.is_none(), "gate_bias must be None for the non-gated activation "
                                                         << to_string(p.activation.kind));
  }

  DeviceArgs args;
  const std::vector<nb::dlpack::dtype> u8{dtype_of<uint8_t>()};
  const char* f8 = nv ? "float8_e4m3fn" : "float8_e8m0fnu";
  const std::string scale_desc = std::string("uint8 or ") + f8;
  DeviceCheckpointLayer w;
  w.scale_layout = scale_layout;
  w.direction = direction;
  w.gate_up_layout = gate_up_layout;

  auto matrix = [&](const MatrixArgs& m, const std::string& name, int64_t rows, int64_t cols,
                    DeviceFp4Matrix& out) {
    FP4MOE_CHECK(!m.data.is_none() && !m.scales.is_none(), name << " needs its data and scales");
    out.data = per_expert_pointers(m.data, name + ".data", E, u8, "uint8", {rows, cols / 2}, nullptr, args);
    const std::vector<int64_t> sshape =
        scale_layout == ScaleLayout::linear
            ? std::vector<int64_t>{rows, cols / blk}
            : std::vector<int64_t>{int64_t(swizzled_128x4_size(rows, cols / blk))};
    out.scales = per_expert_pointers(m.scales, name + ".scales", E, u8, scale_desc, sshape, f8, args);
    if (nv) {
      FP4MOE_CHECK(!m.global_scale.is_none(),
                   name << ".global_scale is required for nvfp4: " << E << " per-expert values, "
                        << to_string(direction) << " direction");
      out.global_scale = to_vector<float>(to_array(m.global_scale, (name + ".global_scale").c_str()),
                                          (name + ".global_scale").c_str(), {E});
    } else {
      FP4MOE_CHECK(m.global_scale.is_none(), name << ".global_scale: mxfp4 has no global scales; pass None");
    }
  };
  auto bias = [&](nb::handle h, const char* name, int64_t rows, bool wanted, DeviceBias& out) {
    if (!wanted) {
      FP4MOE_CHECK(h.is_none(), name << " must be None: " << (p.has_bias ? "this layout has no such bias"
                                                                          : "the problem has has_bias = False"));
      return;
    }
    FP4MOE_CHECK(!h.is_none(), "the problem has has_bias = True: pass " << name << " (float32 or bfloat16 ["
                                                                        << E << ", " << rows << "])");
    nb::dlpack::dtype t{};
    out.data = per_expert_pointers(h, name, E, {dtype_of<float>(), bf16_dtype(), dtype_of<uint16_t>()},
                                   "float32 or bfloat16", {rows}, "bfloat16", args, &t);
    out.dtype = same_dtype(t, dtype_of<float>()) ? DType::f32 : DType::bf16;
  };
  if (fused) {
    matrix(gate_up, "gate_up", 2 * I, H, w.gate_up);
  } else {
    if (p.gated()) matrix(gate, "gate", I, H, w.gate);
    matrix(up, "up", I, H, w.up);
  }
  matrix(down, "down", H, I, w.down);
  bias(gate_bias_h, "gate_bias", I, p.has_bias && !fused && p.gated(), w.gate_bias);
  bias(up_bias_h, "up_bias", I, p.has_bias && !fused, w.up_bias);
  bias(gate_up_bias_h, "gate_up_bias", 2 * I, p.has_bias && fused, w.gate_up_bias);
  bias(down_bias_h, "down_bias", H, p.has_bias, w.down_bias);
  const bool w4a4 = p.input_mode == InputMode::w4a4;
  for (auto [h, name, v] : {std::tuple{input_scale13_h, "input_scale13", &w.input_scale13},
                            std::tuple{input_scale2_h, "input_scale2", &w.input_scale2}}) {
    if (h.is_none()) {
      FP4MOE_CHECK(!w4a4, "W4A4 needs the activations' input scales: pass " << name << " (" << E
                                                                            << " per-expert values, decode direction)");
      continue;
    }
    FP4MOE_CHECK(w4a4, name << " is used by W4A4 only (the problem's input_mode is w4a16): pass None");
    *v = to_vector<float>(to_array(h, name), name, {E});
  }

  args.check_devices();
  std::string why;
  FP4MOE_CHECK(gpu_available(&why), "prepack_device needs a Hopper GPU: " << why);
  int count = 0;
  PY_CUDA_CHECK(cudaGetDeviceCount(&count));
  FP4MOE_CHECK(args.device >= 0 && args.device < count,
               args.names[0] << " is on cuda:" << args.device << ", which does not exist (" << count << " CUDA devices)");
  auto g = std::make_unique<GpuWeights>();
  g->problem = p;
  g->device = args.device;
  DeviceScope scope(args.device);
  nb::gil_scoped_release nogil;
  g->w = std::make_unique<DeviceWeights>(prepack_device(p, w, reinterpret_cast<cudaStream_t>(stream)));
  return g;
}

// The packed bytes of device weights, copied to the host (for tests and debugging).
nb::ndarray<nb::numpy, uint8_t> download(const GpuWeights& g) {
  const DeviceWeights& w = g.get();
  std::vector<uint8_t> bytes(size_t(w.layout().total_bytes));
  {
    DeviceScope scope(g.device);
    nb::gil_scoped_release nogil;
    PY_CUDA_CHECK(cudaMemcpy(bytes.data(), w.data(), bytes.size(), cudaMemcpyDeviceToHost));
  }
  const size_t n = bytes.size();
  return to_numpy(std::move(bytes), {n});
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
      .def_prop_ro("layout", [](const GpuWeights& g) { return g.get().layout(); },
                   "Sizes of the packed layout (as PackedWeights.layout).")
      .def("download", &download,
           "A copy of the packed bytes on the host, uint8 [nbytes] (synchronizes): the same bytes as "
           "PackedWeights.bytes of the host prepack.")
      .def("release", &GpuWeights::release, "Frees the device memory now.")
      .def("__repr__", [](const GpuWeights& g) {
        return "DeviceWeights(cuda:" + std::to_string(g.device) + ", " + g.problem.to_string() +
               (g.w ? ")" : ", released)");
      });

  m.def("upload", &upload, nb::arg("problem"), nb::arg("packed"), nb::arg("device") = 0,
        nb::arg("stream") = 0,
        "Copies packed weights to `device` (synchronizes `stream` once: not for use in capture).");

  nb::enum_<GateUpLayout>(m, "GateUpLayout",
                          "How a checkpoint stores the gate and up projections: two tensors, or one "
                          "[2I, H] tensor with gate rows then up rows (concatenated) or alternating "
                          "(interleaved, gpt-oss).")
      .value("separate", GateUpLayout::separate)
      .value("concatenated", GateUpLayout::concatenated)
      .value("interleaved", GateUpLayout::interleaved);

  m.def("prepack_device", &prepack_device_py, nb::arg("problem"), nb::arg("gate_data").none(),
        nb::arg("gate_scales").none(), nb::arg("gate_global_scale").none(), nb::arg("up_data").none(),
        nb::arg("up_scales").none(), nb::arg("up_global_scale").none(), nb::arg("gate_up_data").none(),
        nb::arg("gate_up_scales").none(), nb::arg("gate_up_global_scale").none(),
        nb::arg("down_data").none(), nb::arg("down_scales").none(), nb::arg("down_global_scale").none(),
        nb::arg("gate_bias").none(), nb::arg("up_bias").none(), nb::arg("gate_up_bias").none(),
        nb::arg("down_bias").none(), nb::arg("input_scale13").none(), nb::arg("input_scale2").none(),
        nb::arg("gate_up_layout"), nb::arg("scale_layout"), nb::arg("direction"), nb::arg("stream"),
        "Packs checkpoint tensors already on a CUDA device (DLPack) into DeviceWeights on that device. "
        "Checks every argument before anything launches; synchronizes `stream`.");

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
