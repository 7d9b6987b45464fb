"""fp4moe: FP4 Mixture-of-Experts layers on Hopper (native extension)."""

import enum
from typing import Annotated, Optional

import numpy
from numpy.typing import NDArray

class Error(ValueError, RuntimeError):
    """Every failure fp4moe reports; the message names the argument and what was expected."""


class Format(enum.Enum):
    """FP4 weight format (SPEC "FP4 formats")."""

    nvfp4 = 0

    mxfp4 = 1

    @staticmethod
    def parse(name: str) -> Format:
        """
        The member with this name; raises fp4moe.Error listing the accepted names.
        """

    @property
    def label(self) -> str:
        """The name the library prints and parses."""

class ScaleDirection(enum.Enum):
    """
    Direction of an NVFP4 global scale: decode (value = e2m1 * s * g, ModelOpt weight_scale_2) or encode (value = e2m1 * s / g).
    """

    decode = 0

    encode = 1

class ScaleLayout(enum.Enum):
    """Layout of a block-scale matrix."""

    linear = 0

    swizzled_128x4 = 1

class RoutingMethod(enum.Enum):
    softmax_topk = 0

    topk_softmax = 1

    deepseek_v3 = 2

    llama4 = 3

    sigmoid_topk = 4

    precomputed = 5

    @staticmethod
    def parse(name: str) -> RoutingMethod:
        """
        The member with this name; raises fp4moe.Error listing the accepted names.
        """

    @property
    def label(self) -> str:
        """The name the library prints and parses."""

class Activation(enum.Enum):
    swiglu = 0

    swiglu_oai = 1

    relu2 = 2

    geglu_tanh = 3

    @staticmethod
    def parse(name: str) -> Activation:
        """
        The member with this name; raises fp4moe.Error listing the accepted names.
        """

    @property
    def label(self) -> str:
        """The name the library prints and parses."""

class InputMode(enum.Enum):
    w4a16 = 0

    w4a4 = 1

    @staticmethod
    def parse(name: str) -> InputMode:
        """
        The member with this name; raises fp4moe.Error listing the accepted names.
        """

    @property
    def label(self) -> str:
        """The name the library prints and parses."""

class DType(enum.Enum):
    """Element type of router logits."""

    f32 = 0

    bf16 = 1

    @staticmethod
    def parse(name: str) -> DType:
        """
        The member with this name; raises fp4moe.Error listing the accepted names.
        """

    @property
    def label(self) -> str:
        """The name the library prints and parses."""

class RoutingConfig:
    def __init__(self) -> None: ...

    @property
    def method(self) -> RoutingMethod: ...

    @method.setter
    def method(self, arg: RoutingMethod, /) -> None: ...

    @property
    def renormalize(self) -> bool: ...

    @renormalize.setter
    def renormalize(self, arg: bool, /) -> None: ...

    @property
    def n_group(self) -> int: ...

    @n_group.setter
    def n_group(self, arg: int, /) -> None: ...

    @property
    def topk_group(self) -> int: ...

    @topk_group.setter
    def topk_group(self, arg: int, /) -> None: ...

    @property
    def routed_scaling_factor(self) -> float: ...

    @routed_scaling_factor.setter
    def routed_scaling_factor(self, arg: float, /) -> None: ...

    @property
    def has_bias(self) -> bool: ...

    @has_bias.setter
    def has_bias(self, arg: bool, /) -> None: ...

    @property
    def logits_dtype(self) -> DType: ...

    @logits_dtype.setter
    def logits_dtype(self, arg: DType, /) -> None: ...

class ActivationConfig:
    def __init__(self) -> None: ...

    @property
    def kind(self) -> Activation: ...

    @kind.setter
    def kind(self, arg: Activation, /) -> None: ...

    @property
    def alpha(self) -> float: ...

    @alpha.setter
    def alpha(self, arg: float, /) -> None: ...

    @property
    def limit(self) -> float: ...

    @limit.setter
    def limit(self, arg: float, /) -> None: ...

class MoeProblem:
    """
    What one MoE layer call computes (SPEC "The layer"). Fields are plain attributes; validate() checks their consistency.
    """

    def __init__(self) -> None: ...

    def __copy__(self) -> MoeProblem: ...

    def copy(self) -> MoeProblem:
        """An independent copy."""

    @property
    def tokens(self) -> int: ...

    @tokens.setter
    def tokens(self, arg: int, /) -> None: ...

    @property
    def hidden(self) -> int: ...

    @hidden.setter
    def hidden(self, arg: int, /) -> None: ...

    @property
    def intermediate(self) -> int: ...

    @intermediate.setter
    def intermediate(self, arg: int, /) -> None: ...

    @property
    def num_experts(self) -> int: ...

    @num_experts.setter
    def num_experts(self, arg: int, /) -> None: ...

    @property
    def top_k(self) -> int: ...

    @top_k.setter
    def top_k(self, arg: int, /) -> None: ...

    @property
    def local_expert_offset(self) -> int: ...

    @local_expert_offset.setter
    def local_expert_offset(self, arg: int, /) -> None: ...

    @property
    def num_local_experts(self) -> int: ...

    @num_local_experts.setter
    def num_local_experts(self, arg: int, /) -> None: ...

    @property
    def format(self) -> Format: ...

    @format.setter
    def format(self, arg: Format, /) -> None: ...

    @property
    def input_mode(self) -> InputMode: ...

    @input_mode.setter
    def input_mode(self, arg: InputMode, /) -> None: ...

    @property
    def activation(self) -> ActivationConfig: ...

    @activation.setter
    def activation(self, arg: ActivationConfig, /) -> None: ...

    @property
    def routing(self) -> RoutingConfig: ...

    @routing.setter
    def routing(self, arg: RoutingConfig, /) -> None: ...

    @property
    def has_bias(self) -> bool: ...

    @has_bias.setter
    def has_bias(self, arg: bool, /) -> None: ...

    def local_experts(self) -> int:
        """Experts this layer holds."""

    def gated(self) -> bool: ...

    def w13_rows(self) -> int: ...

    def validate(self) -> None:
        """Raises fp4moe.Error naming the first inconsistent field."""

    def __repr__(self) -> str: ...

class Preset:
    """A model preset of SPEC "Model presets"."""

    @property
    def name(self) -> str: ...

    @property
    def hidden(self) -> int: ...

    @property
    def intermediate(self) -> int: ...

    @property
    def num_experts(self) -> int: ...

    @property
    def top_k(self) -> int: ...

    @property
    def routing(self) -> RoutingConfig: ...

    @property
    def activation(self) -> ActivationConfig: ...

    @property
    def format(self) -> Format: ...

    @property
    def has_bias(self) -> bool: ...

    @property
    def notes(self) -> str: ...

    def problem(self, tokens: int) -> MoeProblem:
        """
        A problem for `tokens` tokens with this preset's shapes, routing and activation.
        """

    def __repr__(self) -> str: ...

def presets() -> list[Preset]:
    """Every model preset."""

def find_preset(name: str) -> Preset:
    """
    The preset called `name`; raises fp4moe.Error listing the known names otherwise.
    """

class QuantizedMatrix:
    """
    One FP4 matrix [rows, cols] in the checkpoint layout: two codes per byte along K (element 2j in the low nibble), linear block scales [rows, cols / block], global scale in the decode direction.
    """

    def __init__(self, data: Annotated[NDArray, dict(writable=False)], scales: Annotated[NDArray, dict(writable=False)], format: Format = Format.nvfp4, global_scale: float = 1.0, direction: ScaleDirection = ScaleDirection.decode, scale_layout: ScaleLayout = ScaleLayout.linear) -> None:
        """
        data: uint8 [rows, cols / 2]; scales: uint8 [rows, cols / block] (E4M3 codes for nvfp4, E8M0 for mxfp4), or the 1-D padded swizzled_128x4 stream; global_scale is read in `direction` and stored in the decode direction (must be 1 for mxfp4).
        """

    @property
    def format(self) -> Format: ...

    @property
    def rows(self) -> int: ...

    @property
    def cols(self) -> int: ...

    @property
    def global_scale(self) -> float:
        """Decode direction."""

    @property
    def block(self) -> int: ...

    @property
    def data(self) -> NDArray[numpy.uint8]:
        """A copy of the packed codes, uint8 [rows, cols / 2]."""

    @property
    def scales(self) -> NDArray[numpy.uint8]:
        """A copy of the linear block scales, uint8 [rows, cols / block]."""

    def element(self, row: int, col: int) -> float: ...

    def __repr__(self) -> str: ...

def quantize_nvfp4(x: Annotated[NDArray, dict(writable=False)], global_scale: float | None = None, direction: ScaleDirection = ScaleDirection.decode) -> QuantizedMatrix:
    """
    NVFP4 with the ModelOpt recipe. x: float32 [rows, cols], cols a multiple of 16. global_scale is read in `direction`; None derives it from amax(|x|) / (6 * 448).
    """

def quantize_mxfp4(x: Annotated[NDArray, dict(writable=False)]) -> QuantizedMatrix:
    """MXFP4 per OCP MX v1.0. x: float32 [rows, cols], cols a multiple of 32."""

def dequantize(m: QuantizedMatrix) -> NDArray[numpy.float32]:
    """float32 [rows, cols] values of an FP4 matrix."""

def nvfp4_global_scale(amax: float) -> float:
    """
    Decode-direction NVFP4 global scale for a tensor of largest magnitude amax.
    """

def convert_global_scale(g: float, source: ScaleDirection, target: ScaleDirection) -> float:
    """Converts a global scale between directions (the reciprocal)."""

def swizzle_scales(scales: Annotated[NDArray, dict(writable=False)]) -> NDArray[numpy.uint8]:
    """
    Linear block scales uint8 [rows, kcols] -> the 1-D swizzled 128x4 byte stream (rows padded to 128, columns to 4; padding is 0).
    """

def unswizzle_scales(scales: Annotated[NDArray, dict(writable=False)], rows: int, kcols: int) -> NDArray[numpy.uint8]:
    """The swizzled 128x4 byte stream -> linear uint8 [rows, kcols]."""

def swizzled_size(rows: int, kcols: int) -> int:
    """Padded byte count of the swizzled 128x4 layout."""

class ExpertWeights:
    """One expert's FP4 matrices, biases and input scales."""

    @property
    def gate(self) -> QuantizedMatrix: ...

    @property
    def up(self) -> QuantizedMatrix: ...

    @property
    def down(self) -> QuantizedMatrix: ...

    @property
    def gate_bias(self) -> NDArray[numpy.float32]: ...

    @property
    def up_bias(self) -> NDArray[numpy.float32]: ...

    @property
    def down_bias(self) -> NDArray[numpy.float32]: ...

    @property
    def input_scale13(self) -> float: ...

    @property
    def input_scale2(self) -> float: ...

class MoeWeights:
    """The local experts of one layer on the host, in the checkpoint layout."""

    @property
    def format(self) -> Format: ...

    @property
    def hidden(self) -> int: ...

    @property
    def intermediate(self) -> int: ...

    @property
    def num_experts(self) -> int: ...

    def expert(self, e: int) -> ExpertWeights: ...

    def __len__(self) -> int: ...

    def __repr__(self) -> str: ...

def make_weights(problem: MoeProblem, gate: Annotated[NDArray, dict(writable=False)] | None, gate_scales: Annotated[NDArray, dict(writable=False)] | None, up: Annotated[NDArray, dict(writable=False)], up_scales: Annotated[NDArray, dict(writable=False)], down: Annotated[NDArray, dict(writable=False)], down_scales: Annotated[NDArray, dict(writable=False)], gate_global_scale: Annotated[NDArray, dict(writable=False)] | None, up_global_scale: Annotated[NDArray, dict(writable=False)] | None, down_global_scale: Annotated[NDArray, dict(writable=False)] | None, gate_bias: Annotated[NDArray, dict(writable=False)] | None, up_bias: Annotated[NDArray, dict(writable=False)] | None, down_bias: Annotated[NDArray, dict(writable=False)] | None, input_scale13: Annotated[NDArray, dict(writable=False)] | None, input_scale2: Annotated[NDArray, dict(writable=False)] | None, direction: ScaleDirection, scale_layout: ScaleLayout) -> MoeWeights: ...

def random_weights(problem: MoeProblem, seed: int) -> MoeWeights:
    """
    Random weights for tests and benchmarks, quantized with the library's quantizer.
    """

def validate_weights(problem: MoeProblem, weights: MoeWeights) -> None: ...

def reference_forward(problem: MoeProblem, weights: MoeWeights, x: Annotated[NDArray, dict(writable=False)], logits: Annotated[NDArray, dict(writable=False)] | None, router_bias: Annotated[NDArray, dict(writable=False)] | None, topk_ids: Annotated[NDArray, dict(writable=False)] | None, topk_weights: Annotated[NDArray, dict(writable=False)] | None, threads: int) -> dict: ...

def route(problem: MoeProblem, logits: Annotated[NDArray, dict(writable=False)], router_bias: Annotated[NDArray, dict(writable=False)] | None = None) -> tuple:
    """Host routing: (topk_ids int32 [T, k], topk_weights float32 [T, k])."""

class PackedLayout:
    """Sizes of the library's packed kernel layout."""

    @property
    def hidden(self) -> int: ...

    @property
    def intermediate(self) -> int: ...

    @property
    def experts(self) -> int: ...

    @property
    def format(self) -> Format: ...

    @property
    def gated(self) -> bool: ...

    @property
    def has_bias(self) -> bool: ...

    @property
    def total_bytes(self) -> int: ...

    def checkpoint_bytes_per_expert(self) -> int: ...

class PackedWeights:
    """Weights in the packed kernel layout, on the host."""

    @property
    def layout(self) -> PackedLayout: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def bytes(self) -> NDArray[numpy.uint8]:
        """A copy of the packed bytes, uint8 [nbytes]."""

def prepack(problem: MoeProblem, weights: MoeWeights) -> PackedWeights:
    """
    Converts host weights into the packed kernel layout; validates everything first.
    """

class DeviceWeights:
    """
    Packed weights in the memory of one CUDA device, with the problem they were packed for. Freed when the object is collected or on release().
    """

    @property
    def problem(self) -> MoeProblem:
        """
        A copy of the problem (its token count is ignored: calls take T from x).
        """

    @property
    def device(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    @property
    def released(self) -> bool: ...

    @property
    def layout(self) -> PackedLayout:
        """Sizes of the packed layout (as PackedWeights.layout)."""

    def download(self) -> NDArray[numpy.uint8]:
        """
        A copy of the packed bytes on the host, uint8 [nbytes] (synchronizes): the same bytes as PackedWeights.bytes of the host prepack.
        """

    def release(self) -> None:
        """Frees the device memory now."""

    def __repr__(self) -> str: ...

def upload(problem: MoeProblem, packed: PackedWeights, device: int = 0, stream: int = 0) -> DeviceWeights:
    """
    Copies packed weights to `device` (synchronizes `stream` once: not for use in capture).
    """

class GateUpLayout(enum.Enum):
    """
    How a checkpoint stores the gate and up projections: two tensors, or one [2I, H] tensor with gate rows then up rows (concatenated) or alternating (interleaved, gpt-oss).
    """

    separate = 0

    concatenated = 1

    interleaved = 2

# Tensors: DLPack producers (stacked [E, ...]) or lists of E of them; global and input scales float32 [E].
def prepack_device(problem: MoeProblem, gate_data: object | None, gate_scales: object | None, gate_global_scale: Annotated[NDArray, dict(writable=False)] | None, up_data: object | None, up_scales: object | None, up_global_scale: Annotated[NDArray, dict(writable=False)] | None, gate_up_data: object | None, gate_up_scales: object | None, gate_up_global_scale: Annotated[NDArray, dict(writable=False)] | None, down_data: object | None, down_scales: object | None, down_global_scale: Annotated[NDArray, dict(writable=False)] | None, gate_bias: object | None, up_bias: object | None, gate_up_bias: object | None, down_bias: object | None, input_scale13: Annotated[NDArray, dict(writable=False)] | None, input_scale2: Annotated[NDArray, dict(writable=False)] | None, gate_up_layout: GateUpLayout, scale_layout: ScaleLayout, direction: ScaleDirection, stream: int) -> DeviceWeights:
    """
    Packs checkpoint tensors already on a CUDA device (DLPack) into DeviceWeights on that device. Checks every argument before anything launches; synchronizes `stream`.
    """

def workspace_size(problem: MoeProblem, tokens: Optional[int] = None) -> int:
    """
    Workspace bytes a GPU call of `tokens` tokens (default: problem.tokens) needs. It grows with the token count up to the prefill's token chunk, and is the same for every T <= 64 (decode).
    """

def gpu_available() -> tuple:
    """
    (True, '') when a Hopper (sm_90) CUDA device is present, else (False, reason).
    """

def make_plan(problem: MoeProblem, device: int = 0) -> str:
    """The launch plan run() would use, printed."""

def moe_forward_dlpack(weights: DeviceWeights, x: Annotated[NDArray, dict(writable=False)], out: NDArray, workspace: NDArray, stream: int, logits: Annotated[NDArray, dict(writable=False)] | None = None, router_bias: Annotated[NDArray, dict(writable=False)] | None = None, topk_ids: Annotated[NDArray, dict(writable=False)] | None = None, topk_weights: Annotated[NDArray, dict(writable=False)] | None = None) -> None: ...

def moe_forward_ptr(weights: DeviceWeights, tokens: int, x: int, out: int, logits: int, logits_bf16: bool, router_bias: int, topk_ids: int, topk_weights: int, workspace: int, workspace_bytes: int, stream: int) -> None: ...

def time_run(weights: DeviceWeights, tokens: int, x: int, out: int, logits: int, logits_bf16: bool, topk_ids: int, topk_weights: int, workspace: int, workspace_bytes: int, stream: int, iters: int) -> tuple[float, float]: ...

def has_checkpoint_loader() -> bool: ...

# Present when the extension was built with include/fp4moe/checkpoint.h (has_checkpoint_loader()).
def load_moe_layer(dir: str, layer: int, tokens: int, input_mode: InputMode, local_expert_offset: int, num_local_experts: int) -> dict: ...
