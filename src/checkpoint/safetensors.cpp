#include "checkpoint/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>

#include "fp4moe/error.h"

namespace fp4moe::st {

void check_json_depth(std::string_view text, const std::string& name) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '{' || c == '[') {
      FP4MOE_CHECK(++depth <= kMaxJsonDepth,
                   name << ": JSON nests deeper than " << kMaxJsonDepth
                        << " levels; this is not a safetensors header or checkpoint config");
    } else if (c == '}' || c == ']') {
      --depth;
    }
  }
}

namespace {

using json = nlohmann::json;

struct DtypeEntry {
  Dtype dtype;
  std::string_view name;
  size_t size;
};
constexpr std::array<DtypeEntry, 16> kDtypes{{
    {Dtype::boolean, "BOOL", 1}, {Dtype::u8, "U8", 1},          {Dtype::i8, "I8", 1},
    {Dtype::f8_e4m3, "F8_E4M3", 1}, {Dtype::f8_e5m2, "F8_E5M2", 1}, {Dtype::f8_e8m0, "F8_E8M0", 1},
    {Dtype::i16, "I16", 2},      {Dtype::u16, "U16", 2},        {Dtype::f16, "F16", 2},
    {Dtype::bf16, "BF16", 2},    {Dtype::i32, "I32", 4},        {Dtype::u32, "U32", 4},
    {Dtype::f32, "F32", 4},      {Dtype::i64, "I64", 8},        {Dtype::u64, "U64", 8},
    {Dtype::f64, "F64", 8},
}};

std::string supported_dtypes() {
  std::string s;
  for (const auto& d : kDtypes) s += (s.empty() ? "" : ", ") + std::string(d.name);
  return s;
}

// Printable excerpt of an untrusted string for error messages.
std::string excerpt(std::string_view s) {
  std::string out;
  for (char c : s.substr(0, 64)) out += (c >= 0x20 && c < 0x7f) ? c : '?';
  if (s.size() > 64) out += "...";
  return out;
}

json parse_json(std::string_view text, const std::string& name, const char* what) {
  check_json_depth(text, name);
  try {
    return json::parse(text.begin(), text.end());
  } catch (const json::exception& e) {
    FP4MOE_FAIL(name << ": the " << what << " is not valid JSON (" << e.what()
                     << "); the file is damaged or not what its name says");
  }
}

uint64_t read_u64_le(const uint8_t* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// Integer JSON value in [0, max]; anything else (negative, fraction, string) is rejected.
uint64_t json_uint(const json& v, uint64_t max, const std::string& file, const std::string& tensor,
                   const char* field) {
  FP4MOE_CHECK(v.is_number_unsigned() || (v.is_number_integer() && v.get<int64_t>() >= 0),
               file << ": tensor '" << excerpt(tensor) << "': " << field
                    << " must hold non-negative integers, found " << excerpt(v.dump()));
  const uint64_t u = v.get<uint64_t>();
  FP4MOE_CHECK(u <= max, file << ": tensor '" << excerpt(tensor) << "': " << field << " value " << u
                              << " is out of range (at most " << max << ")");
  return u;
}

struct Mapping {
  void* addr = MAP_FAILED;
  size_t size = 0;
  ~Mapping() {
    if (addr != MAP_FAILED) munmap(addr, size);
  }
};

uint16_t load_u16(const uint8_t* p) { return static_cast<uint16_t>(p[0] | (p[1] << 8)); }

float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1f;
  const uint32_t man = h & 0x3ff;
  float v;
  if (exp == 0) {
    v = std::ldexp(static_cast<float>(man), -24);
  } else if (exp == 31) {
    v = man ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::ldexp(static_cast<float>(man | 0x400), static_cast<int>(exp) - 25);
  }
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits |= sign;
  std::memcpy(&v, &bits, 4);
  return v;
}

}  // namespace

std::string_view dtype_name(Dtype d) {
  for (const auto& e : kDtypes)
    if (e.dtype == d) return e.name;
  return "?";
}

size_t dtype_size(Dtype d) {
  for (const auto& e : kDtypes)
    if (e.dtype == d) return e.size;
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;  // validated not to overflow when the file was opened
  return n;
}

std::string TensorInfo::shape_string() const {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

File File::parse(std::span<const uint8_t> bytes, std::string name) {
  File f;
  f.path_ = std::move(name);
  const std::string& file = f.path_;
  FP4MOE_CHECK(bytes.size() >= 8, file << ": " << bytes.size()
                                       << " bytes is too short for a safetensors file (the 8-byte "
                                          "header length alone is missing); the file is truncated");
  const uint64_t header_len = read_u64_le(bytes.data());
  FP4MOE_CHECK(header_len <= kMaxHeaderBytes,
               file << ": header length " << header_len << " exceeds the " << kMaxHeaderBytes
                    << "-byte limit; the file is damaged or not a safetensors file");
  FP4MOE_CHECK(header_len <= bytes.size() - 8,
               file << ": header length " << header_len << " runs past the end of the file ("
                    << bytes.size() << " bytes); the file is truncated or not a safetensors file");
  const std::string_view text(reinterpret_cast<const char*>(bytes.data() + 8), header_len);
  const json header = parse_json(text, file, "header");
  FP4MOE_CHECK(header.is_object(), file << ": the header must be a JSON object, found a "
                                        << header.type_name());
  f.data_ = bytes.subspan(8 + header_len);
  const uint64_t data_size = f.data_.size();

  for (const auto& [key, value] : header.items()) {
    if (key == "__metadata__") {
      FP4MOE_CHECK(value.is_object(), file << ": __metadata__ must be an object of strings");
      for (const auto& [mk, mv] : value.items()) {
        FP4MOE_CHECK(mv.is_string(), file << ": __metadata__ entry '" << excerpt(mk)
                                          << "' must be a string");
        f.metadata_[mk] = mv.get<std::string>();
      }
      continue;
    }
    FP4MOE_CHECK(value.is_object(), file << ": tensor '" << excerpt(key)
                                         << "': entry must be an object with dtype, shape and "
                                            "data_offsets");
    TensorInfo t;
    t.name = key;
    const auto dt = value.find("dtype");
    FP4MOE_CHECK(dt != value.end() && dt->is_string(),
                 file << ": tensor '" << excerpt(key) << "': missing or non-string dtype");
    const std::string dname = dt->get<std::string>();
    const auto entry = std::find_if(kDtypes.begin(), kDtypes.end(),
                                    [&](const DtypeEntry& e) { return e.name == dname; });
    FP4MOE_CHECK(entry != kDtypes.end(), file << ": tensor '" << excerpt(key) << "': unknown dtype '"
                                              << excerpt(dname) << "' (supported: "
                                              << supported_dtypes() << ")");
    t.dtype = entry->dtype;

    const auto sh = value.find("shape");
    FP4MOE_CHECK(sh != value.end() && sh->is_array(),
                 file << ": tensor '" << excerpt(key) << "': missing or non-array shape");
    FP4MOE_CHECK(sh->size() <= 16, file << ": tensor '" << excerpt(key) << "': rank " << sh->size()
                                        << " is implausible (at most 16 dimensions)");
    uint64_t numel = 1;
    bool overflow = false;
    for (const auto& d : *sh) {
      const uint64_t dim = json_uint(d, uint64_t{1} << 62, file, key, "shape");
      t.shape.push_back(static_cast<int64_t>(dim));
      overflow = overflow || __builtin_mul_overflow(numel, dim, &numel);
    }
    uint64_t nbytes = 0;
    overflow = overflow || __builtin_mul_overflow(numel, entry->size, &nbytes) ||
               nbytes > (uint64_t{1} << 62);
    FP4MOE_CHECK(!overflow, file << ": tensor '" << excerpt(key) << "': shape " << t.shape_string()
                                 << " holds more bytes than any file can");

    const auto off = value.find("data_offsets");
    FP4MOE_CHECK(off != value.end() && off->is_array() && off->size() == 2,
                 file << ": tensor '" << excerpt(key) << "': data_offsets must be [begin, end]");
    t.begin = json_uint((*off)[0], uint64_t{1} << 62, file, key, "data_offsets");
    t.end = json_uint((*off)[1], uint64_t{1} << 62, file, key, "data_offsets");
    FP4MOE_CHECK(t.begin <= t.end, file << ": tensor '" << excerpt(key) << "': data_offsets ["
                                        << t.begin << ", " << t.end << "] end before they begin");
    FP4MOE_CHECK(t.end - t.begin == nbytes,
                 file << ": tensor '" << excerpt(key) << "': shape " << t.shape_string() << " of "
                      << dname << " needs " << nbytes << " bytes but data_offsets [" << t.begin
                      << ", " << t.end << "] hold " << (t.end - t.begin));
    FP4MOE_CHECK(t.end <= data_size,
                 file << ": tensor '" << excerpt(key) << "': data_offsets [" << t.begin << ", "
                      << t.end << "] run past the end of the data section (" << data_size
                      << " bytes); the file is truncated");
    f.tensors_.push_back(std::move(t));
  }

  std::sort(f.tensors_.begin(), f.tensors_.end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  // The format requires the data section to be covered exactly once: no overlaps, no holes.
  uint64_t pos = 0;
  for (size_t i = 0; i < f.tensors_.size(); ++i) {
    const TensorInfo& t = f.tensors_[i];
    FP4MOE_CHECK(t.begin >= pos, file << ": tensor '" << excerpt(t.name) << "' (bytes [" << t.begin
                                      << ", " << t.end << ")) overlaps tensor '"
                                      << excerpt(f.tensors_[i - 1].name) << "' (ends at " << pos
                                      << "); the header is damaged");
    FP4MOE_CHECK(t.begin == pos, file << ": bytes [" << pos << ", " << t.begin
                                      << ") before tensor '" << excerpt(t.name)
                                      << "' belong to no tensor; the header is damaged");
    pos = t.end;
    f.index_.emplace(t.name, i);
  }
  FP4MOE_CHECK(pos == data_size, file << ": the data section has " << data_size
                                      << " bytes but the tensors cover only " << pos
                                      << "; the header does not match the data");
  return f;
}

namespace {

const char* file_kind(mode_t m) {
  if (S_ISDIR(m)) return "a directory";
  if (S_ISFIFO(m)) return "a FIFO (named pipe)";
  if (S_ISCHR(m)) return "a character device";
  if (S_ISBLK(m)) return "a block device";
  if (S_ISSOCK(m)) return "a socket";
  return "not a regular file";
}

// Opens `path` read-only and returns the descriptor and its size; only regular files are accepted.
// NOTES: O_NONBLOCK so that opening a FIFO returns at once instead of waiting for a writer; the
// type is then checked on the open descriptor (no window between a stat and the open).
int open_regular(const std::string& path, uint64_t* size) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  FP4MOE_CHECK(fd >= 0, path << ": cannot open (" << std::strerror(errno) << ")");
  struct stat sb {};
  const bool stat_ok = fstat(fd, &sb) == 0;
  if (!stat_ok || !S_ISREG(sb.st_mode)) {
    ::close(fd);
    FP4MOE_FAIL(path << ": is " << (stat_ok ? file_kind(sb.st_mode) : "not a regular file")
                     << "; checkpoint files must be regular files");
  }
  *size = static_cast<uint64_t>(sb.st_size);
  return fd;
}

}  // namespace

File File::open(const std::string& path) {
  uint64_t file_size = 0;
  const int fd = open_regular(path, &file_size);
  auto map = std::make_shared<Mapping>();
  map->size = static_cast<size_t>(file_size);
  if (map->size > 0) {
    map->addr = mmap(nullptr, map->size, PROT_READ, MAP_PRIVATE, fd, 0);
  }
  const int mmap_errno = errno;
  ::close(fd);
  FP4MOE_CHECK(map->size == 0 || map->addr != MAP_FAILED,
               path << ": cannot memory-map (" << std::strerror(mmap_errno) << ")");
  const std::span<const uint8_t> bytes(
      map->size ? static_cast<const uint8_t*>(map->addr) : nullptr, map->size);
  File f = parse(bytes, path);
  f.keep_ = std::move(map);
  return f;
}

const TensorInfo* File::find(std::string_view name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo& File::at(std::string_view name) const {
  const TensorInfo* t = find(name);
  FP4MOE_CHECK(t, path_ << ": no tensor named '" << name << "'");
  return *t;
}

std::span<const uint8_t> File::bytes(const TensorInfo& t) const {
  return data_.subspan(t.begin, t.end - t.begin);
}

std::vector<float> to_float(const File& f, const TensorInfo& t) {
  const auto b = f.bytes(t);
  const size_t n = static_cast<size_t>(t.numel());
  std::vector<float> out(n);
  switch (t.dtype) {
    case Dtype::f32:
      if (n) std::memcpy(out.data(), b.data(), n * 4);
      break;
    case Dtype::f64:
      for (size_t i = 0; i < n; ++i) {
        double d;
        std::memcpy(&d, b.data() + 8 * i, 8);
        out[i] = static_cast<float>(d);
      }
      break;
    case Dtype::bf16:
      for (size_t i = 0; i < n; ++i) {
        const uint32_t bits = uint32_t{load_u16(b.data() + 2 * i)} << 16;
        std::memcpy(&out[i], &bits, 4);
      }
      break;
    case Dtype::f16:
      for (size_t i = 0; i < n; ++i) out[i] = half_to_float(load_u16(b.data() + 2 * i));
      break;
    default:
      FP4MOE_FAIL(f.path() << ": tensor '" << t.name << "' has dtype " << dtype_name(t.dtype)
                           << " where a floating-point tensor (F32, F16, BF16, F64) is expected");
  }
  return out;
}

std::string read_text_file(const std::string& path, uint64_t max_bytes) {
  uint64_t size = 0;
  const int fd = open_regular(path, &size);
  if (size > max_bytes) {
    ::close(fd);
    FP4MOE_FAIL(path << ": " << size << " bytes is larger than the " << max_bytes
                     << "-byte limit for a JSON file of a checkpoint");
  }
  // Reads at most the size fstat gave (a file growing meanwhile is cut there, one shrinking is a
  // short read).
  std::string s(static_cast<size_t>(size), '\0');
  size_t got = 0;
  while (got < s.size()) {
    const ssize_t n = ::read(fd, s.data() + got, s.size() - got);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    got += static_cast<size_t>(n);
  }
  ::close(fd);
  FP4MOE_CHECK(got == s.size(), path << ": short read (" << got << " of " << size << " bytes)");
  return s;
}

std::map<std::string, std::string> parse_index(std::string_view text, const std::string& name) {
  const json j = parse_json(text, name, "index");
  FP4MOE_CHECK(j.is_object(), name << ": the index must be a JSON object");
  const auto wm = j.find("weight_map");
  FP4MOE_CHECK(wm != j.end() && wm->is_object(),
               name << ": the index has no \"weight_map\" object (tensor name -> shard file)");
  std::map<std::string, std::string> out;
  for (const auto& [tensor, shard] : wm->items()) {
    FP4MOE_CHECK(shard.is_string(), name << ": weight_map entry '" << excerpt(tensor)
                                         << "' must name a shard file");
    const std::string s = shard.get<std::string>();
    FP4MOE_CHECK(!s.empty() && s != "." && s != ".." && s.find('/') == std::string::npos &&
                     s.find('\\') == std::string::npos && s.find('\0') == std::string::npos,
                 name << ": weight_map entry '" << excerpt(tensor) << "' names shard '"
                      << excerpt(s) << "', which is not a plain file name in the checkpoint "
                                       "directory");
    out.emplace(tensor, s);
  }
  return out;
}

Checkpoint Checkpoint::open(const std::string& dir) {
  namespace fs = std::filesystem;
  Checkpoint c;
  c.dir_ = dir;
  c.files_ = std::make_shared<std::vector<File>>();
  std::error_code ec;
  FP4MOE_CHECK(fs::is_directory(dir, ec), dir << ": not a directory; pass the checkpoint directory "
                                                 "(the one holding config.json)");
  const fs::path root(dir);
  const fs::path index_path = root / "model.safetensors.index.json";
  if (fs::exists(index_path, ec)) {
    c.sharded_ = true;
    const auto map = parse_index(read_text_file(index_path.string()), index_path.string());
    std::map<std::string, size_t> shard_ids;
    for (const auto& [tensor, shard] : map) {
      if (shard_ids.count(shard)) continue;
      const fs::path p = root / shard;
      FP4MOE_CHECK(fs::exists(p, ec), index_path.string() << ": shard '" << shard << "' (holding '"
                                                          << tensor << "') is missing");
      shard_ids[shard] = c.files_->size();
      c.files_->push_back(File::open(p.string()));
    }
    for (const auto& [tensor, shard] : map) {
      const size_t id = shard_ids.at(shard);
      const TensorInfo* t = (*c.files_)[id].find(tensor);
      FP4MOE_CHECK(t, index_path.string() << ": places tensor '" << tensor << "' in shard '" << shard
                                          << "', which does not contain it");
      c.map_.emplace(tensor, std::make_pair(id, t));
    }
    return c;
  }
  std::vector<fs::path> paths;
  if (fs::exists(root / "model.safetensors", ec)) {
    paths.push_back(root / "model.safetensors");
  } else {
    for (const auto& e : fs::directory_iterator(root, ec))
      if (e.path().extension() == ".safetensors") paths.push_back(e.path());
    std::sort(paths.begin(), paths.end());
  }
  FP4MOE_CHECK(!paths.empty(), dir << ": no model.safetensors.index.json, model.safetensors or "
                                      "*.safetensors file found");
  for (const auto& p : paths) {
    c.files_->push_back(File::open(p.string()));
    const size_t id = c.files_->size() - 1;
    for (const auto& t : c.files_->back().tensors()) {
      const auto [it, fresh] = c.map_.emplace(t.name, std::make_pair(id, &t));
      FP4MOE_CHECK(fresh, dir << ": tensor '" << t.name << "' appears in both "
                              << (*c.files_)[it->second.first].path() << " and " << p.string()
                              << "; add a model.safetensors.index.json to say which one counts");
    }
  }
  return c;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(map_.size());
  for (const auto& [name, ref] : map_) out.push_back(name);
  return out;
}

Checkpoint::Ref Checkpoint::find(std::string_view name) const {
  const auto it = map_.find(name);
  if (it == map_.end()) return {};
  return {&(*files_)[it->second.first], it->second.second};
}

Checkpoint::Ref Checkpoint::at(std::string_view name) const {
  const Ref r = find(name);
  FP4MOE_CHECK(r, dir_ << ": the checkpoint has no tensor named '" << name << "'");
  return r;
}

std::vector<uint8_t> serialize(const std::vector<TensorToWrite>& tensors,
                               const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t pos = 0;
  for (const auto& t : tensors) {
    uint64_t numel = 1;
    for (int64_t d : t.shape) numel *= static_cast<uint64_t>(d);
    FP4MOE_CHECK(numel * dtype_size(t.dtype) == t.bytes.size(),
                 "safetensors writer: tensor '" << t.name << "' has " << t.bytes.size()
                                                << " bytes for " << numel << " elements of "
                                                << dtype_name(t.dtype));
    header[t.name] = {{"dtype", dtype_name(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {pos, pos + t.bytes.size()}}};
    pos += t.bytes.size();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::vector<uint8_t> out(8 + text.size());
  for (int i = 0; i < 8; ++i) out[i] = static_cast<uint8_t>(uint64_t{text.size()} >> (8 * i));
  std::memcpy(out.data() + 8, text.data(), text.size());
  out.reserve(out.size() + pos);
  for (const auto& t : tensors) out.insert(out.end(), t.bytes.begin(), t.bytes.end());
  return out;
}

void write_file(const std::string& path, const std::vector<TensorToWrite>& tensors,
                const std::map<std::string, std::string>& metadata) {
  const auto bytes = serialize(tensors, metadata);
  std::ofstream out(path, std::ios::binary);
  FP4MOE_CHECK(out, path << ": cannot create");
  out.write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  FP4MOE_CHECK(out, path << ": write failed");
}

}  // namespace fp4moe::st
