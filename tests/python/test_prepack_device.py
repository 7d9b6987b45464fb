"""fp4moe.prepack_device without a GPU: every argument check that comes before the device is needed.

prepack_device checks dtypes, shapes, contiguity and the expert count before it checks where a
tensor lives, so host (NumPy, PyTorch CPU) arrays exercise those checks on any machine; a host array
that passes them is refused as not being a CUDA tensor. The GPU half (bitwise against the host
prepack, NaN scales) is tests/python/test_prepack_device_gpu.py.
"""


import numpy as np
import pytest
from package_under_test import import_fp4moe

ml_dtypes = pytest.importorskip("ml_dtypes")


fp4moe = import_fp4moe()

E, H, I = 4, 128, 64


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def problem(fmt="nvfp4", **kw):
    return fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E, top_k=2, format=fmt, **kw)


def matrix(rng, rows, cols, fmt="nvfp4", experts=E):
    block = 16 if fmt == "nvfp4" else 32
    data = rng.integers(0, 256, size=(experts, rows, cols // 2), dtype=np.uint8)
    scales = rng.integers(0x30, 0x40, size=(experts, rows, cols // block), dtype=np.uint8)
    g = rng.uniform(0.5, 2.0, experts).astype(np.float32) if fmt == "nvfp4" else None
    return (data, scales, g) if g is not None else (data, scales)


def layer(rng, fmt="nvfp4"):
    return dict(gate=matrix(rng, I, H, fmt), up=matrix(rng, I, H, fmt), down=matrix(rng, H, I, fmt))


def err(**kw):
    with pytest.raises(fp4moe.Error) as e:
        fp4moe.prepack_device(**kw)
    return str(e.value)


def test_host_arrays_are_refused_after_their_checks(rng):
    p = problem()
    assert "gate.data must be a CUDA tensor" in err(problem=p, **layer(rng))
    assert "the host (CPU)" in err(problem=p, **layer(rng))
    # Per-expert lists are checked element by element.
    w = layer(rng)
    d, s, g = w["gate"]
    w["gate"] = ([d[e] for e in range(E)], list(s), g)
    assert "gate.data[0] must be a CUDA tensor" in err(problem=p, **w)


def test_dtype_shape_contiguity_and_expert_count(rng):
    p = problem()
    w = layer(rng)
    d, s, g = w["up"]
    msg = err(problem=p, **{**w, "up": (d.astype(np.int16), s, g)})
    assert "up.data must have dtype uint8, got int16" in msg
    msg = err(problem=p, **{**w, "up": (d[:, :, :32], s, g)})
    assert "up.data must have shape [4, 64, 64]" in msg and "got [4, 64, 32]" in msg
    msg = err(problem=p, **{**w, "up": (d[:3], s[:3], g)})
    assert "must have shape [4, 64, 64] (dimension 0: the 4 local experts), got [3, 64, 64]" in msg
    msg = err(problem=p, **{**w, "up": (list(d[:3]), s, g)})
    assert "up.data must hold one tensor per local expert (4), got 3" in msg
    msg = err(problem=p, **{**w, "up": (d, s.astype(np.float32), g)})
    assert "up.scales must have dtype uint8 or float8_e4m3fn, got float32" in msg
    msg = err(problem=p, **{**w, "up": (d, s.view(ml_dtypes.float8_e5m2), g)})
    assert "up.scales must have dtype uint8 or float8_e4m3fn, got float8_e5m2" in msg
    # The format's float8 type is accepted as its bits: the next complaint is the device.
    msg = err(problem=p, **{**w, "up": (d, s.view(ml_dtypes.float8_e4m3fn), g)})
    assert "gate.data must be a CUDA tensor" in msg
    msg = err(problem=p, **{**w, "down": (np.asfortranarray(w["down"][0]), *w["down"][1:])})
    assert "down.data must be contiguous" in msg
    msg = err(problem=p, **{**w, "up": (d, s, g[:3])})
    assert "up.global_scale must be a scalar or have shape [4], got [3]" in msg
    msg = err(problem=p, **{**w, "up": (d, s)})
    assert "up.global_scale is required for nvfp4" in msg
    msg = err(problem=p, **{**w, "up": {"data": d, "scales": s, "global": g}})
    assert "up has unknown keys ['global']" in msg


def test_swizzled_scales_shape(rng):
    p = problem()
    w = layer(rng)
    d, s, g = w["gate"]
    n = fp4moe.swizzled_size(I, H // 16)
    msg = err(problem=p, scale_layout="swizzled_128x4", **{**w, "gate": (d, s, g)})
    assert f"gate.scales must have shape [4, {n}]" in msg
    sw = {k: (m[0], np.stack([fp4moe.swizzle_scales(m[1][e]) for e in range(E)]), m[2])
          for k, m in w.items()}
    msg = err(problem=p, scale_layout="swizzled_128x4", **sw)
    assert "gate.data must be a CUDA tensor" in msg
    msg = err(problem=problem("mxfp4"), scale_layout="swizzled_128x4", **layer(rng, "mxfp4"))
    assert "swizzled_128x4 scale layout exists only for nvfp4" in msg


def test_layouts_biases_and_input_scales(rng):
    p = problem()
    w = layer(rng)
    fused = matrix(rng, 2 * I, H)
    msg = err(problem=p, gate_up_layout="concatenated", gate_up=fused, **w)
    assert "takes one gate_up matrix: pass no gate or up" in msg
    msg = err(problem=p, gate_up=fused, down=w["down"])
    assert "gate_up and gate_up_bias need gate_up_layout" in msg
    msg = err(problem=p, gate_up_layout="concatenated", gate_up=matrix(rng, I, H), down=w["down"])
    assert "gate_up.data must have shape [4, 128, 64]" in msg
    msg = err(problem=p, gate_up_layout="diagonal", gate_up=fused, down=w["down"])
    assert "unknown gate_up_layout 'diagonal'" in msg
    relu = problem(activation="relu2")
    msg = err(problem=relu, gate_up_layout="interleaved", gate_up=fused, down=w["down"])
    assert "needs a gated activation, not relu2" in msg
    msg = err(problem=relu, **w)
    assert "gate must be None for the non-gated activation relu2" in msg
    msg = err(problem=p, up_bias=np.zeros((E, I), np.float32), **w)
    assert "up_bias must be None: the problem has has_bias = False" in msg
    msg = err(problem=p, input_scale13=1.0, **w)
    assert "input_scale13 is used by W4A4 only" in msg
    msg = err(problem=problem(input_mode="w4a4"), **w)
    assert "W4A4 needs the activations' input scales: pass input_scale13" in msg
    mx = problem("mxfp4", activation="swiglu_oai", has_bias=True)
    wm = layer(rng, "mxfp4")
    msg = err(problem=mx, **{**wm, "up": (*wm["up"], np.ones(E, np.float32))})
    assert "up.global_scale: mxfp4 has no global scales" in msg
    msg = err(problem=mx, **wm)
    assert "has_bias = True: pass gate_bias" in msg
    b = lambda n, dt=np.float32: np.zeros((E, n), dt)  # noqa: E731
    msg = err(problem=mx, gate_bias=b(I, np.float64), up_bias=b(I), down_bias=b(H), **wm)
    assert "gate_bias must have dtype float32 or bfloat16, got float64" in msg
    msg = err(problem=mx, gate_bias=b(I), up_bias=b(I), down_bias=b(I), **wm)
    assert "down_bias must have shape [4, 128]" in msg
    msg = err(problem=mx, gate_bias=b(I, ml_dtypes.bfloat16), up_bias=b(I), down_bias=b(H), **wm)
    assert "gate.data must be a CUDA tensor" in msg


def test_stream_and_problem_arguments(rng):
    w = layer(rng)
    assert "problem must be an fp4moe.MoeProblem" in err(problem="qwen3", **w)
    assert "stream must be an int" in err(problem=problem(), stream="default", **w)
    assert "stream must be an integer" in err(problem=problem(), stream=-1, **w)
    bad = problem()
    bad.num_local_experts = 2 * E
    assert "num_local_experts" in err(problem=bad, **w)


def test_torch_cpu_tensors(rng):
    torch = pytest.importorskip("torch")
    p = problem()
    w = {k: tuple(torch.from_numpy(a) if isinstance(a, np.ndarray) and a.dtype == np.uint8 else a
                  for a in v) for k, v in layer(rng).items()}
    assert "gate.data must be a CUDA tensor" in err(problem=p, **w)
    d, s, g = w["up"]
    msg = err(problem=p, **{**w, "up": (d, s.view(torch.float8_e5m2), g)})
    assert "up.scales must have dtype uint8 or float8_e4m3fn, got float8_e5m2" in msg
    msg = err(problem=p, **{**w, "up": (d, s.view(torch.float8_e4m3fn), g)})
    assert "gate.data must be a CUDA tensor" in msg
    msg = err(problem=p, **{**w, "down": (w["down"][0].transpose(1, 2).contiguous().transpose(1, 2),
                                          *w["down"][1:])})
    assert "down.data must be contiguous" in msg



def test_every_layout_passes_the_checks_up_to_the_device(rng):
    """The layers of the GPU test, on the host: each call gets through every dtype, shape and count
    check and stops at the first tensor, which is not a CUDA tensor. The host prepack of the same
    tensors (the GPU test's oracle) is made too."""
    torch = pytest.importorskip("torch")
    from prepack_device_cases import CASES, checkpoint, device_prepack, problem

    for name, fields, gul, sl, direction, bias_dtype, lists in CASES:
        p = problem(**fields)
        ckpt, host = checkpoint(rng, p, gul, direction, bias_dtype or "float32")
        assert fp4moe.prepack(p, host).nbytes > 0
        first = ("gate" if p.activation.kind != fp4moe.Activation.relu2 else "up") \
            if gul == "separate" else "gate_up"
        first += ".data[0]" if lists else ".data"
        with pytest.raises(fp4moe.Error, match=r"^" + first.replace("[", r"\[") + " must be a CUDA"):
            device_prepack(p, ckpt, host, torch.device("cpu"), gul, sl, direction,
                           per_expert=lists, float8_scales=lists)
