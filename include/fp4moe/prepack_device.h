// Prepack on the GPU: checkpoint-layout tensors already in device memory (what an engine loads
// straight from safetensors) converted into DeviceWeights by kernels on a stream, with the host
// prepack's validation and errors and bitwise the same bytes (api/pack_tile.h is shared). Extra
// device memory beyond the result: a few bytes per expert (descriptors and scale statistics).
//
// Accepted layouts, per local expert (pointers may point into stacked [E, ...] tensors or at
// per-expert tensors alike):
//  - NVFP4 (ModelOpt weight / weight_scale / weight_scale_2, compressed-tensors weight_packed /
//    weight_scale / weight_global_scale): data uint8 [rows, cols / 2], E4M3 scales linear
//    [rows, cols / 16] or the swizzled_128x4 stream, global scales in either direction;
//  - MXFP4 (gpt-oss *_blocks / *_scales): data uint8 [rows, cols / 2], E8M0 scales [rows, cols / 32];
//  - gate and up as two tensors, or fused into one [2I, H] tensor, concatenated (gate rows then up
//    rows, transformers' gate_up_proj) or interleaved (even rows gate, odd rows up: gpt-oss).
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "fp4moe/moe.h"

namespace fp4moe {

enum class GateUpLayout : uint8_t {
  separate,      // gate [I, H] and up [I, H]
  concatenated,  // gate_up [2I, H]: rows 0..I-1 gate, I..2I-1 up
  interleaved,   // gate_up [2I, H]: row 2i gate i, row 2i + 1 up i (gpt-oss)
};

// One FP4 projection of every local expert, in device memory.
struct DeviceFp4Matrix {
  std::vector<const void*> data;    // per local expert: uint8 [rows, cols / 2], row-major, 8-byte aligned
  std::vector<const void*> scales;  // per local expert: linear [rows, cols / block] or swizzled_128x4
  std::vector<float> global_scale;  // NVFP4: per local expert, host value in `direction`; empty for MXFP4
};

// One bias of every local expert, in device memory: [rows] of `dtype` per expert.
struct DeviceBias {
  std::vector<const void*> data;
  DType dtype = DType::f32;
};

struct DeviceCheckpointLayer {
  ScaleLayout scale_layout = ScaleLayout::linear;  // swizzled_128x4: NVFP4 only
  ScaleDirection direction = ScaleDirection::decode;
  GateUpLayout gate_up_layout = GateUpLayout::separate;
  DeviceFp4Matrix gate, up;  // separate: [I, H] each; gate empty for the non-gated relu2
  DeviceFp4Matrix gate_up;   // concatenated / interleaved: [2I, H], one global scale per expert
  DeviceFp4Matrix down;      // [H, I]
  DeviceBias gate_bias, up_bias, gate_up_bias, down_bias;  // iff problem.has_bias ([I], [I], [2I], [H])
  std::vector<float> input_scale13, input_scale2;  // W4A4: per local expert, decode direction
};

// Packs the problem's local experts on the current device. Validates everything on the host first
// (sizes, pointers, alignment, global and input scales), then checks every block scale on the device
// (NaN codes, the MXFP4 range) and throws the host prepack's error for the first bad one (expert,
// matrix, row, block). Synchronizes `stream` (to read the scale checks back and at the end): not for
// use inside a graph capture.
DeviceWeights prepack_device(const MoeProblem& p, const DeviceCheckpointLayer& w, cudaStream_t stream = nullptr);

}  // namespace fp4moe
