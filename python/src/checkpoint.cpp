// Binding of the checkpoint loader (fp4moe/checkpoint.h). The loader lives in its own component;
// when this tree has no include/fp4moe/checkpoint.h, CMake leaves FP4MOE_HAVE_CHECKPOINT undefined
// and the module exposes has_checkpoint_loader() == False instead of load_moe_layer.
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common.h"

#if FP4MOE_HAVE_CHECKPOINT
#include "fp4moe/checkpoint.h"
#endif

namespace fp4moe::py {

void bind_checkpoint(nb::module_& m) {
#if FP4MOE_HAVE_CHECKPOINT
  m.def("has_checkpoint_loader", [] { return true; });
  m.def(
      "load_moe_layer",
      [](const std::string& dir, nb::handle layer_h, nb::handle tokens_h, InputMode input_mode,
         nb::handle offset_h, nb::handle count_h) {
        const int layer = to_int<int>(layer_h, "layer");
        const int64_t tokens = to_int<int64_t>(tokens_h, "tokens");
        FP4MOE_CHECK(layer >= 0, "layer must be >= 0, got " << layer);
        FP4MOE_CHECK(tokens >= 0, "tokens must be >= 0, got " << tokens);
        LoadOptions opt;
        opt.input_mode = input_mode;
        opt.local_expert_offset = to_int<int>(offset_h, "local_expert_offset");
        opt.num_local_experts = to_int<int>(count_h, "num_local_experts");
        LoadedLayer l;
        {
          nb::gil_scoped_release nogil;
          l = load_moe_layer(dir, layer, tokens, opt);
        }
        nb::dict d;
        const size_t E = size_t(l.problem.num_experts), H = size_t(l.problem.hidden);
        const size_t nbias = l.router_bias.size();
        d["problem"] = l.problem;
        d["router_weight"] = to_numpy(std::move(l.router_weight), {E, H});
        d["router_bias"] = to_numpy(std::move(l.router_bias), {nbias});
        d["warnings"] = l.warnings;
        d["weights"] = std::move(l.weights);
        return d;
      },
      nb::arg("dir"), nb::arg("layer"), nb::arg("tokens"), nb::arg("input_mode"),
      nb::arg("local_expert_offset"), nb::arg("num_local_experts"));
#else
  m.def("has_checkpoint_loader", [] { return false; });
#endif
}

}  // namespace fp4moe::py
