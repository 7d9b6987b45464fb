// Checked CUDA calls: every runtime call and launch in the library goes through these.
#pragma once
#include <cuda_runtime_api.h>

#include "fp4moe/error.h"

#define FP4MOE_CUDA_CHECK(expr)                                                          \
  do {                                                                                   \
    cudaError_t fp4moe_err_ = (expr);                                                    \
    FP4MOE_CHECK(fp4moe_err_ == cudaSuccess,                                             \
                 "CUDA call `" #expr "` failed: " << cudaGetErrorName(fp4moe_err_) << ": " \
                                                  << cudaGetErrorString(fp4moe_err_));   \
  } while (0)
