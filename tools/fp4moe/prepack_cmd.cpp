// `fp4moe prepack`: how fast a random layer of a preset is converted from the checkpoint layout into
// the packed kernel layout, on the host (every core) and, with a Hopper GPU, on the device
// (prepack_device from device tensors). Rates are GB/s of checkpoint bytes (FP4 data + block
// scales + biases as a checkpoint stores them), the bytes a loader has to read.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

#include <sys/resource.h>

#include <cuda_runtime_api.h>

#include "commands.h"
#include "fp4moe/error.h"
#include "fp4moe/moe.h"
#include "fp4moe/prepack_device.h"
#include "fp4moe/presets.h"
#include "fp4moe/weights.h"

namespace fp4moe::cli {
namespace {

struct Options {
  std::string presets = "qwen3-235b-a22b";
  std::string format = "native";
  int reps = 3;
  uint64_t seed = 1;
};

std::vector<std::string> split(const std::string& s) {
  std::vector<std::string> out;
  size_t start = 0;
  while (start <= s.size()) {
    const size_t end = s.find(',', start);
    const std::string item = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

// CPU seconds (user + system, every thread) the process has used so far.
double cpu_seconds() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return double(u.ru_utime.tv_sec + u.ru_stime.tv_sec) + 1e-6 * double(u.ru_utime.tv_usec + u.ru_stime.tv_usec);
}

// Device copies of a layer's checkpoint tensors (separate gate / up / down, linear scales, decode
// global scales, f32 biases): what a loader has in device memory before it prepacks there.
struct DeviceLayerCopy {
  DeviceCheckpointLayer layer;
  std::vector<void*> buffers;
  DeviceLayerCopy() = default;
  DeviceLayerCopy(const DeviceLayerCopy&) = delete;
  ~DeviceLayerCopy() {
    for (void* b : buffers) cudaFree(b);
  }
  const void* put(const void* host, size_t bytes) {
    void* d = nullptr;
    FP4MOE_CHECK(cudaMalloc(&d, bytes) == cudaSuccess, "cudaMalloc of " << bytes << " bytes failed");
    buffers.push_back(d);
    FP4MOE_CHECK(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice) == cudaSuccess, "upload failed");
    return d;
  }
  void add(DeviceFp4Matrix& m, const QuantizedMatrix& q) {
    m.data.push_back(put(q.data.data(), q.data.size()));
    m.scales.push_back(put(q.scales.data(), q.scales.size()));
    if (q.format == Format::nvfp4) m.global_scale.push_back(q.global_scale);
  }
  void add(DeviceBias& b, const std::vector<float>& v) { b.data.push_back(put(v.data(), v.size() * 4)); }
};

void upload(const MoeProblem& p, const MoeWeights& w, DeviceLayerCopy& d) {
  for (const ExpertWeights& x : w.experts) {
    if (p.gated()) d.add(d.layer.gate, x.gate);
    d.add(d.layer.up, x.up);
    d.add(d.layer.down, x.down);
    if (p.has_bias) {
      if (p.gated()) d.add(d.layer.gate_bias, x.gate_bias);
      d.add(d.layer.up_bias, x.up_bias);
      d.add(d.layer.down_bias, x.down_bias);
    }
    if (p.input_mode == InputMode::w4a4) {
      d.layer.input_scale13.push_back(x.input_scale13);
      d.layer.input_scale2.push_back(x.input_scale2);
    }
  }
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

void run_prepack(const Options& o) {
  std::printf("# fp4moe prepack | host: %u hardware threads | median of %d runs; cpu_s: CPU seconds of all threads\n",
              std::thread::hardware_concurrency(), o.reps);
  std::string why;
  const bool gpu = gpu_available(&why);
  if (!gpu) std::printf("# no GPU prepack column: %s\n", why.c_str());
  std::printf("%-18s %-6s %6s %10s %10s %9s %9s", "preset", "format", "E", "ckpt_MB", "host_ms", "host_GB/s", "cpu_s");
  if (gpu) std::printf(" %10s %9s", "dev_ms", "dev_GB/s");
  std::printf("\n");
  for (const std::string& name : split(o.presets)) {
    MoeProblem p = find_preset(name).problem(1);
    if (o.format != "native") p.format = parse_format(o.format);
    const MoeWeights w = random_weights(p, o.seed);
    std::vector<double> ms, cpu;
    int64_t ckpt_bytes = 0;
    for (int r = 0; r < o.reps; ++r) {
      const double c0 = cpu_seconds();
      const auto t0 = std::chrono::steady_clock::now();
      const PackedWeights packed = prepack(p, w);
      const auto t1 = std::chrono::steady_clock::now();
      cpu.push_back(cpu_seconds() - c0);
      ms.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
      ckpt_bytes = packed.layout.checkpoint_bytes_per_expert() * packed.layout.experts;
    }
    const double host_ms = median(ms);
    std::printf("%-18s %-6s %6d %10.1f %10.1f %9.3f %9.2f", name.c_str(), std::string(to_string(p.format)).c_str(),
                p.local_experts(), ckpt_bytes / 1e6, host_ms, ckpt_bytes / (host_ms * 1e6), median(cpu));
    if (gpu) {
      // prepack_device from the checkpoint tensors in device memory; it synchronizes its stream, so
      // the wall time of the call is the conversion time (one warm-up call first).
      DeviceLayerCopy d;
      upload(p, w, d);
      { const DeviceWeights warm = prepack_device(p, d.layer); }
      std::vector<double> dms;
      for (int r = 0; r < o.reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        const DeviceWeights dw = prepack_device(p, d.layer);
        dms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
      }
      const double dev_ms = median(dms);
      std::printf(" %10.2f %9.1f", dev_ms, ckpt_bytes / (dev_ms * 1e6));
    }
    std::printf("\n");
  }
}

}  // namespace

void add_prepack_command(CLI::App& app) {
  auto* o = new Options();  // lives for the program's duration, owned by the callback
  auto* cmd = app.add_subcommand("prepack", "Time the conversion of a random layer into the packed kernel layout");
  cmd->add_option("--preset", o->presets, "Comma-separated presets")->capture_default_str();
  cmd->add_option("--format", o->format, "nvfp4 | mxfp4 | native (the preset's own)")->capture_default_str();
  cmd->add_option("--reps", o->reps, "Timed runs (the median is printed)")->capture_default_str()->check(CLI::Range(1, 1000));
  cmd->add_option("--seed", o->seed, "Random seed")->capture_default_str();
  cmd->callback([o] { run_prepack(*o); });
}

}  // namespace fp4moe::cli
