"""Layers for the tests of fp4moe.prepack_device: random checkpoint tensors of a problem in every
layout prepack_device accepts, the host weights made from the same tensors (the oracle: the host
prepack of those), and the call that uploads them with torch and packs them on the device.
Imported by test_prepack_device.py (host tensors: the checks up to the device) and
test_prepack_device_gpu.py (bitwise against the host prepack) after they have imported fp4moe.
"""

import ml_dtypes
import numpy as np

import fp4moe

F32 = np.float32


def random_matrix(rng, E, rows, cols, fmt):
    """Random packed codes [E, rows, cols/2] and valid linear block scales [E, rows, cols/block]."""
    data = rng.integers(0, 256, size=(E, rows, cols // 2), dtype=np.uint8)
    if fmt == "nvfp4":
        s = rng.uniform(0.05, 4.0, size=(E, rows, cols // 16)).astype(ml_dtypes.float8_e4m3fn)
        return data, s.view(np.uint8)
    return data, rng.integers(118, 130, size=(E, rows, cols // 32), dtype=np.uint8)


def fuse_rows(gate, up, layout):
    """[E, 2I, ...] from gate and up [E, I, ...]: concatenated (gate rows, then up rows) or
    interleaved (row 2i gate i, row 2i + 1 up i)."""
    if layout == "concatenated":
        return np.ascontiguousarray(np.concatenate([gate, up], axis=1))
    out = np.empty((gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]), gate.dtype)
    out[:, 0::2], out[:, 1::2] = gate, up
    return out


def swizzle(scales):
    return np.stack([fp4moe.swizzle_scales(s) for s in scales])


def checkpoint(rng, p, gate_up_layout="separate", direction="decode", bias_dtype="float32"):
    """Random checkpoint tensors for problem p (NumPy) and the host weights made from them."""
    E, H, I = p.local_experts(), p.hidden, p.intermediate
    fmt = p.format.name
    gated = p.activation.kind != fp4moe.Activation.relu2
    nv = fmt == "nvfp4"
    gate = random_matrix(rng, E, I, H, fmt) if gated else (None, None)
    up = random_matrix(rng, E, I, H, fmt)
    down = random_matrix(rng, E, H, I, fmt)
    gs = lambda: rng.uniform(0.002, 0.05, E).astype(F32) if nv else None  # noqa: E731
    gg, ug, dg = gs(), gs(), gs()
    if nv and direction == "encode":
        gg, ug, dg = (None if g is None else (1.0 / g).astype(F32) for g in (gg, ug, dg))
    if gate_up_layout != "separate" and nv:
        ug = gg  # one global scale for the fused tensor
    bias = None
    if p.has_bias:
        dt = ml_dtypes.bfloat16 if bias_dtype == "bfloat16" else F32
        bias = {n: (rng.standard_normal((E, r)) * 0.1).astype(dt)
                for n, r in (("gate", I), ("up", I), ("down", H))}
    ckpt = dict(gate=gate, up=up, down=down, g=(gg, ug, dg), bias=bias)
    host = fp4moe.make_weights(
        p, gate=gate[0], gate_scales=gate[1], up=up[0], up_scales=up[1], down=down[0],
        down_scales=down[1], gate_global_scale=gg if gated else None, up_global_scale=ug,
        down_global_scale=dg, gate_bias=None if bias is None or not gated else bias["gate"],
        up_bias=None if bias is None else bias["up"], down_bias=None if bias is None else bias["down"],
        input_scale13=rng.uniform(0.5, 2, E).astype(F32) if p.input_mode.name == "w4a4" else None,
        input_scale2=rng.uniform(0.5, 2, E).astype(F32) if p.input_mode.name == "w4a4" else None,
        direction=direction)
    return ckpt, host


def tensor(a, dev, per_expert=False):
    """A NumPy array (uint8, float32 or ml_dtypes bfloat16) as a torch tensor on `dev`, or as a list
    of per-expert tensors."""
    import torch

    if a is None:
        return None
    if a.dtype == ml_dtypes.bfloat16:
        t = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    else:
        t = torch.from_numpy(np.ascontiguousarray(a))
    t = t.to(dev)
    return list(t.unbind(0)) if per_expert else t


def device_prepack(p, ckpt, host, dev, gate_up_layout="separate", scale_layout="linear",
                   direction="decode", per_expert=False, float8_scales=False, stream=None):
    """fp4moe.prepack_device of the checkpoint tensors, uploaded to `dev` with torch, in the given
    layout (the fused gate_up tensor and its bias made from the separate ones, scales swizzled,
    per-expert lists instead of stacked tensors, NVFP4 scales as torch.float8_e4m3fn)."""
    import torch

    cuda = lambda a, per_expert=False: tensor(a, dev, per_expert)  # noqa: E731
    nv = p.format.name == "nvfp4"
    gg, ug, dg = ckpt["g"]

    def scales(s):
        s = swizzle(s) if scale_layout == "swizzled_128x4" else s
        t = cuda(s)
        if float8_scales and nv:
            t = t.view(torch.float8_e4m3fn)
        return list(t.unbind(0)) if per_expert else t

    def mat(m, g):
        if m[0] is None:
            return None
        out = {"data": cuda(m[0], per_expert), "scales": scales(m[1])}
        if nv:
            out["global_scale"] = [float(v) for v in g]
        return out

    kw = {}
    b = ckpt["bias"]
    if gate_up_layout == "separate":
        kw["gate"], kw["up"] = mat(ckpt["gate"], gg), mat(ckpt["up"], ug)
        if b is not None:
            kw["gate_bias"] = cuda(b["gate"], per_expert) if ckpt["gate"][0] is not None else None
            kw["up_bias"] = cuda(b["up"], per_expert)
    else:
        fused = (fuse_rows(ckpt["gate"][0], ckpt["up"][0], gate_up_layout),
                 fuse_rows(ckpt["gate"][1], ckpt["up"][1], gate_up_layout))
        kw["gate_up"] = mat(fused, gg)
        if b is not None:
            kw["gate_up_bias"] = cuda(fuse_rows(b["gate"], b["up"], gate_up_layout), per_expert)
    kw["down"] = mat(ckpt["down"], dg)
    if b is not None:
        kw["down_bias"] = cuda(b["down"], per_expert)
    if p.input_mode.name == "w4a4":
        E = p.local_experts()
        kw["input_scale13"] = [host.expert(e).input_scale13 for e in range(E)]
        kw["input_scale2"] = [host.expert(e).input_scale2 for e in range(E)]
    return fp4moe.prepack_device(p, gate_up_layout=gate_up_layout, scale_layout=scale_layout,
                                 direction=direction, stream=stream, **kw)


def problem(fmt="nvfp4", E=6, H=320, I=96, **kw):
    return fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E, top_k=2, format=fmt, **kw)


CASES = [
    # name, problem fields, gate_up_layout, scale_layout, direction, bias dtype, per-expert lists
    ("nvfp4_linear_decode", dict(), "separate", "linear", "decode", None, False),
    ("nvfp4_linear_encode_lists", dict(E=5), "separate", "linear", "encode", None, True),
    ("nvfp4_swizzled_encode", dict(E=5), "separate", "swizzled_128x4", "encode", None, False),
    ("nvfp4_swizzled_decode_lists", dict(), "separate", "swizzled_128x4", "decode", None, True),
    ("nvfp4_concatenated_linear", dict(E=4, H=256, I=160), "concatenated", "linear", "decode",
     None, False),
    ("nvfp4_concatenated_swizzled_encode", dict(E=4, H=256, I=160), "concatenated",
     "swizzled_128x4", "encode", None, False),
    ("nvfp4_relu2_bias", dict(E=4, H=256, I=80, activation="relu2", has_bias=True), "separate",
     "linear", "decode", "float32", False),
    ("nvfp4_w4a4_expert_parallel", dict(E=16, H=512, I=256, input_mode="w4a4",
                                        local_expert_offset=4, num_local_experts=7),
     "separate", "linear", "encode", None, False),
    ("mxfp4_gpt_oss_interleaved_bf16_bias",
     dict(fmt="mxfp4", H=288, I=160, activation="swiglu_oai", routing="topk_softmax",
          router_bias=True, has_bias=True), "interleaved", "linear", "decode", "bfloat16", False),
    ("mxfp4_gpt_oss_interleaved_bf16_bias_lists",
     dict(fmt="mxfp4", H=288, I=160, activation="swiglu_oai", routing="topk_softmax",
          router_bias=True, has_bias=True), "interleaved", "linear", "decode", "bfloat16", True),
    ("mxfp4_separate_f32_bias",
     dict(fmt="mxfp4", H=288, I=160, activation="swiglu_oai", routing="topk_softmax",
          router_bias=True, has_bias=True), "separate", "linear", "decode", "float32", False),
]
