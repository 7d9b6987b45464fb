// Enumerations shared by every part of the library, with their names for printing and parsing.
#pragma once
#include <cstdint>
#include <string>
#include <string_view>

namespace fp4moe {

// FP4 weight format (SPEC "FP4 formats").
enum class Format : uint8_t {
  nvfp4,  // E2M1, one E4M3 scale per 16 elements along K, one FP32 per-tensor scale
  mxfp4,  // E2M1, one E8M0 scale per 32 elements along K
};

// Direction of an NVFP4 per-tensor (global) scale.
//  decode: value = e2m1 * block_scale * g        (ModelOpt weight_scale_2 = amax / (6 * 448))
//  encode: value = e2m1 * block_scale / g        (FlashInfer / TRT-LLM / compressed-tensors: 448 * 6 / amax)
enum class ScaleDirection : uint8_t { decode, encode };

// Layout of a block-scale matrix [rows, K / block].
enum class ScaleLayout : uint8_t {
  linear,          // row-major [rows, K / block]
  swizzled_128x4,  // TRT-LLM / FlashInfer: rows padded to 128, columns to 4 (SPEC)
};

enum class RoutingMethod : uint8_t {
  softmax_topk,  // Mixtral, Qwen3: softmax over E, top-k, optional renormalize
  topk_softmax,  // gpt-oss: (logits + bias) -> top-k -> softmax over the k
  deepseek_v3,   // DeepSeek-V3/R1, Kimi-K2, GLM-4.5: grouped sigmoid routing
  llama4,        // top-1 of logits, weight sigmoid(logit) applied to the input
  sigmoid_topk,  // sigmoid then top-k, optional renormalize
  precomputed,   // caller passes topk_ids / topk_weights
};

enum class Activation : uint8_t {
  swiglu,      // silu(gate) * up
  swiglu_oai,  // gpt-oss clamped swiglu: (clamp(up) + 1) * g * sigmoid(alpha * g)
  relu2,       // relu(h)^2, non-gated (W13 has I rows)
  geglu_tanh,  // gelu_tanh(gate) * up
};

enum class InputMode : uint8_t {
  w4a16,  // activations stay bf16
  w4a4,   // activations quantized to NVFP4 with the checkpoint's input_scale, then dequantized
};

// Element type of router logits.
enum class DType : uint8_t { f32, bf16 };

inline bool is_gated(Activation a) { return a != Activation::relu2; }
inline int block_size(Format f) { return f == Format::nvfp4 ? 16 : 32; }

std::string_view to_string(Format);
std::string_view to_string(ScaleDirection);
std::string_view to_string(ScaleLayout);
std::string_view to_string(RoutingMethod);
std::string_view to_string(Activation);
std::string_view to_string(InputMode);
std::string_view to_string(DType);

// Parsing from the names above; throws fp4moe::Error listing the accepted names.
Format parse_format(std::string_view);
RoutingMethod parse_routing(std::string_view);
Activation parse_activation(std::string_view);
InputMode parse_input_mode(std::string_view);
DType parse_dtype(std::string_view);

}  // namespace fp4moe
