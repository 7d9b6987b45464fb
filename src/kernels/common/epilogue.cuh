// Epilogue math shared by the decode and prefill kernels: the SPEC activations in fp32.
#pragma once
#include <math.h>

#include "fp4moe/types.h"

namespace fp4moe::kernels {

__device__ __forceinline__ float activation(Activation kind, float alpha, float limit, float gate, float up) {
  switch (kind) {
    case Activation::swiglu: return gate / (1.0f + expf(-gate)) * up;
    case Activation::swiglu_oai: {
      const float g = fminf(gate, limit);
      const float u = fminf(fmaxf(up, -limit), limit);
      return (u + 1.0f) * g / (1.0f + expf(-alpha * g));
    }
    case Activation::relu2: {
      const float r = fmaxf(up, 0.0f);
      return r * r;
    }
    case Activation::geglu_tanh: {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      return 0.5f * gate * (1.0f + tanhf(c * (gate + 0.044715f * gate * gate * gate))) * up;
    }
  }
  return 0.0f;
}

}  // namespace fp4moe::kernels
