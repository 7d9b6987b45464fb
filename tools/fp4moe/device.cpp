// `fp4moe device`: what the GPU path sees; exits non-zero when no usable (Hopper) GPU is present.
#include <cuda_runtime_api.h>

#include <cstdio>

#include "commands.h"
#include "fp4moe/moe.h"

namespace fp4moe::cli {

void add_device_command(CLI::App& app) {
  auto* cmd = app.add_subcommand("device", "Show the CUDA device and whether the decode path can run on it");
  cmd->callback([] {
    std::string why;
    const bool ok = gpu_available(&why);
    int n = 0;
    if (cudaGetDeviceCount(&n) == cudaSuccess && n > 0) {
      cudaDeviceProp prop;
      cudaGetDeviceProperties(&prop, 0);
      int driver = 0, runtime = 0;
      cudaDriverGetVersion(&driver);
      cudaRuntimeGetVersion(&runtime);
      std::printf("device 0: %s, sm_%d%d, %d SMs, L2 %d MB, %.1f GB, driver %d.%d, runtime %d.%d\n", prop.name,
                  prop.major, prop.minor, prop.multiProcessorCount, prop.l2CacheSize >> 20,
                  double(prop.totalGlobalMem) / 1e9, driver / 1000, (driver % 1000) / 10, runtime / 1000,
                  (runtime % 1000) / 10);
    }
    if (!ok) {
      std::printf("decode path unavailable: %s\n", why.c_str());
      throw CLI::RuntimeError(2);
    }
    std::printf("decode path available\n");
  });
}

}  // namespace fp4moe::cli
