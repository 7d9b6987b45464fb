"""fp4moe.prepack_device on the GPU: checkpoint tensors uploaded with PyTorch and packed on the device
give bitwise the bytes of the host prepack (fp4moe.prepack of fp4moe.make_weights of the same
tensors), for NVFP4 (linear and swizzled scales, separate and concatenated gate/up, both global-scale
directions, W4A4 input scales) and MXFP4 (gpt-oss: interleaved gate_up with bf16 biases); the layer
run with both gives the same output; bad CUDA inputs and NaN block scales give the host's errors.

Skips (with the reason) without PyTorch, without a CUDA device, or without a Hopper GPU. The package
is found as in test_package_cpu.py: FP4MOE_BUILD_DIR/python first, then the installed one.
"""


import numpy as np
import pytest
from package_under_test import import_fp4moe, require_gpu

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
ml_dtypes = pytest.importorskip("ml_dtypes")


fp4moe = import_fp4moe()

require_gpu(fp4moe, torch)

from prepack_device_cases import CASES, checkpoint, problem, tensor  # noqa: E402
from prepack_device_cases import device_prepack as _device_prepack  # noqa: E402

DEV = torch.device("cuda", torch.cuda.current_device())


def device_prepack(p, ckpt, host, *args, **kw):
    return _device_prepack(p, ckpt, host, DEV, *args, **kw)


def cuda(a, per_expert=False):
    return tensor(a, DEV, per_expert)


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bitwise_equal_to_host_prepack(rng, case):
    name, fields, gul, sl, direction, bias_dtype, lists = case
    p = problem(**fields)
    ckpt, host = checkpoint(rng, p, gul, direction, bias_dtype or "float32")
    packed = fp4moe.prepack(p, host)
    dw = device_prepack(p, ckpt, host, gul, sl, direction, per_expert=lists,
                        float8_scales=lists)
    assert dw.device == DEV.index
    assert dw.nbytes == packed.nbytes
    got, want = dw.download(), packed.bytes
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, f"{name}: {bad.size} bytes differ, the first at {bad[0]}"


def test_same_layer_output_as_uploaded_host_prepack(rng):
    p = problem(E=8, H=256, I=128)
    ckpt, host = checkpoint(rng, p, "concatenated")
    dw = device_prepack(p, ckpt, host, "concatenated", "swizzled_128x4")
    ref = fp4moe.to_device(p, host, DEV)
    T = 5
    x = torch.randn(T, p.hidden, device=DEV).to(torch.bfloat16)
    logits = torch.randn(T, p.num_experts, device=DEV)
    a = fp4moe.moe_forward(dw, x, logits)
    b = fp4moe.moe_forward(ref, x, logits)
    torch.cuda.synchronize()
    assert torch.equal(a.view(torch.int16), b.view(torch.int16))
    assert torch.isfinite(a.float()).all() and a.float().abs().sum() > 0


def test_stream_argument(rng):
    p = problem(E=4, H=256, I=64)
    ckpt, host = checkpoint(rng, p)
    want = fp4moe.prepack(p, host).bytes
    s = torch.cuda.Stream(DEV)
    for stream in (s, s.cuda_stream, None):  # None: the current stream, s here
        with torch.cuda.stream(s):  # the tensors are made on s too
            dw = device_prepack(p, ckpt, host, stream=stream)
        assert np.array_equal(dw.download(), want)
    for stream in (0, None):  # None: the default stream here
        dw = device_prepack(p, ckpt, host, stream=stream)
        assert np.array_equal(dw.download(), want)


def test_bad_cuda_inputs(rng):
    p = problem(E=4, H=256, I=96)
    ckpt, host = checkpoint(rng, p)
    g = [1.0] * 4
    up = {"data": cuda(ckpt["up"][0]), "scales": cuda(ckpt["up"][1]), "global_scale": g}
    gate = {"data": cuda(ckpt["gate"][0]), "scales": cuda(ckpt["gate"][1]), "global_scale": g}
    down = {"data": cuda(ckpt["down"][0]), "scales": cuda(ckpt["down"][1]), "global_scale": g}
    ok = dict(gate=gate, up=up, down=down)
    assert fp4moe.prepack_device(p, **ok).nbytes > 0

    def err(**kw):
        with pytest.raises(fp4moe.Error) as e:
            fp4moe.prepack_device(p, **{**ok, **kw})
        return str(e.value)

    assert "up.data must have dtype uint8, got int32" in err(up={**up, "data": up["data"].int()})
    assert "up.data must have shape [4, 96, 128]" in err(up={**up, "data": up["data"][:, :, :64]})
    assert "(dimension 0: the 4 local experts), got [3, 96, 128]" in err(
        up={**up, "data": up["data"][:3]})
    assert "up.scales must hold one tensor per local expert (4), got 5" in err(
        up={**up, "scales": list(up["scales"].unbind(0)) + [up["scales"][0]]})
    assert "up.data must be contiguous" in err(
        up={**up, "data": up["data"].transpose(1, 2).contiguous().transpose(1, 2)})
    msg = err(up={**up, "data": up["data"].cpu()})
    assert "up.data must be a CUDA tensor" in msg and "the host (CPU)" in msg
    msg = err(up={**up, "scales": up["scales"].view(torch.float8_e5m2)})
    assert "up.scales must have dtype uint8 or float8_e4m3fn, got float8_e5m2" in msg
    assert "global_scale must be a finite positive number" in err(
        up={**up, "global_scale": [1.0, -1.0, 1.0, 1.0]})
    if torch.cuda.device_count() > 1:
        other = torch.device("cuda", (DEV.index + 1) % torch.cuda.device_count())
        msg = err(down={**down, "scales": down["scales"].to(other)})
        assert f"down.scales is on cuda:{other.index} but gate.data is on cuda:{DEV.index}" in msg


@pytest.mark.parametrize("fmt,layout", [("nvfp4", "separate"), ("mxfp4", "separate"),
                                        ("mxfp4", "interleaved")])
def test_nan_block_scale_same_error_as_host(rng, fmt, layout):
    p = problem(fmt, E=5, H=256, I=96)
    ckpt, host = checkpoint(rng, p, layout)
    nan = 0xFF  # E4M3 and E8M0 NaN
    ckpt["up"][1][3, 7, 2] = nan     # expert 3 up row 7 block 2
    ckpt["down"][1][3, 0, 0] = nan   # later in (expert, matrix, row, block) order
    ckpt["gate"][1][4, 0, 1] = nan   # a later expert
    with pytest.raises(fp4moe.Error) as host_err:
        fp4moe.make_weights(p, gate=ckpt["gate"][0], gate_scales=ckpt["gate"][1],
                            up=ckpt["up"][0], up_scales=ckpt["up"][1], down=ckpt["down"][0],
                            down_scales=ckpt["down"][1], gate_global_scale=ckpt["g"][0],
                            up_global_scale=ckpt["g"][1], down_global_scale=ckpt["g"][2])
    with pytest.raises(fp4moe.Error) as dev_err:
        device_prepack(p, ckpt, host, layout)
    h, d = str(host_err.value), str(dev_err.value)
    assert "expert 3 up: block scale of row 7, block 2" in h
    # The same sentence; the source location after it differs (each path says where it checked).
    assert h.split(" [")[0] == d.split(" [")[0]
