// Bad input at the C++ level, one class per test: sizes that overflow, special files, claims the
// data cannot back, NaN block scales and non-finite routing inputs. Each must give an fp4moe::Error
// naming what was wrong (or, for non-finite routing, the SPEC behaviour), never a crash, a hang, a
// huge allocation or a silently finite answer.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <future>
#include <limits>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "checkpoint/safetensors.h"
#include "cpu/checkpoint_writer.h"
#include "fp4moe/c_api.h"
#include "fp4moe/checkpoint.h"
#include "fp4moe/error.h"
#include "fp4moe/formats.h"
#include "fp4moe/moe.h"
#include "fp4moe/reference.h"
#include "fp4moe/weights.h"

namespace fp4moe {
namespace {

constexpr int64_t kHuge = int64_t{1} << 62;
const float kNaN = std::numeric_limits<float>::quiet_NaN();

template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const fp4moe::Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no fp4moe::Error thrown";
  return {};
}

#define EXPECT_MENTIONS(msg, needle) \
  EXPECT_NE((msg).find(needle), std::string::npos) << "'" << (needle) << "' missing in: " << (msg)

// Runs f on another thread and fails (instead of hanging the run) when it takes longer than 20 s.
template <class F>
std::string error_within_time(F&& f) {
  auto fut = std::async(std::launch::async, [&] { return error_of(f); });
  if (fut.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
    ADD_FAILURE() << "the call did not return within 20 s (it waits on a special file)";
    std::_Exit(1);  // the blocked thread cannot be joined
  }
  return fut.get();
}

// ---- sizes -----------------------------------------------------------------------------------------

TEST(HardenSizes, SwizzleLayoutsRefuseOverflowingShapes) {
  EXPECT_MENTIONS(error_of([] { swizzled_128x4_size(1, kHuge); }), "overflows");
  EXPECT_MENTIONS(error_of([] { swizzled_128x4_size(kHuge, kHuge); }), "overflows");
  EXPECT_MENTIONS(error_of([] { swizzled_128x4_size(INT64_MAX, 1); }), "overflows");
  std::vector<uint8_t> buf(512);
  // The shape the issue reported: a huge column count with a small buffer (was a segfault).
  EXPECT_MENTIONS(error_of([&] { unswizzle_scales_128x4(buf, 1, kHuge); }), "overflows");
  EXPECT_MENTIONS(error_of([&] { unswizzle_scales_128x4(buf, 3, 8); }), "needs 1024 swizzled");
  EXPECT_MENTIONS(error_of([&] { swizzle_scales_128x4(buf, kHuge, 4); }), "overflows");
  EXPECT_MENTIONS(error_of([&] { scales_to_linear(buf, ScaleLayout::linear, kHuge, kHuge); }), "overflows");
  EXPECT_MENTIONS(error_of([] { swizzled_128x4_offset(INT64_MAX, 0, 4); }), "outside");
  EXPECT_MENTIONS(error_of([&] { unpack_nibbles(buf, SIZE_MAX); }), "unpack_nibbles needs");
  // Empty shapes are legal and give empty results.
  EXPECT_EQ(swizzled_128x4_size(0, 7), 0u);
  EXPECT_TRUE(unswizzle_scales_128x4({}, 0, 7).empty());
  EXPECT_TRUE(swizzle_scales_128x4({}, 5, 0).empty());
}

TEST(HardenSizes, QuantizedMatricesRefuseOverflowingShapes) {
  const float x[32] = {};
  EXPECT_MENTIONS(error_of([&] { quantize_nvfp4(x, kHuge, int64_t{1} << 20, 1.0f); }),
                  "overflows");
  EXPECT_MENTIONS(error_of([&] { quantize_mxfp4(x, kHuge, 64); }), "overflows");
  QuantizedMatrix m;
  m.rows = kHuge;
  m.cols = 1024;
  EXPECT_MENTIONS(error_of([&] { validate(m, "huge"); }), "overflows");
  EXPECT_MENTIONS(error_of([&] { m.element(0, 0); }), "overflows");
  EXPECT_EQ(quantize_nvfp4(nullptr, 0, 32, 1.0f).data.size(), 0u);  // empty is fine
  EXPECT_TRUE(dequantize(quantize_mxfp4(nullptr, 3, 0)).empty());
}

TEST(HardenSizes, CApiReportsOverflowAsInvalid) {
  uint8_t buf[16] = {};
  size_t n = 0;
  EXPECT_EQ(fp4moe_swizzled_128x4_size(kHuge, kHuge, &n), FP4MOE_ERROR_INVALID);
  EXPECT_NE(std::string(fp4moe_last_error()).find("overflows"), std::string::npos);
  EXPECT_EQ(fp4moe_unswizzle_scales_128x4(buf, sizeof buf, 1, kHuge, buf), FP4MOE_ERROR_INVALID);
  EXPECT_EQ(fp4moe_dequantize(FP4MOE_FORMAT_NVFP4, kHuge, kHuge / 16 * 16, buf, buf, 1.0f, nullptr),
            FP4MOE_ERROR_INVALID);
}

MoeProblem small_problem(RoutingMethod m = RoutingMethod::softmax_topk) {
  MoeProblem p;
  p.tokens = 5;
  p.hidden = 64;
  p.intermediate = 32;
  p.num_experts = 8;
  p.top_k = 2;
  p.routing.method = m;
  return p;
}

TEST(HardenSizes, ProblemRefusesSizesThatOverflow) {
  MoeProblem p = small_problem();
  p.tokens = int64_t{1} << 62;
  EXPECT_MENTIONS(error_of([&] { p.validate(); }), "tokens (T)");
  p = small_problem();
  p.hidden = (1 << 30);
  p.intermediate = (1 << 30);
  p.num_experts = 1 << 20;
  EXPECT_MENTIONS(error_of([&] { p.validate(); }), "too large for 64-bit sizes");
  p = small_problem();
  p.local_expert_offset = 1;
  p.num_local_experts = INT32_MAX;
  EXPECT_MENTIONS(error_of([&] { p.validate(); }), "local experts [1, 2147483648)");
}

TEST(HardenSizes, TooLargeForTheMachineIsRefusedBeforeAllocating) {
  MoeProblem p = small_problem();
  p.hidden = 1 << 20;
  p.intermediate = 1 << 20;
  p.num_experts = 64;
  const auto msg = error_of([&] { random_weights(p, 1); });
  EXPECT_MENTIONS(msg, "bytes");
  EXPECT_MENTIONS(msg, "host memory");
}

// ---- files -----------------------------------------------------------------------------------------

// A small valid checkpoint whose model.safetensors is then replaced by `make` (a special file).
class HardenFiles : public ::testing::Test {
 protected:
  void SetUp() override { written = test::write_test_checkpoint(dir.path(), model); }
  std::string weights() const { return dir.path() + "/model.safetensors"; }
  test::TempDir dir;
  test::TestModel model;
  test::WrittenCheckpoint written;
};

TEST_F(HardenFiles, FifoAsTensorFileIsAnErrorNotAWait) {
  std::filesystem::remove(weights());
  ASSERT_EQ(mkfifo(weights().c_str(), 0600), 0);
  const auto msg = error_within_time([&] { inspect_checkpoint(dir.path()); });
  EXPECT_MENTIONS(msg, "model.safetensors");
  EXPECT_MENTIONS(msg, "FIFO");
  EXPECT_MENTIONS(error_within_time([&] { load_moe_layer(dir.path(), 1, 1); }), "FIFO");
}

TEST_F(HardenFiles, FifoConfigIsAnErrorNotAWait) {
  std::filesystem::remove(dir.path() + "/config.json");
  ASSERT_EQ(mkfifo((dir.path() + "/config.json").c_str(), 0600), 0);
  EXPECT_MENTIONS(error_within_time([&] { inspect_checkpoint(dir.path()); }), "config.json: is a FIFO");
}

TEST_F(HardenFiles, DirectoryAndDeviceAsTensorFileAreErrors) {
  std::filesystem::remove(weights());
  std::filesystem::create_directory(weights());
  EXPECT_MENTIONS(error_within_time([&] { inspect_checkpoint(dir.path()); }), "is a directory");
  std::filesystem::remove(weights());
  std::filesystem::create_symlink("/dev/zero", weights());
  EXPECT_MENTIONS(error_within_time([&] { inspect_checkpoint(dir.path()); }), "character device");
}

TEST_F(HardenFiles, ShardNamedByTheIndexThatIsAFifoIsAnError) {
  std::filesystem::remove(weights());
  ASSERT_EQ(mkfifo((dir.path() + "/shard.safetensors").c_str(), 0600), 0);
  std::ofstream(dir.path() + "/model.safetensors.index.json")
      << R"({"weight_map": {"model.layers.1.mlp.gate.weight": "shard.safetensors"}})";
  EXPECT_MENTIONS(error_within_time([&] { inspect_checkpoint(dir.path()); }), "shard.safetensors: is a FIFO");
}

// config.json claims a billion experts over a 4-expert checkpoint: inspect reports them missing
// without allocating per claimed expert, and loading refuses the tensors the files cannot back.
TEST_F(HardenFiles, OversizedExpertClaimCostsNoMemory) {
  std::ifstream in(dir.path() + "/config.json");
  std::string cfg((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string key = "\"num_experts\": 4";
  const size_t at = cfg.find(key);
  ASSERT_NE(at, std::string::npos) << cfg;
  cfg.replace(at, key.size(), "\"num_experts\": 1000000000");
  std::ofstream(dir.path() + "/config.json") << cfg;
  const auto t0 = std::chrono::steady_clock::now();
  const CheckpointInfo info = inspect_checkpoint(dir.path());
  EXPECT_LT(std::chrono::steady_clock::now() - t0, std::chrono::seconds(5));
  ASSERT_FALSE(info.moe_layers.empty());
  EXPECT_EQ(info.moe_layers[0].missing_count, 1000000000 - 4);
  EXPECT_LE(info.moe_layers[0].missing_experts.size(), 64u);
  EXPECT_EQ(info.moe_layers[0].missing_experts.front(), 4);
  // Loading: the router tensor [E, H] the config implies is not in the file.
  EXPECT_MENTIONS(error_of([&] { load_moe_layer(dir.path(), 1, 1); }), "experts.4.");
}

TEST_F(HardenFiles, ExpertRangeWhoseEndOverflowsIsARangeError) {
  LoadOptions o;
  o.local_expert_offset = 1;
  o.num_local_experts = INT32_MAX;
  const auto msg = error_of([&] { load_moe_layer(dir.path(), 1, 1, o); });
  EXPECT_MENTIONS(msg, "local experts [1, 2147483648)");
  o.local_expert_offset = -1;
  o.num_local_experts = 0;
  EXPECT_MENTIONS(error_of([&] { load_moe_layer(dir.path(), 1, 1, o); }), "local_expert_offset");
}

TEST(HardenSafetensors, OverflowingClaimsNameFileAndTensor) {
  const std::vector<std::pair<std::string, std::string>> cases = {
      {R"({"t":{"dtype":"U8","shape":[4611686018427387904,4],"data_offsets":[0,0]}})", "holds more bytes"},
      {R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[18446744073709551615,8]}})", "out of range"},
      {R"({"t":{"dtype":"U8","shape":[8],"data_offsets":[0,8]}})", "run past the end"},
      {R"({"t":{"dtype":"U8","shape":[-1],"data_offsets":[0,0]}})", "non-negative"},
  };
  for (const auto& [header, needle] : cases) {
    std::vector<uint8_t> bytes(8);
    uint64_t n = header.size();
    for (int i = 0; i < 8; ++i) bytes[i] = uint8_t(n >> (8 * i));
    bytes.insert(bytes.end(), header.begin(), header.end());
    const auto msg = error_of([&] { st::File::parse(bytes, "claims.safetensors"); });
    EXPECT_MENTIONS(msg, "claims.safetensors");
    EXPECT_MENTIONS(msg, needle);
  }
  std::vector<uint8_t> huge(8, 0xFF);  // header length 2^64 - 1
  EXPECT_MENTIONS(error_of([&] { st::File::parse(huge, "len.safetensors"); }), "exceeds");
}

// ---- NaN block scales ------------------------------------------------------------------------------

TEST(HardenScales, NanBlockScaleIsRefusedByPrepackNamingExpertRowAndBlock) {
  for (Format f : {Format::nvfp4, Format::mxfp4}) {
    MoeProblem p = small_problem();
    p.format = f;
    MoeWeights w = random_weights(p, 3);
    const int64_t kcols = w.experts[5].up.scale_cols();
    w.experts[5].up.scales[size_t(7 * kcols + 1)] = f == Format::nvfp4 ? 0xFF : 0xFF;
    for (auto* fn : {+[](const MoeProblem& q, const MoeWeights& x) { prepack(q, x); },
                     +[](const MoeProblem& q, const MoeWeights& x) { check_block_scales(q, x); }}) {
      const auto msg = error_of([&] { fn(p, w); });
      EXPECT_MENTIONS(msg, "expert 5 up");
      EXPECT_MENTIONS(msg, "row 7, block 1");
      EXPECT_MENTIONS(msg, "code 0xFF");
    }
    if (f == Format::nvfp4) {
      w.experts[5].up.scales[size_t(7 * kcols + 1)] = 0x7F;
      EXPECT_MENTIONS(error_of([&] { prepack(p, w); }), "E4M3 code 0x7F");
    }
  }
}

TEST(HardenScales, NanBlockScaleInGptOssFusedTensorNamesExpertHalfAndRow) {
  test::TempDir dir;
  test::TestModel m;
  m.format = CheckpointFormat::gpt_oss_mxfp4;
  m.model_type = "gpt_oss";
  const auto written = test::write_test_checkpoint(dir.path(), m);
  const std::string name = "model.layers.1.mlp.experts.gate_up_proj_scales";
  auto s = written.tensors.at(name).bytes;
  // [E, 2I, H/32] with I = 32, H = 64: expert 1, fused row 3 (up row 1), block 1.
  s[size_t((1 * 64 + 3) * 2 + 1)] = 0xFF;
  test::overwrite_tensor_bytes(dir.path(), written, name, s);
  const auto msg = error_of([&] { load_moe_layer(dir.path(), 1, 1); });
  EXPECT_MENTIONS(msg, name);
  EXPECT_MENTIONS(msg, "(expert 1 up)");
  EXPECT_MENTIONS(msg, "row 1, block 1 (tensor row 67)");
  EXPECT_MENTIONS(msg, "E8M0 code 0xFF");
}

// ---- non-finite routing inputs ---------------------------------------------------------------------

struct NanCase {
  const char* name;
  RoutingMethod method;
  bool bias;
  int n_group, topk_group, k;
};

class HardenNanRouting : public ::testing::TestWithParam<NanCase> {};

// A NaN logit of one token makes that token's output NaN and leaves every other token bitwise
// unchanged; the NaN token still gets k distinct ids in [0, E). A NaN router bias makes every token
// NaN.
TEST_P(HardenNanRouting, NanLogitMakesOnlyThatTokenNan) {
  const NanCase c = GetParam();
  MoeProblem p = small_problem(c.method);
  p.top_k = c.k;
  p.routing.has_bias = c.bias;
  p.routing.n_group = c.n_group;
  p.routing.topk_group = c.topk_group;
  if (c.method == RoutingMethod::deepseek_v3) p.routing.routed_scaling_factor = 2.5f;  // the only method with one
  const int64_t T = p.tokens, E = p.num_experts, H = p.hidden;
  std::mt19937 rng(std::random_device{}());
  std::normal_distribution<float> nd;
  const MoeWeights w = random_weights(p, rng());
  std::vector<uint16_t> x(size_t(T * H));
  for (auto& v : x) v = float_to_bf16(nd(rng));
  std::vector<float> logits(static_cast<size_t>(T * E)), bias(static_cast<size_t>(E));
  for (auto& v : logits) v = nd(rng);
  for (auto& v : bias) v = 0.1f * nd(rng);
  HostInputs in;
  in.x = x.data();
  in.logits = logits.data();
  in.router_bias = c.bias ? bias.data() : nullptr;
  const ReferenceResult clean = moe_reference(p, w, in, 2);
  const int64_t bad = 2;
  std::vector<float> poisoned = logits;
  poisoned[size_t(bad * E + 3)] = kNaN;
  in.logits = poisoned.data();
  const ReferenceResult r = moe_reference(p, w, in, 2);
  std::set<int32_t> ids;
  for (int j = 0; j < p.top_k; ++j) {
    const int32_t id = r.topk_ids[size_t(bad * p.top_k + j)];
    EXPECT_TRUE(id >= 0 && id < E) << c.name << ": id " << id;
    ids.insert(id);
    EXPECT_TRUE(std::isnan(r.topk_weights[size_t(bad * p.top_k + j)])) << c.name << " slot " << j;
  }
  EXPECT_EQ(ids.size(), size_t(p.top_k)) << c.name << ": duplicate ids";
  for (int64_t t = 0; t < T; ++t)
    for (int64_t h = 0; h < H; ++h) {
      const size_t i = size_t(t * H + h);
      if (t == bad) {
        ASSERT_TRUE(std::isnan(r.out_f32[i])) << c.name << ": token " << t << " element " << h;
      } else {
        ASSERT_EQ(r.out[i], clean.out[i]) << c.name << ": token " << t << " element " << h << " changed";
      }
    }
  if (c.bias) {
    std::vector<float> nan_bias = bias;
    nan_bias[1] = kNaN;
    in.logits = logits.data();
    in.router_bias = nan_bias.data();
    const ReferenceResult rb = moe_reference(p, w, in, 2);
    for (size_t i = 0; i < rb.out_f32.size(); ++i)
      ASSERT_TRUE(std::isnan(rb.out_f32[i])) << c.name << ": NaN router bias, element " << i;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Methods, HardenNanRouting,
    ::testing::Values(NanCase{"softmax_topk", RoutingMethod::softmax_topk, false, 1, 1, 2},
                      NanCase{"sigmoid_topk", RoutingMethod::sigmoid_topk, false, 1, 1, 2},
                      NanCase{"topk_softmax", RoutingMethod::topk_softmax, true, 1, 1, 2},
                      NanCase{"deepseek_v3", RoutingMethod::deepseek_v3, true, 4, 2, 3},
                      NanCase{"llama4", RoutingMethod::llama4, false, 1, 1, 1}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(HardenInfRouting, InfinitiesFollowTheMethodsArithmetic) {
  // sigmoid(+inf) = 1 stays finite; softmax with +inf has inf - inf = NaN.
  MoeProblem p = small_problem(RoutingMethod::sigmoid_topk);
  p.tokens = 1;
  std::vector<float> logits(8, 0.0f);
  logits[6] = std::numeric_limits<float>::infinity();
  std::vector<int32_t> ids(2);
  std::vector<float> wts(2);
  route_reference(p, logits.data(), nullptr, ids.data(), wts.data());
  EXPECT_EQ(ids[0], 6);
  EXPECT_FLOAT_EQ(wts[0], 1.0f / 1.5f);
  p.routing.method = RoutingMethod::softmax_topk;
  route_reference(p, logits.data(), nullptr, ids.data(), wts.data());
  EXPECT_TRUE(std::isnan(wts[0]) && std::isnan(wts[1]));
  EXPECT_NE(ids[0], ids[1]);
}

}  // namespace
}  // namespace fp4moe
