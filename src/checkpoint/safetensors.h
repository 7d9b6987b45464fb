// safetensors files: a memory-mapped reader that trusts nothing in the file, a multi-file view of a
// checkpoint directory (single file or sharded through model.safetensors.index.json), and a small
// writer used by the tests and the fuzzer's seed corpus.
//
// File layout: 8-byte little-endian header length N, N bytes of JSON
//   {"name": {"dtype": "BF16", "shape": [..], "data_offsets": [begin, end]}, ..., "__metadata__": {..}}
// then the data section; offsets are relative to the data section. Every check below is done when a
// file is opened, so a File that exists only hands out byte ranges inside its data section.
//
// This component depends on nothing in the library but fp4moe/error.h (the fuzzer builds it alone).
#pragma once
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace fp4moe::st {

enum class Dtype : uint8_t {
  boolean, u8, i8, f8_e4m3, f8_e5m2, f8_e8m0, i16, u16, f16, bf16, i32, u32, f32, i64, u64, f64,
};
std::string_view dtype_name(Dtype);  // the file's spelling: "BOOL", "U8", "F8_E4M3", ...
size_t dtype_size(Dtype);            // bytes per element

// Largest header accepted (the reference implementation's limit): anything larger is not a real
// checkpoint and would only cost memory to parse.
inline constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// Deepest JSON nesting accepted in a header (real headers nest 3 deep).
inline constexpr int kMaxJsonDepth = 32;

struct TensorInfo {
  std::string name;
  Dtype dtype = Dtype::u8;
  std::vector<int64_t> shape;  // empty for a scalar
  uint64_t begin = 0;          // byte range [begin, end) in the data section
  uint64_t end = 0;

  int64_t numel() const;
  std::string shape_string() const;  // "[2, 3]"
};

// One parsed safetensors file. Copies share the mapping.
class File {
 public:
  // Memory-maps `path` read-only and validates it.
  static File open(const std::string& path);
  // Validates an in-memory image; `bytes` must outlive the File and its copies. `name` stands for the
  // file in error messages.
  static File parse(std::span<const uint8_t> bytes, std::string name);

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }  // in data-offset order
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  const TensorInfo* find(std::string_view name) const;
  const TensorInfo& at(std::string_view name) const;  // throws naming the file and the tensor
  std::span<const uint8_t> bytes(const TensorInfo& t) const;

 private:
  std::shared_ptr<const void> keep_;  // the mapping, when the file owns one
  std::span<const uint8_t> data_;     // the data section
  std::string path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
  std::map<std::string, std::string> metadata_;
};

// Elements of a floating-point tensor (F32, F16, BF16, F64) as fp32; throws naming the file and
// tensor for any other dtype.
std::vector<float> to_float(const File& f, const TensorInfo& t);

// A checkpoint directory: model.safetensors.index.json (sharded), else model.safetensors, else every
// *.safetensors in the directory (a tensor name may appear in only one of them).
class Checkpoint {
 public:
  static Checkpoint open(const std::string& dir);

  struct Ref {
    const File* file = nullptr;
    const TensorInfo* info = nullptr;
    explicit operator bool() const { return info != nullptr; }
  };

  const std::string& dir() const { return dir_; }
  const std::vector<File>& files() const { return *files_; }
  std::vector<std::string> names() const;  // sorted
  Ref find(std::string_view name) const;   // {} when absent
  Ref at(std::string_view name) const;     // throws naming the directory and the tensor
  bool sharded() const { return sharded_; }

 private:
  std::string dir_;
  bool sharded_ = false;
  std::shared_ptr<std::vector<File>> files_;  // stable addresses for Ref
  std::map<std::string, std::pair<size_t, const TensorInfo*>, std::less<>> map_;
};

// Parses the weight_map of an index file: tensor name -> shard file name. Shard names must be plain
// file names (no directories, no ".."), so an index cannot point outside its directory.
std::map<std::string, std::string> parse_index(std::string_view json, const std::string& name);

// Throws naming `name` when `text` nests JSON arrays / objects deeper than kMaxJsonDepth, so that
// no input can make a JSON parser recurse without bound. Call before parsing untrusted JSON.
void check_json_depth(std::string_view text, const std::string& name);

// Reads a small JSON file (config.json, hf_quant_config.json, the index) with the same hostility
// checks as headers; throws naming the file.
std::string read_text_file(const std::string& path, uint64_t max_bytes = kMaxHeaderBytes);

// ---- writer --------------------------------------------------------------------------------------
struct TensorToWrite {
  std::string name;
  Dtype dtype = Dtype::u8;
  std::vector<int64_t> shape;
  std::vector<uint8_t> bytes;  // numel * dtype_size bytes, little-endian
};
// Serializes tensors in the given order (header padded with spaces to a multiple of 8 bytes).
std::vector<uint8_t> serialize(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata = {});
void write_file(const std::string& path, const std::vector<TensorToWrite>& tensors,
                const std::map<std::string, std::string>& metadata = {});

}  // namespace fp4moe::st
