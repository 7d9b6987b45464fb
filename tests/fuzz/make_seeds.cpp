// Writes a seed corpus for fuzz_safetensors into the directory given as argv[1]: small valid
// safetensors files of every dtype, scalars, empty tensors, metadata, and an index file.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "checkpoint/safetensors.h"

namespace st = fp4moe::st;

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CORPUS_DIR\n", argv[0]);
    return 2;
  }
  const std::filesystem::path dir(argv[1]);
  std::filesystem::create_directories(dir);
  auto bytes = [](size_t n, uint8_t seed) {
    std::vector<uint8_t> b(n);
    for (size_t i = 0; i < n; ++i) b[i] = static_cast<uint8_t>(seed + 37 * i);
    return b;
  };
  std::vector<std::vector<st::TensorToWrite>> seeds;
  seeds.push_back({{"a", st::Dtype::f32, {2, 3}, bytes(24, 1)},
                   {"b", st::Dtype::bf16, {3}, bytes(6, 2)},
                   {"c", st::Dtype::f16, {1, 2}, bytes(4, 3)}});
  seeds.push_back({{"model.layers.0.mlp.experts.0.up_proj.weight", st::Dtype::u8, {4, 8}, bytes(32, 4)},
                   {"model.layers.0.mlp.experts.0.up_proj.weight_scale", st::Dtype::f8_e4m3, {4, 1},
                    bytes(4, 5)},
                   {"model.layers.0.mlp.experts.0.up_proj.weight_scale_2", st::Dtype::f32, {},
                    bytes(4, 6)}});
  seeds.push_back({{"empty", st::Dtype::i64, {0, 5}, {}}, {"s", st::Dtype::f64, {}, bytes(8, 7)}});
  seeds.push_back({});
  int n = 0;
  for (const auto& s : seeds) {
    const auto image = st::serialize(s, n == 0 ? std::map<std::string, std::string>{{"format", "pt"}}
                                               : std::map<std::string, std::string>{});
    std::ofstream(dir / ("seed" + std::to_string(n++) + ".safetensors"), std::ios::binary)
        .write(reinterpret_cast<const char*>(image.data()), static_cast<std::streamsize>(image.size()));
  }
  std::ofstream(dir / "index.json")
      << R"({"metadata": {"total_size": 64}, "weight_map": {"a": "model-00001-of-00002.safetensors",)"
         R"( "b": "model-00002-of-00002.safetensors"}})";
  return 0;
}
