// The planner: one pure function from (problem, device description) to a printable plan that names
// the kernel family (tactic) and its launch shape. Nothing here launches or queries a GPU, so every
// choice is testable on any machine; DeviceDesc::current() reads the device at the edge.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "fp4moe/problem.h"

namespace fp4moe {

// What the planner needs to know of a GPU.
struct DeviceDesc {
  std::string name;              // as the driver names it ("NVIDIA H200"), or a preset's
  int sms = 0;                   // multiprocessors
  int cc_major = 0, cc_minor = 0;
  size_t smem_per_block = 0;     // opt-in dynamic shared memory per block (bytes)
  size_t smem_per_sm = 0;        // shared memory per multiprocessor (bytes)
  int64_t l2_bytes = 0;
  double hbm_bytes_per_s = 0;    // streaming read bandwidth, for estimates only
  double bf16_flops = 0;         // dense bf16 tensor rate, for estimates only

  // Presets of the SXM parts (rates as measured by the read kernel and a bf16 8192^3 GEMM on the
  // lent cards, BENCH.md), and the device the calling thread uses (cached per device id).
  static DeviceDesc h100();
  static DeviceDesc h200();
  static DeviceDesc current();
  // "h100" / "h200" (any case); throws fp4moe::Error listing the names otherwise.
  static DeviceDesc named(const std::string& name);
  std::string to_string() const;
};

enum class Tactic : uint8_t {
  decode,   // persistent mma.sync kernel, one launch per 64 tokens (src/kernels/decode)
  prefill,  // routing / lists / gather, then wgmma grouped GEMMs and a finalize (src/kernels/prefill)
};
std::string_view to_string(Tactic);

struct DecodeTactic {
  int blocks = 0;            // persistent grid size (blocks per SM x SMs)
  int threads = 0;           // threads per block
  int team_warps1 = 0;       // warps that split K of one GEMM1 task
  int team_warps2 = 0;       // warps that split K of one GEMM2 task
  int64_t chunks = 0;        // launches (token chunks of kTokenChunk)
  size_t smem_bytes = 0;     // dynamic shared memory per block
  int64_t l2_prefetch_bytes = 0;  // GEMM2 weights prefetched into L2 while GEMM1 runs
};

struct PrefillTactic {
  int block_m = 0;           // weight rows per tile (64 per consumer warpgroup)
  int block_n = 0;           // tokens per tile (the wgmma N)
  int stages = 0;            // shared-memory pipeline depth, in k-tiles of 64 columns
  int blocks = 0;            // persistent grid of the GEMM kernels (one block per SM)
  int threads = 0;           // one producer warpgroup + the consumer warpgroups
  size_t smem_bytes = 0;     // dynamic shared memory per GEMM block
  int64_t token_chunk = 0;   // tokens per pass (bounds the workspace); T > chunk runs several passes
  int64_t passes = 0;
};

struct Plan {
  MoeProblem problem;        // the problem the plan was made for (run(..., plan) checks it)
  Tactic tactic = Tactic::decode;
  int sms = 0;
  std::string device;        // DeviceDesc::name the plan was made for
  std::string reason;        // why this tactic (the crossover rule that decided)
  DecodeTactic decode;       // valid when tactic == decode
  PrefillTactic prefill;     // valid when tactic == prefill
  // Estimates from the device description (not measurements): FP4 bytes of the experts touched
  // under uniform routing, and FLOPs of the routed slots.
  int64_t weight_bytes = 0;
  double flops = 0;
  double byte_floor_us = 0, compute_floor_us = 0;
  std::string to_string() const;

  // Decode-plan fields under their former names (the benchmark's timeline uses them).
  int blocks() const { return tactic == Tactic::decode ? decode.blocks : prefill.blocks; }
};

// The plan for `p` on device `d`. Pure: the same inputs give the same plan on any machine.
Plan make_plan(const MoeProblem& p, const DeviceDesc& d);
// The plan of a given tactic, whatever the crossover says (measurements time both tactics at the
// same T; run(..., plan) executes it). Batch-invariant problems accept only the prefill tactic.
Plan make_plan(const MoeProblem& p, const DeviceDesc& d, Tactic tactic);
// The plan `run` uses on the current device. FP4MOE_LOG_PLAN=1 prints each new plan once.
Plan make_plan(const MoeProblem& p);

// Tokens from which the planner switches from the decode to the prefill kernels on `d` (outside
// batch-invariant mode), and where that number comes from.
struct Crossover {
  int64_t prefill_from_tokens;
  const char* source;
};
Crossover crossover(const MoeProblem& p, const DeviceDesc& d);

}  // namespace fp4moe
