// Problem options shared by the commands that build a layer from a preset (`check`, `plan`): another
// routing method, format or input mode than the preset's, and an expert-parallel range.
#pragma once
#include <cstdint>
#include <string>

#include "fp4moe/problem.h"

namespace fp4moe::cli {

struct ProblemFlags {
  std::string routing;        // empty: the preset's
  std::string format;         // empty: the preset's
  std::string input_mode = "w4a16";
  std::string experts_local;  // "OFFSET:COUNT", empty: all experts
  bool batch_invariant = false;
};

// --experts-local OFFSET:COUNT into the problem's local expert range (no-op when empty).
void apply_experts_local(const std::string& text, MoeProblem& p);

// Preset `name` at `tokens` tokens with the flags applied; validated.
MoeProblem preset_problem(const std::string& name, int64_t tokens, const ProblemFlags& f);

}  // namespace fp4moe::cli
