// run(..., plan): either tactic at the same T against the CPU reference (what the crossover
// measurement times), bitwise equal to run() where the plan is make_plan's, and plans that do not
// fit the call refused before anything launches.
#include <gtest/gtest.h>

#include "gpu/gpu_harness.h"
#include "kernels/prefill/params.h"

namespace fp4moe {
namespace {

using testing::compare;
using testing::DevBuf;
using testing::first_mismatch;
using testing::HostData;

struct Buffers {
  DevBuf<uint16_t> x, out;
  DevBuf<float> logits, bias, weights;
  DevBuf<int32_t> ids;
  size_t ws_bytes;
  DevBuf<uint8_t> ws;
  DeviceInputs in;
  Buffers(const MoeProblem& p, const HostData& d)
      : x(d.x), out(size_t(p.tokens) * p.hidden), logits(d.logits), bias(d.bias), weights(d.weights), ids(d.ids),
        ws_bytes(workspace_size(p)), ws(ws_bytes) {
    in.x = x.ptr;
    in.out = out.ptr;
    in.logits = logits.ptr;
    in.router_bias = p.routing.has_bias ? bias.ptr : nullptr;
  }
};

// Runs with `plan` (or make_plan's when null), output poisoned first; returns out [T, H].
std::vector<uint16_t> run_with(const MoeProblem& p, const DeviceWeights& w, Buffers& b, const Plan* plan) {
  cudaMemset(b.out.ptr, 0xFF, b.out.n * 2);
  if (plan)
    run(p, w, b.in, b.ws.ptr, b.ws_bytes, nullptr, *plan);
  else
    run(p, w, b.in, b.ws.ptr, b.ws_bytes, nullptr);
  const cudaError_t e = cudaDeviceSynchronize();
  if (e != cudaSuccess) throw std::runtime_error(std::string("kernel failed: ") + cudaGetErrorString(e));
  return b.out.download();
}

MoeProblem small_problem(int64_t T) {
  MoeProblem p;
  p.tokens = T;
  p.hidden = 512;
  p.intermediate = 320;
  p.num_experts = 16;
  p.top_k = 4;
  return p;
}

TEST(RunPlan, BothTacticsAtTheSameTokenCount) {
  GPU_TEST_PREAMBLE();
  for (const int64_t T : {16, 48, 64, 65, 200}) {
    const MoeProblem p = small_problem(T);
    const MoeWeights w = random_weights(p, 11 + uint64_t(T));
    const HostData d = testing::random_inputs(p, 23 + uint64_t(T));
    const ReferenceResult ref = moe_reference(p, w, testing::host_inputs(p, d));
    const DeviceWeights dw(prepack(p, w));
    Buffers b(p, d);
    const DeviceDesc dev = DeviceDesc::current();
    const std::vector<uint16_t> planner = run_with(p, dw, b, nullptr);
    for (const Tactic t : {Tactic::decode, Tactic::prefill}) {
      const Plan plan = make_plan(p, dev, t);
      const std::vector<uint16_t> got = run_with(p, dw, b, &plan);
      const auto st = compare(got, ref.out);
      EXPECT_EQ(st.nan_count, 0) << to_string(t) << " T=" << T << ": unwritten or NaN outputs";
      EXPECT_LT(st.rel_l2, 1e-2) << to_string(t) << " T=" << T << ": rel L2 " << st.rel_l2;
      if (t == make_plan(p).tactic)
        EXPECT_EQ(first_mismatch(got, planner, p.hidden), "") << to_string(t) << " T=" << T << " vs run()";
    }
  }
}

TEST(RunPlan, RefusesPlansThatDoNotFit) {
  GPU_TEST_PREAMBLE();
  const MoeProblem p = small_problem(100);
  const MoeWeights w = random_weights(p, 5);
  const HostData d = testing::random_inputs(p, 6);
  const DeviceWeights dw(prepack(p, w));
  Buffers b(p, d);
  auto message = [&](const Plan& plan) -> std::string {
    try {
      run(p, dw, b.in, b.ws.ptr, b.ws_bytes, nullptr, plan);
    } catch (const Error& e) {
      return e.what();
    }
    return "";
  };
  const Plan other = make_plan(small_problem(99), DeviceDesc::current());
  EXPECT_NE(message(other).find("the plan was made for the problem T=99"), std::string::npos) << message(other);
  Plan big = make_plan(p, DeviceDesc::current(), Tactic::prefill);
  big.prefill.stages = 2;
  big.prefill.smem_bytes = DeviceDesc::current().smem_per_block + 1024;
  EXPECT_NE(message(big).find("bytes of shared memory per block"), std::string::npos) << message(big);
  Plan narrow = make_plan(p, DeviceDesc::current(), Tactic::prefill);
  narrow.prefill.block_n = 32;
  narrow.prefill.stages = 2;
  narrow.prefill.smem_bytes = 2 * kernels::prefill_stage_bytes(narrow.prefill.block_m, 32, p.format) +
                              kernels::kPrefillSmemReserve;
  EXPECT_NE(message(narrow).find("plan.prefill.block_n = 32"), std::string::npos) << message(narrow);
  // batch_invariant: the prefill tactic only (one summation order for every T).
  MoeProblem q = p;
  q.batch_invariant = true;
  Plan dec = make_plan(p, DeviceDesc::current(), Tactic::decode);
  dec.problem = q;
  try {
    run(q, dw, b.in, b.ws.ptr, b.ws_bytes, nullptr, dec);
    ADD_FAILURE() << "a batch_invariant problem ran the decode tactic";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("prefill tactic only"), std::string::npos) << e.what();
  }
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace fp4moe
