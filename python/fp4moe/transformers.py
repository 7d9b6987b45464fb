"""Hugging Face transformers integration: the routed experts of a loaded model run on fp4moe.

::

    import transformers, fp4moe.transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to("cuda")
    fp4moe.transformers.patch_model(model, format="nvfp4")             # quantize the bf16 experts
    fp4moe.transformers.patch_model(model, checkpoint="/models/x-fp4")  # or load an FP4 checkpoint
    model.generate(...)

:func:`patch_model` replaces the routed experts of every MoE block and nothing else: the model's
own router still computes the top-k ids and weights (its own code, so the routing is exactly the
model's), and fp4moe runs the experts with those precomputed top-k. Shared experts, attention, norms
and the rest of the model are untouched. The experts run where the model's parameters are: on a CUDA
device through the GPU kernels (DeviceWeights), on the CPU through the CPU reference layer
(HostWeights; exact but slow, for tests and small models). Patch the model after moving it to its
device: the FP4 weights do not move with ``model.to()``.

Supported model types (transformers 5 module layout, experts as fused 3-D parameters): qwen3_moe,
qwen3_next, mixtral, gpt_oss, deepseek_v3 (also Kimi-K2, which transformers loads as deepseek_v3),
glm4_moe and llama4. See docs/python.md.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch

import fp4moe
from fp4moe import Error

__all__ = ["SUPPORTED_MODEL_TYPES", "Fp4MoeExperts", "Llama4Fp4MoeBlock", "patch_model"]

SUPPORTED_MODEL_TYPES = ("qwen3_moe", "qwen3_next", "mixtral", "gpt_oss", "deepseek_v3", "kimi_k2",
                         "glm4_moe", "llama4")

# Expert modules of transformers and how their fused parameters hold W13 = [gate; up] ([2I, H] per
# expert) and W2 ([H, I]):
#   "stacked":     gate_up_proj [E, 2I, H] (gate rows first, then up), down_proj [E, H, I]
#   "interleaved": gate_up_proj [E, H, 2I] (column 2i gate i, 2i + 1 up i), down_proj [E, I, H],
#                  with biases gate_up_proj_bias [E, 2I] (interleaved) and down_proj_bias [E, H]
#   "transposed":  gate_up_proj [E, H, 2I] (gate columns first, then up), down_proj [E, I, H]
_EXPERT_LAYOUTS = {
    "Qwen3MoeExperts": "stacked",
    "Qwen3NextExperts": "stacked",
    "MixtralExperts": "stacked",
    "DeepseekV3Experts": "stacked",
    "Glm4MoeExperts": "stacked",
    "GptOssExperts": "interleaved",
    "Llama4TextExperts": "transposed",
}
# Llama 4 scales the expert *input* by the routing weight; its whole MoE block is replaced (keeping
# its router and shared expert), the others only their `experts` module.
_LLAMA4_BLOCK = "Llama4TextMoe"

_ACTIVATIONS = {"silu": "swiglu", "swish": "swiglu", "gelu_pytorch_tanh": "geglu_tanh",
                "gelu_tanh": "geglu_tanh", "relu2": "relu2"}

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ---- the replacement modules ---------------------------------------------------------------------


class Fp4MoeExperts(torch.nn.Module):
    """Drop-in replacement of a transformers experts module: forward(hidden_states [T, H],
    top_k_index [T, k], top_k_weights [T, k]) -> [T, H], the weighted sum of the selected experts,
    computed by fp4moe with the given (precomputed) top-k. Hidden states of another dtype are
    rounded to bf16 and the output is returned in their dtype."""

    def __init__(self, weights, layer: int, source: str):
        super().__init__()
        self.experts = fp4moe.MoeExperts(weights)
        self.layer = layer
        self.source = source  # "checkpoint" or the format the bf16 weights were quantized to
        p = self.experts.problem
        self.hidden, self.top_k, self.num_experts = p.hidden, p.top_k, p.num_experts

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        shape, dtype = hidden_states.shape, hidden_states.dtype
        x = hidden_states.reshape(-1, self.hidden).to(torch.bfloat16).contiguous()
        ids = top_k_index.reshape(x.shape[0], top_k_index.shape[-1]).to(torch.int32).contiguous()
        w = top_k_weights.reshape(x.shape[0], top_k_weights.shape[-1]).to(torch.float32).contiguous()
        out = torch.ops.fp4moe.moe_forward(x, None, None, ids, w, self.experts.handle, None)
        return out.to(dtype).reshape(shape)

    def extra_repr(self) -> str:
        return f"layer={self.layer}, source={self.source}, {self.experts.problem!r}"


class Llama4Fp4MoeBlock(torch.nn.Module):
    """A Llama 4 MoE block (Llama4TextMoe) whose routed experts run on fp4moe. The block's router
    and shared expert are kept as they were. Llama 4 multiplies each selected expert's input by its
    sigmoid router score (in the model's dtype, as transformers does); those scaled rows go to
    fp4moe with top-1 precomputed routing of weight 1, and the k results of a token are summed."""

    def __init__(self, block: torch.nn.Module, weights, layer: int, source: str):
        super().__init__()
        self.router = block.router
        self.shared_expert = block.shared_expert
        self.top_k = block.top_k
        self.hidden_dim = block.hidden_dim
        self.num_experts = block.num_experts
        self.experts = Fp4MoeExperts(weights, layer, source)

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_scores, router_logits = self.router(hidden_states)  # [T, E], zero off the top-k
        T, k = hidden_states.shape[0], self.top_k
        # The router's own top-k on its logits (the same call, so the same ids).
        ids = torch.topk(router_logits, k, dim=1)[1]
        scores = router_scores.gather(1, ids)
        routed_in = (hidden_states.unsqueeze(1) * scores.unsqueeze(-1)).reshape(T * k, -1)
        ones = torch.ones(T * k, 1, dtype=torch.float32, device=hidden_states.device)
        routed = self.experts(routed_in, ids.reshape(T * k, 1), ones).reshape(T, k, -1).sum(dim=1)
        out = self.shared_expert(hidden_states)
        out.add_(routed)
        return out, router_logits


# ---- reading a model -----------------------------------------------------------------------------


class _Block:
    """One MoE block found in the model: where it is and what its experts look like."""

    def __init__(self, name: str, parent: torch.nn.Module, attr: str, module: torch.nn.Module,
                 experts: torch.nn.Module, layout: str, layer: int):
        self.name, self.parent, self.attr, self.module = name, parent, attr, module
        self.experts, self.layout, self.layer = experts, layout, layer
        gu = experts.gate_up_proj
        if layout == "stacked":
            self.E, two_i, self.H = gu.shape
        else:
            self.E, self.H, two_i = gu.shape
        self.I = two_i // 2


def _text_config(model: torch.nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise Error(f"model must be a transformers model (with .config), got {type(model).__name__}")
    get = getattr(config, "get_text_config", None)
    return get() if get is not None else config


def _find_blocks(model: torch.nn.Module) -> List[_Block]:
    modules = dict(model.named_modules())
    blocks = []
    for name, module in modules.items():
        cls = type(module).__name__
        if cls == _LLAMA4_BLOCK:  # the whole block (its experts module is not replaced alone)
            experts, target, layout = module.experts, module, "transposed"
        elif cls in _EXPERT_LAYOUTS and cls != "Llama4TextExperts":
            experts, target, layout = module, module, _EXPERT_LAYOUTS[cls]
        else:
            continue
        m = _LAYER.search(name + ".")
        if m is None:
            raise Error(f"cannot tell the layer index of the MoE module {name!r} (expected "
                        "'...layers.<L>....' in its name)")
        parent_name, _, attr = name.rpartition(".")
        blocks.append(_Block(name, modules[parent_name], attr, target, experts, layout,
                             int(m.group(1))))
    return blocks


def _activation(config, layout: str, experts: torch.nn.Module) -> Dict[str, Any]:
    if layout == "interleaved":  # gpt-oss: clamped SwiGLU with the module's own alpha and limit
        return dict(activation="swiglu_oai", alpha=float(getattr(experts, "alpha", 1.702)),
                    limit=float(getattr(experts, "limit", 7.0)))
    act = getattr(config, "hidden_act", "silu")
    if act not in _ACTIVATIONS:
        raise Error(f"hidden_act {act!r} is not supported (supported: {', '.join(_ACTIVATIONS)})")
    return dict(activation=_ACTIVATIONS[act])


def _top_k(config, block: _Block) -> int:
    """Experts per token of the fp4moe call: the model's, or 1 for Llama 4 (one row per selected
    expert, see Llama4Fp4MoeBlock)."""
    if block.layout == "transposed":
        return 1
    k = getattr(config, "num_experts_per_tok", None)
    if k is None:
        k = getattr(config, "experts_per_token", None)
    if k is None:
        raise Error("the model's config has no num_experts_per_tok (or experts_per_token)")
    return int(k)


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _expert_matrices(block: _Block, e: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 gate [I, H], up [I, H], down [H, I] of expert e, in the library's orientation."""
    gu, dn, I = block.experts.gate_up_proj[e], block.experts.down_proj[e], block.I
    if block.layout == "stacked":
        return _f32(gu[:I]), _f32(gu[I:]), _f32(dn)
    if block.layout == "interleaved":
        return _f32(gu[:, 0::2].t()), _f32(gu[:, 1::2].t()), _f32(dn.t())
    return _f32(gu[:, :I].t()), _f32(gu[:, I:].t()), _f32(dn.t())


def _quantized_weights(block: _Block, problem, fmt: str):
    """The block's bf16 experts quantized by the library (NVFP4: ModelOpt recipe, one global scale
    per matrix from its amax, gate and up separately; MXFP4: OCP MX v1.0)."""
    quantize = fp4moe.quantize_nvfp4 if fmt == "nvfp4" else fp4moe.quantize_mxfp4
    parts: Dict[str, List[Any]] = {n: [] for n in ("gate", "up", "down")}
    for e in range(block.E):
        for n, m in zip(("gate", "up", "down"), _expert_matrices(block, e)):
            parts[n].append(quantize(np.ascontiguousarray(m)))
    kw: Dict[str, Any] = {}
    for n, qs in parts.items():
        kw[n] = np.stack([q.data for q in qs])
        kw[n + "_scales"] = np.stack([np.asarray(q.scales) for q in qs])
        if fmt == "nvfp4":
            kw[n + "_global_scale"] = np.array([q.global_scale for q in qs], dtype=np.float32)
    if block.layout == "interleaved":
        gub = _f32(block.experts.gate_up_proj_bias)
        kw["gate_bias"] = np.ascontiguousarray(gub[:, 0::2])
        kw["up_bias"] = np.ascontiguousarray(gub[:, 1::2])
        kw["down_bias"] = _f32(block.experts.down_proj_bias)
    return fp4moe.make_weights(problem, **kw)


def _problem_for(config, block: _Block, fmt: str):
    """The fp4moe problem of a block's experts with precomputed routing (the model's router picks
    the experts). Llama 4 blocks run one row per (token, selected expert): top_k 1."""
    k = _top_k(config, block)
    return fp4moe.make_problem(hidden=block.H, intermediate=block.I, num_experts=block.E, top_k=k,
                               format=fmt, routing="precomputed",
                               has_bias=block.layout == "interleaved",
                               **_activation(config, block.layout, block.experts))


def _check_loaded(config, block: _Block, loaded, checkpoint: str) -> None:
    p = loaded.problem
    k = _top_k(config, block)
    want = dict(hidden=block.H, intermediate=block.I, num_experts=block.E, top_k=k)
    for field, value in want.items():
        got = getattr(p, field)
        if got != value:
            raise Error(f"{checkpoint}: layer {block.layer} has {field} = {got}, but the model's "
                        f"{block.name} has {value}; the checkpoint is not of this model")
    act = _activation(config, block.layout, block.experts)
    if p.activation.kind.name != act["activation"]:
        raise Error(f"{checkpoint}: layer {block.layer} uses the activation "
                    f"{p.activation.kind.name}, the model {act['activation']}")
    for field in ("alpha", "limit"):
        if field in act and not np.isclose(getattr(p.activation, field), act[field]):
            raise Error(f"{checkpoint}: layer {block.layer} has swiglu_oai {field} = "
                        f"{getattr(p.activation, field)}, the model {act[field]}")
    if p.has_bias != (block.layout == "interleaved"):
        raise Error(f"{checkpoint}: layer {block.layer} has expert biases = {p.has_bias}, the "
                    f"model's experts {'have' if block.layout == 'interleaved' else 'have none'}")


def _block_device(block: _Block) -> torch.device:
    for module in (block.module, block.experts):
        for t in list(module.parameters()) + list(module.buffers()):
            if t.device.type != "meta":
                return t.device
    return torch.device("cpu")


def _target_device(device: Any, block: _Block) -> torch.device:
    if device is None:
        return _block_device(block)
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", torch.cuda.current_device())
    return d


# ---- the public entry point ----------------------------------------------------------------------


def patch_model(model: torch.nn.Module, checkpoint: Union[None, str, os.PathLike] = None,
                format: Optional[str] = None, *, device: Any = None, input_mode: str = "w4a16",
                layers: Optional[Any] = None,
                progress: Optional[Callable[[str], None]] = None) -> List[str]:
    """Replaces the routed experts of every MoE block of `model` (a loaded transformers model of
    one of SUPPORTED_MODEL_TYPES) with fp4moe, in place. Returns the names of the replaced modules.

    checkpoint: an FP4 checkpoint directory (ModelOpt / compressed-tensors NVFP4, gpt-oss MXFP4;
        docs/checkpoints.md) whose layers are loaded with fp4moe.load_moe_layer; its sizes and
        activation must match the model's. None quantizes the model's own bf16 expert weights.
    format: "nvfp4" or "mxfp4" when quantizing (default "nvfp4"); with a checkpoint, the
        checkpoint's format (an explicit value must agree with it).
    device: where the experts run; default: the device of each block's parameters ("cuda:N" runs
        the GPU kernels, "cpu" the CPU reference).
    input_mode: "w4a16" (default) or "w4a4" (checkpoints with input scales only).
    layers: optional layer indices to patch (default: every MoE layer).
    progress: optional callable receiving one line per patched block.
    """
    config = _text_config(model)
    model_type = getattr(config, "model_type", None)
    known = {"llama4_text": "llama4"}.get(model_type, model_type)
    if known not in SUPPORTED_MODEL_TYPES:
        raise Error(f"model_type {model_type!r} is not supported by fp4moe.transformers "
                    f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    if format is not None and format not in ("nvfp4", "mxfp4"):
        raise Error(f"format must be 'nvfp4' or 'mxfp4', got {format!r}")
    if checkpoint is None and input_mode != "w4a16":
        raise Error("input_mode w4a4 needs the activations' input scales of an FP4 checkpoint; "
                    "quantizing bf16 weights gives w4a16 only")
    blocks = _find_blocks(model)
    if not blocks:
        raise Error(f"no MoE experts module found in this {model_type} model (fp4moe.transformers "
                    "expects transformers 5's fused experts modules: "
                    f"{', '.join(sorted(_EXPERT_LAYOUTS))})")
    if layers is not None:
        wanted = {int(i) for i in layers}
        missing = wanted - {b.layer for b in blocks}
        if missing:
            raise Error(f"layers {sorted(missing)} have no MoE block (MoE layers: "
                        f"{sorted(b.layer for b in blocks)})")
        blocks = [b for b in blocks if b.layer in wanted]
    if checkpoint is not None:
        try:
            checkpoint = os.fspath(checkpoint)
        except TypeError:
            raise Error("checkpoint must be a path (str or os.PathLike), got "
                        f"{type(checkpoint).__name__}") from None

    names = []
    for block in blocks:
        dev = _target_device(device, block)
        if checkpoint is not None:
            loaded = fp4moe.load_moe_layer(checkpoint, block.layer, input_mode=input_mode)
            _check_loaded(config, block, loaded, checkpoint)
            problem, weights = loaded.problem, loaded.weights
            if format is not None and problem.format.name != format:
                raise Error(f"{checkpoint}: the checkpoint is {problem.format.name}, format "
                            f"{format!r} was asked for")
            source = "checkpoint"
        else:
            fmt = format or "nvfp4"
            problem = _problem_for(config, block, fmt)
            weights = _quantized_weights(block, problem, fmt)
            source = fmt
        placed = fp4moe.to_device(problem, weights, "cpu" if dev.type == "cpu" else dev)
        if block.layout == "transposed":
            new = Llama4Fp4MoeBlock(block.module, placed, block.layer, source)
        else:
            new = Fp4MoeExperts(placed, block.layer, source)
        setattr(block.parent, block.attr, new)
        names.append(block.name)
        if progress is not None:
            progress(f"{block.name}: {source} experts on {dev} ({problem!r})")
    return names
