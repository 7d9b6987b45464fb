// libFuzzer target for the safetensors reader: any input must either parse into tensors whose byte
// ranges lie inside the input, or throw fp4moe::Error. Any other exception, crash or out-of-bounds
// read (AddressSanitizer) is a bug.
#include <cstdint>
#include <span>
#include <string>

#include "checkpoint/safetensors.h"
#include "fp4moe/error.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  // The input is copied so AddressSanitizer sees its exact extent (libFuzzer's buffer is already
  // exact, but the copy keeps the target correct under other drivers too).
  const std::vector<uint8_t> bytes(data, data + size);
  try {
    const auto f = fp4moe::st::File::parse(bytes, "fuzz-input.safetensors");
    volatile uint8_t sink = 0;
    for (const auto& t : f.tensors()) {
      for (uint8_t b : f.bytes(t)) sink = sink ^ b;
      if (t.dtype == fp4moe::st::Dtype::f32 || t.dtype == fp4moe::st::Dtype::bf16 ||
          t.dtype == fp4moe::st::Dtype::f16 || t.dtype == fp4moe::st::Dtype::f64) {
        const auto v = fp4moe::st::to_float(f, t);
        if (static_cast<int64_t>(v.size()) != t.numel()) __builtin_trap();
      }
      if (f.find(t.name) == nullptr) __builtin_trap();
    }
  } catch (const fp4moe::Error&) {
  }
  // The same bytes as a sharded index file.
  try {
    const std::string_view text(reinterpret_cast<const char*>(bytes.data()), bytes.size());
    for (const auto& [tensor, shard] : fp4moe::st::parse_index(text, "fuzz-input.index.json")) {
      if (shard.empty() || shard.find('/') != std::string::npos) __builtin_trap();
    }
  } catch (const fp4moe::Error&) {
  }
  return 0;
}
