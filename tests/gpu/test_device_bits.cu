// Device-side facts the decode kernel's weight loop relies on: the cache-policy constant equals what
// createpolicy returns on this GPU, and the pair decode compiled for the device (funnel-shift rotates)
// gives the host's bits for random words.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <random>
#include <string>
#include <vector>

#include "fp4moe/fp4moe.h"
#include "kernels/common/fragments.cuh"

namespace fp4moe {
namespace {

__global__ void policy_kernel(uint64_t* out) {
  out[0] = kernels::created_evict_first_policy();
  out[1] = kernels::evict_first_policy();
}

__global__ void unpack_kernel(const uint32_t* w, uint32_t* out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  out[4 * i + 0] = unpack_pair<0>(w[i]);
  out[4 * i + 1] = unpack_pair<1>(w[i]);
  out[4 * i + 2] = unpack_pair<2>(w[i]);
  out[4 * i + 3] = unpack_pair<3>(w[i]);
}

#define SKIP_WITHOUT_GPU()                                 \
  do {                                                     \
    std::string why_;                                      \
    if (!gpu_available(&why_)) GTEST_SKIP() << why_;       \
  } while (0)
#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr

TEST(DeviceBits, EvictFirstPolicyConstantMatchesCreatepolicy) {
  SKIP_WITHOUT_GPU();
  uint64_t* d = nullptr;
  CUDA_OK(cudaMalloc(&d, 2 * sizeof(uint64_t)));
  CUDA_OK(cudaMemset(d, 0xA5, 2 * sizeof(uint64_t)));  // poisoned
  policy_kernel<<<1, 1>>>(d);
  CUDA_OK(cudaGetLastError());
  uint64_t h[2] = {0, 0};
  CUDA_OK(cudaMemcpy(h, d, sizeof h, cudaMemcpyDeviceToHost));
  cudaFree(d);
  EXPECT_EQ(h[0], h[1]) << std::hex << "createpolicy gives 0x" << h[0] << ", the kernel uses 0x" << h[1];
}

TEST(DeviceBits, PairDecodeOnTheDeviceMatchesTheHost) {
  SKIP_WITHOUT_GPU();
  const int n = 1 << 16;
  std::mt19937 rng(std::random_device{}());
  std::vector<uint32_t> w(n);
  for (auto& v : w) v = rng();
  w[0] = 0;
  w[1] = 0xFFFFFFFFu;
  uint32_t *dw = nullptr, *dout = nullptr;
  CUDA_OK(cudaMalloc(&dw, n * sizeof(uint32_t)));
  CUDA_OK(cudaMalloc(&dout, 4 * n * sizeof(uint32_t)));
  CUDA_OK(cudaMemcpy(dw, w.data(), n * sizeof(uint32_t), cudaMemcpyHostToDevice));
  CUDA_OK(cudaMemset(dout, 0xA5, 4 * n * sizeof(uint32_t)));
  unpack_kernel<<<n / 256, 256>>>(dw, dout, n);
  CUDA_OK(cudaGetLastError());
  std::vector<uint32_t> out(4 * size_t(n));
  CUDA_OK(cudaMemcpy(out.data(), dout, out.size() * sizeof(uint32_t), cudaMemcpyDeviceToHost));
  cudaFree(dw);
  cudaFree(dout);
  int bad = 0;
  for (int i = 0; i < n && bad < 10; ++i)
    for (int p = 0; p < 4; ++p)
      if (out[4 * size_t(i) + p] != unpack_pair(w[i], p)) {
        ADD_FAILURE() << "word 0x" << std::hex << w[i] << " pair " << p << ": device 0x" << out[4 * size_t(i) + p]
                      << ", host 0x" << unpack_pair(w[i], p);
        ++bad;
      }
}

}  // namespace
}  // namespace fp4moe
