// The safetensors reader against valid files and every kind of damage: each damaged file must give an
// fp4moe::Error whose message names the file (and the tensor where one is involved).
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <optional>
#include <random>
#include <string>

#include "checkpoint/safetensors.h"
#include "cpu/checkpoint_writer.h"
#include "fp4moe/error.h"

namespace st = fp4moe::st;
using fp4moe::test::TempDir;

namespace {

std::vector<uint8_t> random_bytes(size_t n, std::mt19937& rng) {
  std::vector<uint8_t> b(n);
  for (auto& x : b) x = static_cast<uint8_t>(rng());
  return b;
}

// A file image from a raw header text and data bytes (length prefix computed unless given).
std::vector<uint8_t> image(const std::string& header, const std::vector<uint8_t>& data,
                           std::optional<uint64_t> header_len = {}) {
  const uint64_t n = header_len.value_or(header.size());
  std::vector<uint8_t> out;
  out.reserve(8 + header.size() + data.size());
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<uint8_t>(n >> (8 * i)));
  for (char c : header) out.push_back(static_cast<uint8_t>(c));
  out.insert(out.end(), data.begin(), data.end());
  return out;
}

std::string write(const TempDir& dir, const std::string& name, const std::vector<uint8_t>& bytes) {
  const std::string path = dir.path() + "/" + name;
  std::ofstream(path, std::ios::binary)
      .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  return path;
}

// Opening `bytes` as a file must throw fp4moe::Error mentioning the file and every `needle`.
void expect_damage(const std::vector<uint8_t>& bytes, std::initializer_list<std::string> needles) {
  TempDir dir;
  const std::string path = write(dir, "damaged.safetensors", bytes);
  try {
    st::File::open(path);
    FAIL() << "no error for a damaged file; expected one mentioning " << *needles.begin();
  } catch (const fp4moe::Error& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find(path), std::string::npos) << "message does not name the file: " << msg;
    for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << "missing '" << n << "' in: " << msg;
  }
}

}  // namespace

TEST(Safetensors, RoundTripsEveryDtypeShapeAndMetadata) {
  std::mt19937 rng(std::random_device{}());
  std::vector<st::TensorToWrite> ts = {
      {"w", st::Dtype::u8, {3, 5}, random_bytes(15, rng)},
      {"scale", st::Dtype::f8_e4m3, {3, 1}, random_bytes(3, rng)},
      {"g", st::Dtype::f32, {}, random_bytes(4, rng)},
      {"b", st::Dtype::bf16, {7}, random_bytes(14, rng)},
      {"h", st::Dtype::f16, {2, 2}, random_bytes(8, rng)},
      {"empty", st::Dtype::i64, {0, 4}, {}},
      {"d", st::Dtype::f64, {1}, random_bytes(8, rng)},
  };
  TempDir dir;
  st::write_file(dir.path() + "/model.safetensors", ts, {{"format", "pt"}});
  const auto f = st::File::open(dir.path() + "/model.safetensors");
  EXPECT_EQ(f.metadata().at("format"), "pt");
  ASSERT_EQ(f.tensors().size(), ts.size());
  for (const auto& t : ts) {
    const auto& info = f.at(t.name);
    EXPECT_EQ(info.dtype, t.dtype) << t.name;
    EXPECT_EQ(info.shape, t.shape) << t.name;
    const auto b = f.bytes(info);
    ASSERT_EQ(b.size(), t.bytes.size()) << t.name;
    EXPECT_TRUE(std::equal(b.begin(), b.end(), t.bytes.begin())) << t.name;
  }
  EXPECT_EQ(f.find("missing"), nullptr);
}

TEST(Safetensors, ConvertsFloatDtypes) {
  // bf16 1.5 = 0x3FC0, -2 = 0xC000; f16 1.5 = 0x3E00, smallest subnormal 0x0001 = 2^-24, -inf 0xFC00.
  const std::vector<uint8_t> bf = {0xC0, 0x3F, 0x00, 0xC0};
  const std::vector<uint8_t> hf = {0x00, 0x3E, 0x01, 0x00, 0x00, 0xFC};
  std::vector<uint8_t> f32(8);
  const float vals[2] = {3.25f, -0.125f};
  std::memcpy(f32.data(), vals, 8);
  const auto img = st::serialize({{"bf", st::Dtype::bf16, {2}, bf},
                                  {"hf", st::Dtype::f16, {3}, hf},
                                  {"f", st::Dtype::f32, {2}, f32},
                                  {"u", st::Dtype::u8, {1}, {7}}});
  const auto f = st::File::parse(img, "mem.safetensors");
  EXPECT_EQ(st::to_float(f, f.at("bf")), (std::vector<float>{1.5f, -2.0f}));
  const auto h = st::to_float(f, f.at("hf"));
  EXPECT_EQ(h[0], 1.5f);
  EXPECT_EQ(h[1], std::ldexp(1.0f, -24));
  EXPECT_TRUE(std::isinf(h[2]) && h[2] < 0);
  EXPECT_EQ(st::to_float(f, f.at("f")), (std::vector<float>{3.25f, -0.125f}));
  try {
    st::to_float(f, f.at("u"));
    FAIL() << "U8 converted to float";
  } catch (const fp4moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("'u'"), std::string::npos) << e.what();
  }
}

TEST(Safetensors, RejectsTruncatedData) {
  auto img = st::serialize({{"a", st::Dtype::f32, {4}, std::vector<uint8_t>(16, 1)},
                            {"tail", st::Dtype::u8, {10}, std::vector<uint8_t>(10, 2)}});
  img.resize(img.size() - 3);
  expect_damage(img, {"'tail'", "truncated"});
}

TEST(Safetensors, RejectsShortFiles) {
  expect_damage({}, {"too short"});
  expect_damage({1, 2, 3}, {"too short"});
}

TEST(Safetensors, RejectsHeaderLengthPastTheFile) {
  expect_damage(image(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}})", {1}, 4096),
                {"runs past the end of the file"});
}

TEST(Safetensors, RejectsHugeHeaders) {
  expect_damage(image("{}", {}, uint64_t{1} << 40), {"exceeds"});
  expect_damage(image("{}", {}, ~uint64_t{0}), {"exceeds"});
}

TEST(Safetensors, RejectsInvalidJson) {
  expect_damage(image(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]})", {1}), {"not valid JSON"});
  expect_damage(image("\xff\xfe{}", {}), {"not valid JSON"});
}

TEST(Safetensors, RejectsNonObjectHeaders) {
  expect_damage(image("[1, 2, 3]", {}), {"must be a JSON object"});
  expect_damage(image("\"text\"", {}), {"must be a JSON object"});
  expect_damage(image(R"({"a": 5})", {}), {"'a'", "must be an object"});
}

TEST(Safetensors, RejectsDeepNesting) {
  expect_damage(image(std::string(100000, '[') + std::string(100000, ']'), {}), {"nests deeper"});
}

TEST(Safetensors, RejectsUnknownDtypes) {
  expect_damage(image(R"({"w":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}})", {1}),
                {"'w'", "unknown dtype 'F4'"});
  expect_damage(image(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,2]}})", {1, 2}), {"'w'", "dtype"});
}

TEST(Safetensors, RejectsShapeAndByteCountThatDisagree) {
  expect_damage(image(R"({"w":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})",
                      std::vector<uint8_t>(20)),
                {"'w'", "needs 24 bytes", "hold 20"});
  expect_damage(image(R"({"w":{"dtype":"F32","shape":[-2,3],"data_offsets":[0,24]}})",
                      std::vector<uint8_t>(24)),
                {"'w'", "non-negative"});
  expect_damage(image(R"({"w":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,24]}})",
                      std::vector<uint8_t>(24)),
                {"'w'", "more bytes"});
  expect_damage(image(R"({"w":{"dtype":"U8","shape":[1.5],"data_offsets":[0,1]}})", {1}), {"'w'", "shape"});
}

TEST(Safetensors, RejectsOutOfRangeOffsets) {
  expect_damage(image(R"({"w":{"dtype":"U8","shape":[8],"data_offsets":[4,12]}})", std::vector<uint8_t>(8)),
                {"'w'", "run past the end of the data section"});
  expect_damage(image(R"({"w":{"dtype":"U8","shape":[0],"data_offsets":[9,8]}})", std::vector<uint8_t>(8)),
                {"'w'", "end before they begin"});
  expect_damage(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[18446744073709551615,0]}})", {1}),
                {"'w'", "out of range"});
  expect_damage(image(R"({"w":{"dtype":"U8","shape":[1],"data_offsets":[0]}})", {1}), {"'w'", "data_offsets"});
}

TEST(Safetensors, RejectsOverlapsAndHoles) {
  expect_damage(image(R"({"a":{"dtype":"U8","shape":[6],"data_offsets":[0,6]},)"
                      R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                      std::vector<uint8_t>(8)),
                {"'b'", "overlaps tensor 'a'"});
  expect_damage(image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},)"
                      R"("b":{"dtype":"U8","shape":[4],"data_offsets":[4,8]}})",
                      std::vector<uint8_t>(8)),
                {"'b'", "belong to no tensor"});
  expect_damage(image(R"({"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}})", std::vector<uint8_t>(8)),
                {"cover only 2"});
}

TEST(Safetensors, NeverReadsPastRandomlyDamagedFiles) {
  // Random single-byte damage to a valid file: every outcome is either a valid parse whose tensors
  // lie inside the image or an fp4moe::Error (AddressSanitizer builds turn stray reads into failures).
  std::mt19937 rng(std::random_device{}());
  const auto good = st::serialize({{"model.w", st::Dtype::u8, {4, 4}, random_bytes(16, rng)},
                                   {"model.s", st::Dtype::f32, {2}, random_bytes(8, rng)}});
  for (int i = 0; i < 2000; ++i) {
    auto img = good;
    img[rng() % img.size()] = static_cast<uint8_t>(rng());
    if (rng() % 4 == 0) img.resize(rng() % img.size());
    try {
      const auto f = st::File::parse(img, "mem");
      for (const auto& t : f.tensors()) {
        const auto b = f.bytes(t);
        ASSERT_GE(b.data(), img.data());
        ASSERT_LE(b.data() + b.size(), img.data() + img.size());
      }
    } catch (const fp4moe::Error&) {
    }
  }
}

TEST(SafetensorsCheckpoint, ReadsShardsThroughTheIndex) {
  std::mt19937 rng(std::random_device{}());
  TempDir dir;
  const auto a = random_bytes(6, rng), b = random_bytes(4, rng);
  st::write_file(dir.path() + "/model-00001-of-00002.safetensors", {{"x.a", st::Dtype::u8, {6}, a}});
  st::write_file(dir.path() + "/model-00002-of-00002.safetensors", {{"x.b", st::Dtype::u8, {2, 2}, b}});
  std::ofstream(dir.path() + "/model.safetensors.index.json")
      << R"({"metadata":{"total_size":10},"weight_map":{"x.a":"model-00001-of-00002.safetensors",)"
         R"("x.b":"model-00002-of-00002.safetensors"}})";
  const auto c = st::Checkpoint::open(dir.path());
  EXPECT_TRUE(c.sharded());
  EXPECT_EQ(c.names(), (std::vector<std::string>{"x.a", "x.b"}));
  const auto rb = c.at("x.b");
  EXPECT_NE(rb.file->path().find("00002"), std::string::npos);
  EXPECT_TRUE(std::equal(b.begin(), b.end(), rb.file->bytes(*rb.info).begin()));
  EXPECT_FALSE(c.find("x.c"));
}

namespace {
void expect_checkpoint_error(const TempDir& dir, std::initializer_list<std::string> needles) {
  try {
    st::Checkpoint::open(dir.path());
    FAIL() << "no error; expected one mentioning " << *needles.begin();
  } catch (const fp4moe::Error& e) {
    for (const auto& n : needles)
      EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << "missing '" << n << "' in: " << e.what();
  }
}
}  // namespace

TEST(SafetensorsCheckpoint, RejectsBadIndexes) {
  {
    TempDir dir;
    std::ofstream(dir.path() + "/model.safetensors.index.json") << R"({"weight_map":{"x":"../etc/passwd"}})";
    expect_checkpoint_error(dir, {"index.json", "'x'", "not a plain file name"});
  }
  {
    TempDir dir;
    std::ofstream(dir.path() + "/model.safetensors.index.json") << R"({"weight_map":{"x":"gone.safetensors"}})";
    expect_checkpoint_error(dir, {"index.json", "'gone.safetensors'", "'x'", "missing"});
  }
  {
    TempDir dir;
    st::write_file(dir.path() + "/s.safetensors", {{"y", st::Dtype::u8, {1}, {1}}});
    std::ofstream(dir.path() + "/model.safetensors.index.json") << R"({"weight_map":{"x":"s.safetensors"}})";
    expect_checkpoint_error(dir, {"index.json", "'x'", "does not contain it"});
  }
  {
    TempDir dir;
    std::ofstream(dir.path() + "/model.safetensors.index.json") << R"({"weight_map":[1]})";
    expect_checkpoint_error(dir, {"index.json", "weight_map"});
  }
  {
    TempDir dir;
    std::ofstream(dir.path() + "/model.safetensors.index.json") << R"({"weight_map":{"x":)";
    expect_checkpoint_error(dir, {"index.json", "not valid JSON"});
  }
}

TEST(SafetensorsCheckpoint, RejectsAmbiguousOrMissingFiles) {
  {
    TempDir dir;
    expect_checkpoint_error(dir, {dir.path(), "no model.safetensors"});
  }
  {
    TempDir dir;
    st::write_file(dir.path() + "/a.safetensors", {{"x", st::Dtype::u8, {1}, {1}}});
    st::write_file(dir.path() + "/b.safetensors", {{"x", st::Dtype::u8, {1}, {2}}});
    expect_checkpoint_error(dir, {"'x'", "a.safetensors", "b.safetensors"});
  }
  expect_checkpoint_error(TempDir{}, {"no model.safetensors"});
  try {
    st::Checkpoint::open("/nonexistent/fp4moe/dir");
    FAIL();
  } catch (const fp4moe::Error& e) {
    EXPECT_NE(std::string(e.what()).find("not a directory"), std::string::npos);
  }
}
