// Test checkpoints: small MoE checkpoints written exactly as their producers store them (tensor
// names, dtypes, shapes, config.json, hf_quant_config.json), in a temporary directory.
#pragma once
#include <cstdint>
#include <string>

namespace fp4moe::test {

// A fresh directory under the system temporary directory, removed with its contents on destruction.
class TempDir {
 public:
  TempDir();
  ~TempDir();
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

}  // namespace fp4moe::test
