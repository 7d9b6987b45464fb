"""fp4moe: FP4 (NVFP4 / MXFP4) Mixture-of-Experts layers on Hopper GPUs.

Host side (NumPy): quantize / dequantize, scale layouts, presets and problems, expert weights in the
checkpoint layout, the CPU reference layer. GPU side (PyTorch or any DLPack producer): prepack and
upload weights once (or pack checkpoint tensors already on the GPU there: prepack_device), then run
a layer on the caller's CUDA stream. With PyTorch installed, importing
fp4moe also registers the custom op ``torch.ops.fp4moe.moe_forward`` (see fp4moe._torch), which also
runs the CPU reference on CPU tensors with HostWeights (``to_device(problem, weights, "cpu")``).
``fp4moe.transformers`` replaces the routed experts of Hugging Face transformers models.

Every failure raises :class:`fp4moe.Error`, a subclass of both ValueError and RuntimeError whose
message names the argument and what was expected. See docs/python.md.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from . import _C
from ._C import (
    Activation,
    ActivationConfig,
    DeviceWeights,
    DType,
    Error,
    ExpertWeights,
    Format,
    GateUpLayout,
    InputMode,
    MoeProblem,
    MoeWeights,
    PackedLayout,
    PackedWeights,
    Preset,
    QuantizedMatrix,
    RoutingConfig,
    RoutingMethod,
    ScaleDirection,
    ScaleLayout,
    convert_global_scale,
    find_preset,
    nvfp4_global_scale,
    presets,
    swizzled_size,
)

__version__ = "0.1.0"

__all__ = [
    "Activation", "ActivationConfig", "DType", "DeviceWeights", "Error", "ExpertWeights", "Format",
    "GateUpLayout", "HostWeights", "InputMode", "LoadedLayer", "MoeProblem", "MoeWeights", "PackedLayout", "PackedWeights",
    "Preset", "QuantizedMatrix", "ReferenceResult", "RoutingConfig", "RoutingMethod",
    "ScaleDirection", "ScaleLayout", "convert_global_scale", "dequantize", "find_preset",
    "gpu_available", "has_checkpoint_loader", "load_moe_layer", "make_plan", "make_problem",
    "make_weights", "moe_forward", "nvfp4_global_scale", "prepack", "prepack_device", "presets", "quantize_mxfp4",
    "quantize_nvfp4", "random_weights", "reference_forward", "route", "swizzle_scales",
    "swizzled_size", "to_device", "unswizzle_scales", "upload", "workspace_size",
]

class _Translating:
    """The extension's functions with nanobind's argument-type errors ("incompatible function
    arguments": an object of the wrong type, e.g. a list where a MoeProblem is expected) raised as
    fp4moe.Error; the message keeps nanobind's list of the expected and the given types."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name: str):
        f = getattr(self._module, name)

        def call(*args, **kwargs):
            try:
                return f(*args, **kwargs)
            except TypeError as e:
                if "incompatible function arguments" not in str(e):
                    raise
                raise Error(f"{name}: an argument has the wrong type. {e}") from None

        return call


_c = _Translating(_C)

_ENUMS = {
    "format": Format,
    "direction": ScaleDirection,
    "scale_layout": ScaleLayout,
    "routing": RoutingMethod,
    "activation": Activation,
    "input_mode": InputMode,
    "logits_dtype": DType,
    "gate_up_layout": GateUpLayout,
}


def _enum(kind: str, value: Any):
    """Accepts an enum member or its name (e.g. "nvfp4")."""
    cls = _ENUMS[kind]
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        try:
            return cls.__members__[value]
        except KeyError:
            names = ", ".join(cls.__members__)
            raise Error(f"unknown {kind} {value!r}; expected one of: {names}") from None
    raise Error(f"{kind} must be a {cls.__name__} or its name, got {type(value).__name__}")


def _as_u8(a: Any, name: str) -> np.ndarray:
    """FP4 codes and block scales as arrays; the extension checks their dtype: uint8, or for block
    scales the one ml_dtypes float8 type of the format (float8_e4m3fn for nvfp4, float8_e8m0fnu for
    mxfp4), passed on as its bits. Any other dtype is an fp4moe.Error naming both."""
    if a is None:
        return None
    return np.asarray(a)


def _is_bf16(a: np.ndarray) -> bool:
    return a.dtype.name == "bfloat16"


def _bf16_or_f32(a: Any, name: str) -> np.ndarray:
    """float32, uint16 (bfloat16 bits) or ml_dtypes.bfloat16 (passed on as its bits)."""
    a = np.asarray(a)
    if _is_bf16(a):
        return a.view(np.uint16)
    if a.dtype not in (np.float32, np.uint16):
        raise Error(f"{name} must be float32, uint16 (bfloat16 bits) or ml_dtypes.bfloat16, "
                    f"got {a.dtype}")
    return a


def _per_expert(v: Any, name: str, experts: int) -> Optional[np.ndarray]:
    """A scalar or a sequence of per-expert float values -> float32 [experts]."""
    if v is None:
        return None
    try:
        a = np.asarray(v, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise Error(f"{name} must be a number or a sequence of {experts} numbers, got "
                    f"{type(v).__name__} ({e})") from None
    if a.ndim == 0:
        a = np.full(experts, a, dtype=np.float32)
    if a.shape != (experts,):
        raise Error(f"{name} must be a scalar or have shape [{experts}], got {list(a.shape)}")
    return np.ascontiguousarray(a)


def _bias(v: Any, name: str) -> Optional[np.ndarray]:
    if v is None:
        return None
    a = np.asarray(v)
    if _is_bf16(a) or a.dtype == np.float16:
        a = a.astype(np.float32)
    if a.dtype != np.float32:
        raise Error(f"{name} must be float32 (or bfloat16 / float16), got {a.dtype}")
    return a


# ---- problems ------------------------------------------------------------------------------------


def make_problem(preset: Optional[str] = None, tokens: int = 0, **fields: Any) -> MoeProblem:
    """A validated MoeProblem, from a preset name and/or explicit fields.

    Fields: hidden, intermediate, num_experts, top_k, local_expert_offset, num_local_experts,
    format, input_mode, has_bias; activation (name or ActivationConfig), alpha, limit; routing
    (name or RoutingConfig), renormalize, n_group, topk_group, routed_scaling_factor,
    router_bias (routing.has_bias), logits_dtype. Enum values may be given by name.
    """
    p = find_preset(preset).problem(tokens) if preset is not None else MoeProblem()
    p.tokens = tokens
    plain = {"hidden", "intermediate", "num_experts", "top_k", "local_expert_offset",
             "num_local_experts", "has_bias"}
    routing_fields = {"renormalize", "n_group", "topk_group", "routed_scaling_factor"}
    r = p.routing
    a = p.activation
    for key, value in fields.items():
        if key in plain:
            setattr(p, key, value)
        elif key in ("format", "input_mode"):
            setattr(p, key, _enum(key, value))
        elif key == "routing":
            if isinstance(value, RoutingConfig):
                r = value
            else:
                r.method = _enum("routing", value)
        elif key in routing_fields:
            setattr(r, key, value)
        elif key == "router_bias":
            r.has_bias = bool(value)
        elif key == "logits_dtype":
            r.logits_dtype = _enum("logits_dtype", value)
        elif key == "activation":
            if isinstance(value, ActivationConfig):
                a = value
            else:
                a.kind = _enum("activation", value)
        elif key in ("alpha", "limit"):
            setattr(a, key, value)
        else:
            raise Error(f"make_problem: unknown field {key!r}")
    p.routing = r
    p.activation = a
    p.validate()
    return p


# ---- formats -------------------------------------------------------------------------------------


def quantize_nvfp4(x: np.ndarray, global_scale: Optional[float] = None,
                   direction: Union[str, ScaleDirection] = "decode") -> QuantizedMatrix:
    """NVFP4 (ModelOpt recipe) of float32 x [rows, cols], cols a multiple of 16.

    global_scale is read in `direction` ("decode": value = e2m1 * s * g, ModelOpt weight_scale_2;
    "encode": value = e2m1 * s / g); None derives it from amax(|x|). The result stores the decode
    direction.
    """
    return _c.quantize_nvfp4(x, global_scale, _enum("direction", direction))


def quantize_mxfp4(x: np.ndarray) -> QuantizedMatrix:
    """MXFP4 (OCP MX v1.0) of float32 x [rows, cols], cols a multiple of 32."""
    return _c.quantize_mxfp4(x)


def dequantize(m: QuantizedMatrix) -> np.ndarray:
    """float32 [rows, cols] values of an FP4 matrix."""
    return _c.dequantize(m)


def swizzle_scales(scales: np.ndarray) -> np.ndarray:
    """Linear block scales [rows, kcols] -> 1-D swizzled 128x4 stream (TRT-LLM / FlashInfer)."""
    return _c.swizzle_scales(_as_u8(scales, "scales"))


def unswizzle_scales(scales: np.ndarray, rows: int, kcols: int) -> np.ndarray:
    """1-D swizzled 128x4 stream -> linear block scales uint8 [rows, kcols]."""
    return _c.unswizzle_scales(_as_u8(scales, "scales"), rows, kcols)


# ---- weights and the CPU reference ---------------------------------------------------------------


def make_weights(problem: MoeProblem, *, up: np.ndarray, up_scales: np.ndarray, down: np.ndarray,
                 down_scales: np.ndarray, gate: Optional[np.ndarray] = None,
                 gate_scales: Optional[np.ndarray] = None, gate_global_scale: Any = None,
                 up_global_scale: Any = None, down_global_scale: Any = None,
                 gate_bias: Any = None, up_bias: Any = None, down_bias: Any = None,
                 input_scale13: Any = None, input_scale2: Any = None,
                 direction: Union[str, ScaleDirection] = "decode",
                 scale_layout: Union[str, ScaleLayout] = "linear") -> MoeWeights:
    """Host weights of the problem's local experts from arrays in the checkpoint layout.

    Every tensor is stacked over the E local experts:
      gate, up: uint8 [E, I, H/2] (gate None for relu2); down: uint8 [E, H, I/2]
      *_scales: uint8 / float8 [E, rows, cols/block] (linear), or [E, swizzled_size(rows, cols/16)]
                with scale_layout="swizzled_128x4" (nvfp4)
      *_global_scale: nvfp4 only, scalar or [E], read in `direction` (ModelOpt weight_scale_2 is
                "decode"; compressed-tensors weight_global_scale is "encode")
      *_bias: float32 / bfloat16 [E, I] (gate, up), [E, H] (down), iff problem.has_bias
      input_scale13 / input_scale2: W4A4 activation scales (decode direction), scalar or [E]
    """
    E = problem.local_experts()
    return _c.make_weights(
        problem, _as_u8(gate, "gate"), _as_u8(gate_scales, "gate_scales"), _as_u8(up, "up"),
        _as_u8(up_scales, "up_scales"), _as_u8(down, "down"), _as_u8(down_scales, "down_scales"),
        _per_expert(gate_global_scale, "gate_global_scale", E),
        _per_expert(up_global_scale, "up_global_scale", E),
        _per_expert(down_global_scale, "down_global_scale", E),
        _bias(gate_bias, "gate_bias"), _bias(up_bias, "up_bias"), _bias(down_bias, "down_bias"),
        _per_expert(input_scale13, "input_scale13", E),
        _per_expert(input_scale2, "input_scale2", E),
        _enum("direction", direction), _enum("scale_layout", scale_layout))


def random_weights(problem: MoeProblem, seed: int = 0) -> MoeWeights:
    """Random weights (N(0, 0.02)-like, quantized by the library) for tests and benchmarks."""
    return _c.random_weights(problem, seed)


@dataclasses.dataclass
class ReferenceResult:
    out: np.ndarray            # float32 [T, H]: the bf16 output, widened
    out_bf16_bits: np.ndarray  # uint16 [T, H]: the same values as bfloat16 bits
    out_f32: np.ndarray        # float32 [T, H]: before the final bf16 rounding
    topk_ids: np.ndarray       # int32 [T, k]: the routing used
    topk_weights: np.ndarray   # float32 [T, k]


def reference_forward(problem: MoeProblem, weights: MoeWeights, x: np.ndarray,
                      logits: Optional[np.ndarray] = None, *,
                      router_bias: Optional[np.ndarray] = None,
                      topk_ids: Optional[np.ndarray] = None,
                      topk_weights: Optional[np.ndarray] = None,
                      threads: int = 0) -> ReferenceResult:
    """The CPU reference layer (SPEC "The layer"), the oracle of every GPU result.

    x: [T, H] float32 (rounded to bf16 first), uint16 bf16 bits or ml_dtypes.bfloat16.
    Either logits [T, E] (float32, or bf16 as above) with the problem's routing, or topk_ids
    (int32 [T, k]) and topk_weights (float32 [T, k]). T comes from x; problem.tokens is ignored.
    """
    d = _c.reference_forward(
        problem, weights, _bf16_or_f32(x, "x"),
        None if logits is None else _bf16_or_f32(logits, "logits"), router_bias, topk_ids,
        topk_weights, threads)
    return ReferenceResult(**d)


def route(problem: MoeProblem, logits: np.ndarray, router_bias: Optional[np.ndarray] = None):
    """Host routing: (topk_ids int32 [T, k], topk_weights float32 [T, k])."""
    return _c.route(problem, _bf16_or_f32(logits, "logits"), router_bias)


# ---- GPU -----------------------------------------------------------------------------------------


def gpu_available() -> bool:
    """True when a Hopper (sm_90) CUDA device is present."""
    return _c.gpu_available()[0]


def gpu_unavailable_reason() -> str:
    """Why gpu_available() is False ('' when it is True)."""
    return _c.gpu_available()[1]


def workspace_size(problem: MoeProblem, tokens: Optional[int] = None) -> int:
    """Bytes of workspace a GPU call of `tokens` tokens (default: problem.tokens) needs. It grows with
    the token count up to the prefill's token chunk and is the same for every T <= 64 (decode)."""
    return _c.workspace_size(problem, tokens)


def make_plan(problem: MoeProblem, device: int = 0) -> str:
    """The launch plan the GPU call would use on `device`, printed."""
    return _c.make_plan(problem, device)


def prepack(problem: MoeProblem, weights: MoeWeights) -> PackedWeights:
    """Host weights -> the library's packed kernel layout (validates everything first)."""
    return _c.prepack(problem, weights)


def upload(problem: MoeProblem, packed: PackedWeights, device: int = 0,
           stream: int = 0) -> DeviceWeights:
    """Copies packed weights to CUDA device `device` and waits for the copy (not capturable)."""
    return _c.upload(problem, packed, device, stream)


_MATRIX_KEYS = ("data", "scales", "global_scale")


def _matrix(m: Any, name: str):
    """(data, scales, global_scale) of one matrix argument of prepack_device: a tuple / list of two
    or three items or a dict with those keys (global_scale optional: mxfp4 has none)."""
    if m is None:
        return None, None, None
    if isinstance(m, dict):
        unknown = set(m) - set(_MATRIX_KEYS)
        if unknown:
            raise Error(f"{name} has unknown keys {sorted(unknown)}; expected data, scales and "
                        "(nvfp4) global_scale")
        if "data" not in m or "scales" not in m:
            raise Error(f"{name} needs the keys data and scales (and global_scale for nvfp4)")
        return m["data"], m["scales"], m.get("global_scale")
    if isinstance(m, (tuple, list)) and len(m) in (2, 3):
        return m[0], m[1], (m[2] if len(m) == 3 else None)
    raise Error(f"{name} must be a tuple (data, scales[, global_scale]) or a dict with those keys, "
                f"got {type(m).__name__}")


def _torch_module():
    import sys

    return sys.modules.get("torch")


def _device_tensor(a: Any, name: str, float8_ok: Optional[str] = None) -> Any:
    """A device tensor argument of prepack_device as something the extension reads through DLPack:
    torch float8 tensors become their uint8 bits (float8_ok is the one float8 type accepted), an
    object with only __cuda_array_interface__ is wrapped by torch.as_tensor (no copy)."""
    torch = _torch_module()
    if torch is not None and isinstance(a, torch.Tensor):
        dt = str(a.dtype).replace("torch.", "")
        if dt.startswith("float8_"):
            if dt != float8_ok:
                want = "uint8" + (f" or {float8_ok}" if float8_ok else "")
                raise Error(f"{name} must have dtype {want}, got {dt}")
            return a.view(torch.uint8)
        return a
    if (a is not None and not hasattr(a, "__dlpack__") and hasattr(a, "__cuda_array_interface__")
            and torch is not None):
        return torch.as_tensor(a)  # a CUDA tensor over the same memory
    return a


def _device_tensors(a: Any, name: str, float8_ok: Optional[str] = None) -> Any:
    """A stacked tensor or a list / tuple of per-expert tensors (each passed through _device_tensor)."""
    if isinstance(a, (list, tuple)):
        return [_device_tensor(t, f"{name}[{i}]", float8_ok) for i, t in enumerate(a)]
    return _device_tensor(a, name, float8_ok)


def _first_tensor(values):
    for v in values:
        if isinstance(v, (list, tuple)):
            v = next(iter(v), None)
        if v is not None and hasattr(v, "data_ptr") and hasattr(v, "device"):
            return v
    return None


def _stream_int(stream: Any, tensors) -> int:
    """stream as a cudaStream_t integer: an int, a torch.cuda.Stream (or anything with
    .cuda_stream), or None: the current torch stream of the tensors' device for torch tensors,
    else 0 (the legacy default stream)."""
    if stream is None:
        torch = _torch_module()
        t = _first_tensor(tensors)
        if torch is not None and isinstance(t, torch.Tensor) and t.is_cuda:
            return torch.cuda.current_stream(t.device).cuda_stream
        return 0
    if hasattr(stream, "cuda_stream"):
        return stream.cuda_stream
    if isinstance(stream, bool) or not hasattr(stream, "__index__"):
        raise Error(f"stream must be an int (a cudaStream_t) or a torch.cuda.Stream, got "
                    f"{type(stream).__name__}")
    return stream


def prepack_device(problem: MoeProblem, *, down: Any, gate: Any = None, up: Any = None,
                   gate_up: Any = None,
                   gate_up_layout: Union[str, GateUpLayout] = "separate",
                   scale_layout: Union[str, ScaleLayout] = "linear",
                   direction: Union[str, ScaleDirection] = "decode",
                   gate_bias: Any = None, up_bias: Any = None, gate_up_bias: Any = None,
                   down_bias: Any = None, input_scale13: Any = None, input_scale2: Any = None,
                   stream: Any = None) -> DeviceWeights:
    """Packs checkpoint tensors that are already in GPU memory into DeviceWeights, on the GPU.

    The GPU counterpart of ``upload(problem, prepack(problem, make_weights(...)))``, with the same
    validation and errors and bitwise the same packed bytes, for tensors loaded straight to the
    device (torch CUDA tensors or any DLPack producer: CuPy, JAX, ...). The result lives on the
    tensors' device (all must be on one).

    Each matrix (gate, up, gate_up, down) is a tuple ``(data, scales, global_scale)`` or a dict with
    those keys; data and scales are either one tensor stacked over the E local experts
    ``[E, ...]`` or a list of E per-expert tensors, contiguous:
      data: uint8 [rows, cols/2]; scales: linear [rows, cols/16] uint8 or float8_e4m3fn (nvfp4),
      [rows, cols/32] uint8 or float8_e8m0fnu (E8M0, mxfp4), or with scale_layout="swizzled_128x4"
      (nvfp4) the 1-D stream [swizzled_size(rows, cols/16)];
      global_scale: nvfp4 only, a scalar or E numbers, read in `direction` (ModelOpt weight_scale_2
      is "decode", compressed-tensors weight_global_scale "encode"); leave it out for mxfp4.
    gate_up_layout "separate": gate [I, H] (None for relu2) and up [I, H]; "concatenated"
    (gate rows then up rows, transformers' gate_up_proj) or "interleaved" (even rows gate, odd rows
    up: gpt-oss): one gate_up [2I, H] with one global scale per expert. down: [H, I].
    Biases (iff problem.has_bias): float32 or bfloat16, [E, rows] or a list of E [rows] tensors
    (gate_bias / up_bias [I], gate_up_bias [2I] in the gate_up layout, down_bias [H]).
    input_scale13 / input_scale2: W4A4 activation scales (decode), a scalar or E numbers.
    stream: an int cudaStream_t or a torch.cuda.Stream; default: the current torch stream of the
    tensors' device for torch tensors, else 0. The call synchronizes it (not for graph capture).
    """
    if not isinstance(problem, MoeProblem):
        raise Error(f"problem must be an fp4moe.MoeProblem, got {type(problem).__name__}")
    problem.validate()
    E = problem.local_experts()
    fmt = problem.format
    f8 = "float8_e4m3fn" if fmt == Format.nvfp4 else "float8_e8m0fnu"
    mats = {}
    for name, m in (("gate", gate), ("up", up), ("gate_up", gate_up), ("down", down)):
        d, s, g = _matrix(m, name)
        mats[name] = (_device_tensors(d, f"{name}.data"), _device_tensors(s, f"{name}.scales", f8),
                      _per_expert(g, f"{name}.global_scale", E))
    biases = {n: _device_tensors(b, n, "bfloat16") for n, b in
              (("gate_bias", gate_bias), ("up_bias", up_bias), ("gate_up_bias", gate_up_bias),
               ("down_bias", down_bias))}
    tensors = [t for m in mats.values() for t in m[:2]] + list(biases.values())
    return _c.prepack_device(
        problem, *mats["gate"], *mats["up"], *mats["gate_up"], *mats["down"],
        biases["gate_bias"], biases["up_bias"], biases["gate_up_bias"], biases["down_bias"],
        _per_expert(input_scale13, "input_scale13", E), _per_expert(input_scale2, "input_scale2", E),
        _enum("gate_up_layout", gate_up_layout), _enum("scale_layout", scale_layout),
        _enum("direction", direction), _stream_int(stream, tensors))


class HostWeights:
    """A layer's weights on the host for the CPU reference: the problem and its MoeWeights in the
    checkpoint layout (validated against each other). What the PyTorch op and MoeExperts take to
    run on CPU tensors, as DeviceWeights are for CUDA tensors; needs no GPU. The CPU path is the
    reference layer (SPEC numerics, orders of magnitude slower than the GPU): for tests, small
    models and machines without a Hopper GPU."""

    __slots__ = ("_problem", "weights", "__weakref__")

    def __init__(self, problem: MoeProblem, weights: MoeWeights):
        if not isinstance(problem, MoeProblem):
            raise Error(f"problem must be an fp4moe.MoeProblem, got {type(problem).__name__}")
        if not isinstance(weights, MoeWeights):
            raise Error(f"weights must be fp4moe.MoeWeights, got {type(weights).__name__}")
        problem = problem.copy()
        problem.validate()
        _c.validate_weights(problem, weights)
        self._problem = problem
        self.weights = weights

    @property
    def problem(self) -> MoeProblem:
        """A copy of the problem (its token count is ignored: calls take T from x)."""
        return self._problem.copy()

    device = "cpu"

    def __repr__(self) -> str:
        return f"HostWeights({self._problem!r}, {self.weights!r})"


def to_device(problem: MoeProblem, weights: MoeWeights,
              device: Any = 0) -> Union[DeviceWeights, HostWeights]:
    """prepack + upload. `device` is an index, "cuda:N" or a torch.device; "cpu" (or
    torch.device("cpu")) gives HostWeights, which run the CPU reference on CPU tensors."""
    if _is_cpu(device):
        return HostWeights(problem, weights)
    return upload(problem, prepack(problem, weights), _device_index(device))


def _is_cpu(device: Any) -> bool:
    return device == "cpu" or getattr(device, "type", None) == "cpu"


def _device_index(device: Any) -> int:
    if isinstance(device, int) and not isinstance(device, bool):
        return device
    index = getattr(device, "index", None)
    if getattr(device, "type", None) == "cuda":
        return 0 if index is None else int(index)
    if isinstance(device, str) and device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        if not index.isdigit():
            raise Error(f"device must be 'cuda' or 'cuda:N' with N a device index, got {device!r}")
        return int(index)
    raise Error(f"device must be a CUDA device index, 'cuda:N', 'cpu' or a torch.device, got {device!r}")


def _is_torch_tensor(a: Any) -> bool:
    return type(a).__module__.startswith("torch") and hasattr(a, "data_ptr")


def moe_forward(weights: Union[DeviceWeights, HostWeights], x: Any, router_logits: Any = None, *,
                router_bias: Any = None, topk_ids: Any = None, topk_weights: Any = None,
                out: Any = None, workspace: Any = None, stream: Optional[int] = None) -> Any:
    """The layer on the GPU (DeviceWeights) or, for PyTorch CPU tensors, the CPU reference
    (HostWeights).

    PyTorch tensors go through the custom op torch.ops.fp4moe.moe_forward (on the current CUDA
    stream, capturable in CUDA graphs; `out` and `stream` are not accepted there). Other DLPack
    producers (CuPy, JAX, ...) need out (bf16 [T, H]), workspace (uint8, >= workspace_size(problem, T)) and
    stream (a cudaStream_t as int) and return `out`.

    x: bf16 [T, H]. Either router_logits [T, E] (float32 or bf16; with router_bias float32 [E] when
    the problem's routing has one) or topk_ids (int32 [T, k]) and topk_weights (float32 [T, k]).
    """
    if _is_torch_tensor(x):
        if out is not None or stream is not None:
            raise Error("with torch tensors the output is returned and the current CUDA stream is "
                        "used: do not pass out= or stream=")
        from ._torch import moe_forward as torch_forward

        return torch_forward(weights, x, router_logits, router_bias=router_bias,
                                  topk_ids=topk_ids, topk_weights=topk_weights,
                                  workspace=workspace)
    if isinstance(weights, HostWeights):
        raise Error("HostWeights run on PyTorch CPU tensors (torch.ops.fp4moe.moe_forward); for "
                    "NumPy arrays use fp4moe.reference_forward")
    if out is None or workspace is None or stream is None:
        raise Error("the DLPack path needs out (bf16 [T, H]), workspace (uint8, at least "
                    "workspace_size(problem, T) bytes) and stream (a cudaStream_t as int)")
    _c.moe_forward_dlpack(weights, x, out, workspace, stream, router_logits, router_bias,
                          topk_ids, topk_weights)
    return out


# ---- checkpoints ---------------------------------------------------------------------------------


def has_checkpoint_loader() -> bool:
    """Whether this build includes the checkpoint loader (fp4moe/checkpoint.h)."""
    return _c.has_checkpoint_loader()


@dataclasses.dataclass
class LoadedLayer:
    problem: MoeProblem
    weights: MoeWeights
    router_weight: np.ndarray  # float32 [E, H]
    router_bias: np.ndarray    # float32 [E], or empty when the routing has no bias
    warnings: Sequence[str]


def load_moe_layer(directory: Union[str, os.PathLike], layer: int, tokens: int = 1, *,
                   input_mode: Union[str, InputMode] = "w4a16", local_expert_offset: int = 0,
                   num_local_experts: int = 0) -> LoadedLayer:
    """Loads the routed experts and router of MoE layer `layer` of an FP4 checkpoint directory
    (ModelOpt NVFP4, compressed-tensors NVFP4 or gpt-oss MXFP4; see docs/checkpoints.md)."""
    if not has_checkpoint_loader():
        raise Error("this build of fp4moe has no checkpoint loader (include/fp4moe/checkpoint.h "
                    "was absent when it was built)")
    try:
        directory = os.fspath(directory)
    except TypeError:
        raise Error(f"directory must be a path (str or os.PathLike), got {type(directory).__name__}") from None
    d = _c.load_moe_layer(directory, layer, tokens, _enum("input_mode", input_mode),
                          local_expert_offset, num_local_experts)
    return LoadedLayer(**d)


# PyTorch integration: registers torch.ops.fp4moe.moe_forward when torch is installed.
# FP4MOE_NO_TORCH=1 skips it (importing torch takes seconds).
if os.environ.get("FP4MOE_NO_TORCH") != "1" and importlib.util.find_spec("torch") is not None:
    from ._torch import MoeExperts  # noqa: E402,F401  (also registers the op)

    __all__.append("MoeExperts")
