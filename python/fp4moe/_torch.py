"""PyTorch integration: the custom op ``torch.ops.fp4moe.moe_forward`` and the ``MoeExperts`` module.

The op::

    fp4moe::moe_forward(Tensor x, Tensor? router_logits, Tensor? router_bias, Tensor? topk_ids,
                        Tensor? topk_weights, int weights, Tensor? workspace) -> Tensor

``weights`` is the handle of a :class:`fp4moe.DeviceWeights` for CUDA tensors or of a
:class:`fp4moe.HostWeights` for CPU tensors (``fp4moe._torch.handle(w)``, or use
:class:`MoeExperts`, which does it for you). On CPU tensors the op runs the library's CPU reference
layer (``fp4moe.reference_forward``) with the same checks and errors: slow, meant for tests, small
models and machines without a Hopper GPU; the paragraphs below about streams, graphs and the
workspace concern the CUDA path (a CPU call checks a given workspace the same way and does not use
it). The op

* checks dtypes (x bf16, logits float32 or bf16, topk_ids int32, topk_weights / router_bias float32),
  shapes, contiguity and devices in Python and raises fp4moe.Error before anything launches;
* launches on ``torch.cuda.current_stream()``, allocates nothing but its bf16 [T, H] output
  (through PyTorch's caching allocator) and never synchronizes, so it can be captured in a CUDA
  graph and compiled with torch.compile (a fake implementation gives the output's shape);
* uses ``workspace`` when given (uint8, contiguous, at least ``fp4moe.workspace_size(problem, T)``
  bytes for a call of T tokens), else a workspace shared per device. The shared one is allocated
  with torch.empty when the weights get their handle (``handle()``, ``MoeExperts(...)``), sized for
  the problem's token count, and grows on the first call with more tokens than any before (an
  outgrown one is kept for the life of the process, so a captured graph never sees its workspace
  move). Capture a graph after an eager call of the same T (the usual warm-up) so that the growth
  happens outside the capture. Calls that may run concurrently on different streams must each pass
  their own workspace.

Weights must outlive every graph or compiled function that uses them: the handle is looked up on
each eager call, but a captured graph keeps raw device pointers.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch

from . import _C
from ._C import DeviceWeights, Error

Weights = Union[DeviceWeights, "HostWeights"]

def _host_weights_class():
    from . import HostWeights  # the package imports this module at its end

    return HostWeights


class _Info:
    """What the op needs of the weights on every call, read once (not per call). `device` is
    cuda:N for DeviceWeights and cpu for HostWeights."""

    __slots__ = ("hidden", "experts", "top_k", "router_bias", "precomputed_only", "device",
                 "workspace_bytes", "problem", "_need")

    def __init__(self, w: Weights):
        p = w.problem
        self.hidden, self.experts, self.top_k = p.hidden, p.num_experts, p.top_k
        self.router_bias = p.routing.has_bias
        self.precomputed_only = p.routing.method == _C.RoutingMethod.precomputed
        if isinstance(w, DeviceWeights):
            self.device = torch.device("cuda", w.device)
        else:
            self.device = torch.device("cpu")
        self.workspace_bytes = _C.workspace_size(p)  # for problem.tokens
        self.problem = p
        self._need: Dict[int, int] = {}

    def need(self, tokens: int) -> int:
        """Workspace bytes of a call with `tokens` tokens (cached per token count)."""
        n = self._need.get(tokens)
        if n is None:
            n = self._need[tokens] = _C.workspace_size(self.problem, tokens)
        return n

    def where(self) -> str:
        if self.device.type == "cpu":
            return "HostWeights (CPU reference)"
        return f"DeviceWeights on {self.device}"


_handles: "weakref.WeakValueDictionary[int, Weights]" = weakref.WeakValueDictionary()
_info: Dict[int, _Info] = {}
_ids: Dict[int, int] = {}  # id(weights) -> handle
_next = itertools.count(1)
_lock = threading.Lock()

_workspaces: Dict[Optional[int], torch.Tensor] = {}  # device index -> the shared workspace
_retired: "list[torch.Tensor]" = []  # outgrown shared workspaces, kept for graphs captured with them


def _forget(obj_id: int, h: int) -> None:
    _ids.pop(obj_id, None)
    _info.pop(h, None)


def handle(weights: Weights) -> int:
    """The integer the op takes for `weights` (stable for the object's lifetime). For
    DeviceWeights the first call also allocates the shared workspace for the weights' problem."""
    h = _ids.get(id(weights))
    if h is not None and _handles.get(h) is weights:
        return h
    if not isinstance(weights, (DeviceWeights, _host_weights_class())):
        raise Error("weights must be fp4moe.DeviceWeights (CUDA) or fp4moe.HostWeights (CPU), got "
                    f"{type(weights).__name__}")
    info = _Info(weights)
    with _lock:
        h = next(_next)
        _handles[h] = weights
        _info[h] = info
        _ids[id(weights)] = h
        weakref.finalize(weights, _forget, id(weights), h)
    if info.device.type == "cuda":
        _workspace(info, info.device)
    return h


def weights_of(h: int) -> Tuple[Weights, _Info]:
    w = _handles.get(h)
    info = _info.get(h)
    if w is None or info is None:
        raise Error(f"fp4moe weights handle {h} does not exist or its weights were freed; keep "
                    "the DeviceWeights / HostWeights (or the MoeExperts module) alive while calling "
                    "the op")
    return w, info


def _check(t: Optional[torch.Tensor], name: str, dtypes, shape, device: torch.device) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise Error(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        want = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise Error(f"{name} must have dtype {want}, got {str(t.dtype).replace('torch.', '')}")
    if tuple(t.shape) != tuple(shape):
        want = "[" + ", ".join(str(s) for s in shape) + "]"
        raise Error(f"{name} must have shape {want}, got {list(t.shape)}")
    if t.device != device:
        raise Error(f"{name} is on {t.device} but must be on {device} (where x and the weights are)")
    if not t.is_contiguous():
        raise Error(f"{name} must be contiguous; call .contiguous() first")


def validate(w: _Info, x: torch.Tensor, router_logits: Optional[torch.Tensor],
             router_bias: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
             topk_weights: Optional[torch.Tensor], workspace: Optional[torch.Tensor]) -> None:
    """Every check of the op's arguments, with the message a caller can act on."""
    if not isinstance(x, torch.Tensor):
        raise Error(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise Error(f"x must be 2-D [tokens, {w.hidden}], got shape {list(x.shape)}")
    if x.device != w.device:
        if w.device.type == "cuda" and x.device.type == "cpu":
            raise Error(f"x is on cpu but the weights are {w.where()}: pass CUDA tensors, or "
                        "run on the CPU with HostWeights (fp4moe.to_device(problem, weights, "
                        "'cpu'))")
        if w.device.type == "cpu":
            raise Error(f"x is on {x.device} but the weights are {w.where()}: pass CPU tensors, "
                        "or upload the weights (fp4moe.to_device(problem, weights, device))")
        raise Error(f"x is on {x.device} but the weights are {w.where()}")
    T = x.shape[0]
    dev = x.device
    _check(x, "x", (torch.bfloat16,), (T, w.hidden), dev)
    precomputed = topk_ids is not None or topk_weights is not None
    if precomputed:
        if topk_ids is None or topk_weights is None:
            raise Error("pass topk_ids and topk_weights together")
        if router_logits is not None:
            raise Error("pass either router_logits or topk_ids / topk_weights, not both")
        if router_bias is not None:
            raise Error("router_bias is used by the routing on router_logits; with topk_ids / "
                        "topk_weights pass none")
        _check(topk_ids, "topk_ids", (torch.int32,), (T, w.top_k), dev)
        _check(topk_weights, "topk_weights", (torch.float32,), (T, w.top_k), dev)
    else:
        if router_logits is None:
            raise Error(f"pass router_logits [{T}, {w.experts}] or topk_ids / topk_weights")
        if w.precomputed_only:
            raise Error("these weights were uploaded for precomputed routing: pass topk_ids and "
                        "topk_weights")
        _check(router_logits, "router_logits", (torch.float32, torch.bfloat16),
               (T, w.experts), dev)
        if w.router_bias and router_bias is None:
            raise Error(f"the routing has a router bias: pass router_bias float32 [{w.experts}]")
        if not w.router_bias and router_bias is not None:
            raise Error("the routing has no router bias (routing.has_bias is False): pass none")
        _check(router_bias, "router_bias", (torch.float32,), (w.experts,), dev)
    if workspace is not None:
        _check(workspace, "workspace", (torch.uint8,), (workspace.numel(),), dev)
        need = w.need(x.shape[0])
        if workspace.numel() < need:
            raise Error(f"workspace holds {workspace.numel()} bytes, a call of {x.shape[0]} tokens needs "
                        f"{need} (fp4moe.workspace_size(problem, tokens))")


def _workspace(w: _Info, device: torch.device, tokens: Optional[int] = None) -> Tuple[int, int]:
    """The shared workspace of `device`, grown to what a call of `tokens` tokens (default: the
    problem's) needs."""
    nbytes = max(w.workspace_bytes if tokens is None else w.need(tokens), 256)
    key = device.index
    ws = _workspaces.get(key)
    if ws is None or ws.numel() < nbytes:
        # Normally reached from handle() or an eager call, outside any capture; inside one,
        # torch.empty takes the memory from the graph's pool, which is legal, and the cache keeps it
        # alive. It only grows (the largest call so far), so a graph captured earlier keeps its own.
        if ws is not None:
            _retired.append(ws)  # a captured graph may still point at it
        ws = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _workspaces[key] = ws
    return ws.data_ptr(), ws.numel()


def _forward_cuda(x: torch.Tensor, router_logits: Optional[torch.Tensor],
                  router_bias: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
                  topk_weights: Optional[torch.Tensor], weights: int,
                  workspace: Optional[torch.Tensor]) -> torch.Tensor:
    w, info = weights_of(weights)
    validate(info, x, router_logits, router_bias, topk_ids, topk_weights, workspace)
    T, H = x.shape
    out = torch.empty((T, H), dtype=torch.bfloat16, device=x.device)
    if T == 0:
        return out
    stream = torch.cuda.current_stream(x.device).cuda_stream
    if workspace is not None:
        ws_ptr, ws_bytes = workspace.data_ptr(), workspace.numel()
    else:
        ws_ptr, ws_bytes = _workspace(info, x.device, T)
    pre = topk_ids is not None
    _C.moe_forward_ptr(
        w, T, x.data_ptr(), out.data_ptr(),
        0 if pre else router_logits.data_ptr(),
        (not pre) and router_logits.dtype == torch.bfloat16,
        router_bias.data_ptr() if router_bias is not None else 0,
        topk_ids.data_ptr() if pre else 0,
        topk_weights.data_ptr() if pre else 0,
        ws_ptr, ws_bytes, stream)
    return out


def _bits(t: torch.Tensor) -> np.ndarray:
    """A bf16 CPU tensor as a uint16 array of its bits (no copy); float32 as is."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _forward_cpu(x: torch.Tensor, router_logits: Optional[torch.Tensor],
                 router_bias: Optional[torch.Tensor], topk_ids: Optional[torch.Tensor],
                 topk_weights: Optional[torch.Tensor], weights: int,
                 workspace: Optional[torch.Tensor]) -> torch.Tensor:
    w, info = weights_of(weights)
    validate(info, x, router_logits, router_bias, topk_ids, topk_weights, workspace)
    T, H = x.shape
    if T == 0:
        return torch.empty((0, H), dtype=torch.bfloat16)
    # The CPU reference layer (SPEC "The layer"), on copies of the inputs; threads as PyTorch's.
    r = _C.reference_forward(
        info.problem, w.weights, _bits(x.detach()),
        None if router_logits is None else _bits(router_logits.detach()),
        None if router_bias is None else router_bias.detach().numpy(),
        None if topk_ids is None else topk_ids.detach().numpy(),
        None if topk_weights is None else topk_weights.detach().numpy(),
        max(1, torch.get_num_threads()))
    return torch.from_numpy(r["out_bf16_bits"].view(np.int16)).view(torch.bfloat16)


def _forward_fake(x, router_logits, router_bias, topk_ids, topk_weights, weights, workspace):
    if x.dtype != torch.bfloat16:
        raise Error(f"x must have dtype bfloat16, got {str(x.dtype).replace('torch.', '')}")
    if x.dim() != 2:
        raise Error(f"x must be 2-D [tokens, hidden], got shape {list(x.shape)}")
    return x.new_empty((x.shape[0], x.shape[1]), dtype=torch.bfloat16)


_SCHEMA = ("moe_forward(Tensor x, Tensor? router_logits, Tensor? router_bias, Tensor? topk_ids, "
           "Tensor? topk_weights, int weights, Tensor? workspace) -> Tensor")

# The op is defined once per process (a second import of the module, e.g. from another path,
# must not redefine it).
if not hasattr(torch.ops, "fp4moe") or not hasattr(torch.ops.fp4moe, "moe_forward"):
    _lib = torch.library.Library("fp4moe", "DEF")
    _lib.define(_SCHEMA)
    _lib.impl("moe_forward", _forward_cuda, "CUDA")
    _lib.impl("moe_forward", _forward_cpu, "CPU")
    torch.library.register_fake("fp4moe::moe_forward", _forward_fake, lib=_lib)


def moe_forward(weights: Weights, x: torch.Tensor,
                router_logits: Optional[torch.Tensor] = None, *,
                router_bias: Optional[torch.Tensor] = None,
                topk_ids: Optional[torch.Tensor] = None,
                topk_weights: Optional[torch.Tensor] = None,
                workspace: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The layer: bf16 [T, H]. See the module docstring for the contract."""
    return torch.ops.fp4moe.moe_forward(x, router_logits, router_bias, topk_ids, topk_weights,
                                        handle(weights), workspace)


class MoeExperts(torch.nn.Module):
    """The routed experts of one MoE block as a module: forward(x, router_logits) -> bf16 [T, H].

    Holds the weights (so the handle stays valid): DeviceWeights run on CUDA tensors of their
    device, HostWeights (``fp4moe.to_device(problem, weights, "cpu")``, no GPU needed) run the CPU
    reference on CPU tensors. When the routing has a router bias, it is kept as a buffer on the
    weights' device. Inputs of any leading shape [..., H] are flattened to [T, H] and the output is
    reshaped back. The weights do not move with ``.to()``: build the module for the device it runs
    on.
    """

    def __init__(self, weights: Weights, router_bias: Optional[torch.Tensor] = None):
        super().__init__()
        self.weights = weights
        self.handle = handle(weights)
        self.problem = weights.problem
        if router_bias is not None:
            router_bias = router_bias.to(device=_Info(weights).device, dtype=torch.float32)
        self.register_buffer("router_bias", router_bias, persistent=False)

    @property
    def device(self) -> torch.device:
        """Where the weights are: cuda:N (DeviceWeights) or cpu (HostWeights)."""
        return _info[self.handle].device

    def forward(self, x: torch.Tensor, router_logits: Optional[torch.Tensor] = None,
                topk_ids: Optional[torch.Tensor] = None,
                topk_weights: Optional[torch.Tensor] = None) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if router_logits is not None:
            router_logits = router_logits.reshape(x2.shape[0], router_logits.shape[-1])
        bias = self.router_bias if topk_ids is None else None
        out = torch.ops.fp4moe.moe_forward(x2, router_logits, bias, topk_ids, topk_weights,
                                           self.handle, None)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        return repr(self.problem)
