"""Host side of the fp4moe Python package: formats, presets, weights, the CPU reference and errors.

Runs without a GPU. The package is imported from FP4MOE_BUILD_DIR/python when a CMake build put it
there (ctest sets FP4MOE_BUILD_DIR), else from the installed package (`pip install .`). The oracles
here are written from SPEC in NumPy + ml_dtypes, independently of the library.
"""


import numpy as np
import pytest
from package_under_test import import_fp4moe

ml_dtypes = pytest.importorskip("ml_dtypes")


fp4moe = import_fp4moe()

F32 = np.float32
BF16 = ml_dtypes.bfloat16
E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
E2M1_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], F32)


@pytest.fixture
def rng(request):
    # Fresh, reproducible inputs per test case.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


# ---- NumPy + ml_dtypes oracles --------------------------------------------------------------------


def pack_codes(codes):
    codes = np.asarray(codes, dtype=np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_codes(packed):
    lo, hi = packed & 0xF, packed >> 4
    return np.stack([lo, hi], axis=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def np_dequantize(packed, scales, fmt, g):
    """float32 values of FP4 matrices [..., rows, cols] from codes, 1-byte scales and g (decode):
    e2m1 * scale is exact, the product with the float32 g is rounded once."""
    vals = E2M1_VALUES[unpack_codes(packed)].astype(np.float64)
    s = scales.view(E4M3 if fmt == "nvfp4" else E8M0).astype(np.float64)
    block = 16 if fmt == "nvfp4" else 32
    vals = vals * np.repeat(s, block, axis=-1)
    g = np.asarray(g, dtype=F32).astype(np.float64)
    return (vals * g.reshape(g.shape + (1, 1)) if g.ndim else vals * g).astype(F32)


def np_quantize_nvfp4(x, g):
    """ModelOpt recipe (SPEC): returns packed codes and E4M3 scale bytes."""
    rows, cols = x.shape
    g = F32(g)
    xb = x.reshape(rows, cols // 16, 16)
    amax = np.abs(xb).max(axis=-1)
    s = np.where(amax == 0, F32(1), amax / (F32(6) * g)).astype(F32)
    s8 = np.maximum(s, F32(2.0**-9)).astype(E4M3)
    q = (xb / (s8.astype(F32) * g)[..., None]).astype(F32)
    codes = np.clip(q, -6, 6).astype(E2M1).view(np.uint8) & 0xF
    return pack_codes(codes.reshape(rows, cols)), s8.view(np.uint8)


def np_quantize_mxfp4(x):
    """OCP MX v1.0 (SPEC): s = floor(log2(block amax)) - 2, all-zero block -127."""
    rows, cols = x.shape
    xb = x.reshape(rows, cols // 32, 32).astype(np.float64)
    amax = np.abs(xb).max(axis=-1)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    e = np.clip(e, -127, 127)
    q = (xb / np.exp2(e)[..., None]).astype(F32)
    codes = np.clip(q, -6, 6).astype(E2M1).view(np.uint8) & 0xF
    return pack_codes(codes.reshape(rows, cols)), (e + 127).astype(np.uint8)


def random_fp4(rng, shape, fmt):
    """Random packed codes and scales for matrices [..., rows, cols]: scales near 1 / 64."""
    *lead, rows, cols = shape
    packed = rng.integers(0, 256, size=(*lead, rows, cols // 2), dtype=np.uint8)
    block = 16 if fmt == "nvfp4" else 32
    if fmt == "nvfp4":
        scales = rng.uniform(0.25, 2.0, size=(*lead, rows, cols // block)).astype(E4M3)
        scales = scales.view(np.uint8)
    else:
        scales = rng.integers(127 - 8, 127 - 4, size=(*lead, rows, cols // block), dtype=np.uint8)
    return packed, scales


def bf16_round(a):
    return np.asarray(a, dtype=F32).astype(BF16).astype(np.float64)


def np_route(method, logits, k, bias=None, renormalize=True):
    logits = logits.astype(F32)
    if method == "softmax_topk":
        z = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs = z / z.sum(axis=-1, keepdims=True)
        ids = np.argsort(-probs, axis=-1, kind="stable")[:, :k]
        w = np.take_along_axis(probs, ids, axis=-1)
        if renormalize:
            w = w / w.sum(axis=-1, keepdims=True)
    elif method == "topk_softmax":
        scores = logits + (bias if bias is not None else 0)
        ids = np.argsort(-scores, axis=-1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, ids, axis=-1)
        z = np.exp(top - top.max(axis=-1, keepdims=True))
        w = z / z.sum(axis=-1, keepdims=True)
    else:
        raise AssertionError(method)
    return ids.astype(np.int32), w.astype(F32)


def np_activation(kind, gate, up, alpha=1.702, limit=7.0):
    gate, up = gate.astype(F32), up.astype(F32)
    if kind == "swiglu":
        return gate / (1 + np.exp(-gate)) * up
    if kind == "swiglu_oai":
        g = np.minimum(gate, F32(limit))
        u = np.clip(up, -limit, limit)
        return (u + 1) * g / (1 + np.exp(-alpha * g))
    if kind == "relu2":
        return np.maximum(up, 0) ** 2
    raise AssertionError(kind)


def np_layer(kind, x, ids, tw, W, out_dtype=np.float64):
    """SPEC "The layer" in float64 with the bf16 rounding of `a`. W holds dequantized float64
    matrices gate [E, I, H] (or None), up [E, I, H], down [E, H, I] and biases (or None)."""
    T, H = x.shape
    out = np.zeros((T, H), dtype=np.float64)
    for t in range(T):
        for j in range(ids.shape[1]):
            e = ids[t, j]
            up = W["up"][e] @ x[t] + (W["up_bias"][e] if W["up_bias"] is not None else 0)
            gate = None
            if W["gate"] is not None:
                gate = W["gate"][e] @ x[t] + (W["gate_bias"][e] if W["gate_bias"] is not None else 0)
            a = bf16_round(np_activation(kind, gate if gate is not None else up, up))
            y = W["down"][e] @ a + (W["down_bias"][e] if W["down_bias"] is not None else 0)
            out[t] += np.float64(tw[t, j]) * y
    return out.astype(out_dtype)


# ---- formats --------------------------------------------------------------------------------------


def test_presets_and_problems():
    names = [p.name for p in fp4moe.presets()]
    assert "qwen3-30b-a3b" in names and "gpt-oss-20b" in names
    q = fp4moe.find_preset("qwen3-30b-a3b")
    assert (q.hidden, q.intermediate, q.num_experts, q.top_k) == (2048, 768, 128, 8)
    p = fp4moe.make_problem("qwen3-30b-a3b", tokens=3)
    assert (p.tokens, p.hidden, p.routing.method) == (3, 2048, fp4moe.RoutingMethod.softmax_topk)
    p = fp4moe.make_problem(hidden=64, intermediate=32, num_experts=4, top_k=2, format="mxfp4",
                            activation="swiglu_oai", routing="topk_softmax", router_bias=True)
    assert p.format == fp4moe.Format.mxfp4 and p.routing.has_bias
    assert p.activation.kind == fp4moe.Activation.swiglu_oai
    with pytest.raises(fp4moe.Error, match="qwen3"):
        fp4moe.find_preset("no-such-model")
    with pytest.raises(fp4moe.Error, match="top_k"):
        fp4moe.make_problem(hidden=64, intermediate=32, num_experts=4, top_k=5)
    with pytest.raises(fp4moe.Error, match="unknown format"):
        fp4moe.make_problem(hidden=64, intermediate=32, num_experts=4, top_k=2, format="fp8")


def test_error_is_value_and_runtime_error():
    assert issubclass(fp4moe.Error, ValueError) and issubclass(fp4moe.Error, RuntimeError)


@pytest.mark.parametrize("direction", ["decode", "encode"])
def test_nvfp4_exact_round_trip(rng, direction):
    # Values that are exactly e2m1 * E4M3 scale * g with a +-6 in every block: the recipe must
    # recover the same codes and scales, and dequantize must give x back bit for bit.
    rows, cols = 24, 64
    g = F32(0.0371)
    codes = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
    codes[:, ::16] = rng.choice([7, 15], size=(rows, cols // 16))
    s8 = rng.uniform(0.01, 400, size=(rows, cols // 16)).astype(E4M3)
    x = (E2M1_VALUES[codes] * np.repeat(s8.astype(F32), 16, axis=1) * g).astype(F32)
    given = g if direction == "decode" else F32(1) / g
    q = fp4moe.quantize_nvfp4(x, given, direction)
    assert np.array_equal(q.scales, s8.view(np.uint8))
    assert np.array_equal(q.data, pack_codes(codes))
    assert q.global_scale == pytest.approx(g, rel=1e-6)
    back = fp4moe.dequantize(q)
    if direction == "decode":
        assert np.array_equal(back.view(np.uint32), x.view(np.uint32))
    else:
        np.testing.assert_allclose(back, x, rtol=1e-6)


def test_quantizers_match_ml_dtypes(rng):
    x = (rng.standard_normal((32, 128)) * np.exp2(rng.integers(-8, 8, (32, 1)))).astype(F32)
    x[3, 16:32] = 0  # an all-zero block
    g = fp4moe.nvfp4_global_scale(float(np.abs(x).max()))
    assert g == pytest.approx(np.abs(x).max() / (6 * 448), rel=1e-6)
    q = fp4moe.quantize_nvfp4(x)  # global scale derived from amax
    assert q.global_scale == g
    data, scales = np_quantize_nvfp4(x, g)
    assert np.array_equal(q.scales, scales)
    assert np.array_equal(q.data, data)
    np.testing.assert_array_equal(fp4moe.dequantize(q), np_dequantize(data, scales, "nvfp4", g))

    m = fp4moe.quantize_mxfp4(x)
    data, scales = np_quantize_mxfp4(x)
    assert m.global_scale == 1.0
    assert np.array_equal(m.scales, scales)
    assert np.array_equal(m.data, data)
    np.testing.assert_array_equal(fp4moe.dequantize(m), np_dequantize(data, scales, "mxfp4", 1))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_quantized_matrix_from_arrays(rng, fmt):
    packed, scales = random_fp4(rng, (40, 96), fmt)
    g = 0.02 if fmt == "nvfp4" else 1.0
    m = fp4moe.QuantizedMatrix(packed, scales, fp4moe.Format.parse(fmt), g)
    assert (m.rows, m.cols, m.block) == (40, 96, 16 if fmt == "nvfp4" else 32)
    np.testing.assert_array_equal(fp4moe.dequantize(m), np_dequantize(packed, scales, fmt, g))
    if fmt == "nvfp4":
        enc = fp4moe.QuantizedMatrix(packed, scales, fp4moe.Format.nvfp4, 1 / 0.02,
                                     fp4moe.ScaleDirection.encode)
        assert enc.global_scale == pytest.approx(0.02, rel=1e-6)
        assert fp4moe.convert_global_scale(50.0, fp4moe.ScaleDirection.encode,
                                           fp4moe.ScaleDirection.decode) == pytest.approx(0.02)


def test_swizzle_round_trip_and_offsets(rng):
    rows, kcols = 200, 6
    lin = rng.integers(0, 256, size=(rows, kcols), dtype=np.uint8)
    sw = fp4moe.swizzle_scales(lin)
    kt = (kcols + 3) // 4
    assert sw.shape == (fp4moe.swizzled_size(rows, kcols),) == (256 * kt * 4,)
    for m, k in [(0, 0), (37, 5), (129, 2), (199, 3)]:
        off = (m // 128) * kt * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
        assert sw[off] == lin[m, k], (m, k)
    assert np.array_equal(fp4moe.unswizzle_scales(sw, rows, kcols), lin)
    # ml_dtypes float8 scale arrays are accepted as their bytes.
    assert np.array_equal(fp4moe.swizzle_scales(lin.view(E4M3)), sw)


# ---- weights and the reference layer -------------------------------------------------------------


def tiny_layer(rng, fmt, kind, has_bias, E=4, H=128, I=64):
    gated = kind != "relu2"
    gate, gate_s = random_fp4(rng, (E, I, H), fmt) if gated else (None, None)
    up, up_s = random_fp4(rng, (E, I, H), fmt)
    down, down_s = random_fp4(rng, (E, H, I), fmt)
    nv = fmt == "nvfp4"
    gg = rng.uniform(0.005, 0.02, E).astype(F32) if nv and gated else None
    ug = rng.uniform(0.005, 0.02, E).astype(F32) if nv else None
    dg = rng.uniform(0.005, 0.02, E).astype(F32) if nv else None
    bias = (lambda n: rng.standard_normal((E, n)).astype(F32) * 0.1) if has_bias else (lambda n: None)
    arrays = dict(gate=gate, gate_scales=gate_s, up=up, up_scales=up_s, down=down,
                  down_scales=down_s, gate_global_scale=gg, up_global_scale=ug,
                  down_global_scale=dg, gate_bias=bias(I) if gated else None, up_bias=bias(I),
                  down_bias=bias(H))
    one = np.ones(E, F32)
    W = dict(
        gate=np_dequantize(gate, gate_s, fmt, gg if nv else one) if gated else None,
        up=np_dequantize(up, up_s, fmt, ug if nv else one),
        down=np_dequantize(down, down_s, fmt, dg if nv else one),
        gate_bias=arrays["gate_bias"], up_bias=arrays["up_bias"], down_bias=arrays["down_bias"])
    return arrays, W


CASES = [
    # format, activation, routing, biases
    ("nvfp4", "swiglu", "softmax_topk", False),
    ("mxfp4", "swiglu_oai", "topk_softmax", True),
    ("nvfp4", "relu2", "precomputed", False),
]


@pytest.mark.parametrize("fmt,kind,routing,has_bias", CASES)
def test_reference_forward_matches_numpy(rng, fmt, kind, routing, has_bias):
    E, H, I, k, T = 4, 128, 64, 2, 5
    p = fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E, top_k=k, format=fmt,
                            activation=kind, routing=routing, has_bias=has_bias,
                            router_bias=routing == "topk_softmax")
    arrays, W = tiny_layer(rng, fmt, kind, has_bias, E, H, I)
    w = fp4moe.make_weights(p, **arrays)
    assert len(w) == E and w.format == fp4moe.Format.parse(fmt)
    x = rng.standard_normal((T, H)).astype(F32).astype(BF16)
    if routing == "precomputed":
        ids = np.stack([rng.permutation(E)[:k] for _ in range(T)]).astype(np.int32)
        tw = rng.uniform(0.1, 1, (T, k)).astype(F32)
        r = fp4moe.reference_forward(p, w, x, topk_ids=ids, topk_weights=tw)
    else:
        logits = (2 * rng.standard_normal((T, E))).astype(F32)
        bias = (0.5 * rng.standard_normal(E)).astype(F32) if p.routing.has_bias else None
        ids, tw = np_route(routing, logits, k, bias)
        r = fp4moe.reference_forward(p, w, x, logits, router_bias=bias)
        lib_ids, lib_w = fp4moe.route(p, logits, bias)
        assert np.array_equal(lib_ids, ids) and np.array_equal(r.topk_ids, ids)
        np.testing.assert_allclose(lib_w, tw, rtol=2e-6)
    want = np_layer(kind, x.astype(np.float64), ids, tw, W)
    assert r.out.shape == (T, H) and r.out.dtype == np.float32
    assert not np.isnan(r.out).any()
    # Same numerics up to summation order and exp(): only a rare bf16 flip of `a` may differ.
    rel = np.linalg.norm(r.out_f32 - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel
    same = np.mean(r.out_bf16_bits == want.astype(F32).astype(BF16).view(np.uint16))
    assert same > 0.97, same
    assert np.array_equal(r.out, r.out_bf16_bits.view(BF16).astype(F32))


def test_weights_reject_bad_arrays(rng):
    p = fp4moe.make_problem(hidden=128, intermediate=64, num_experts=4, top_k=2)
    arrays, _ = tiny_layer(rng, "nvfp4", "swiglu", False)
    good = dict(arrays)
    with pytest.raises(fp4moe.Error, match=r"down must have shape \[4, 128, 32\]"):
        fp4moe.make_weights(p, **{**good, "down": good["down"][:, :64]})
    with pytest.raises(fp4moe.Error, match="up must have dtype uint8, got int16"):
        fp4moe.make_weights(p, **{**good, "up": good["up"].astype(np.int16)})
    with pytest.raises(fp4moe.Error, match="C-contiguous"):
        fp4moe.make_weights(p, **{**good, "up": np.asfortranarray(good["up"])})
    with pytest.raises(fp4moe.Error, match="global scales"):
        fp4moe.make_weights(p, **{**good, "down_global_scale": None})
    with pytest.raises(fp4moe.Error, match="has_bias = False"):
        fp4moe.make_weights(p, **{**good, "up_bias": np.zeros((4, 64), F32)})
    bad_scale = good["up_global_scale"].copy()
    bad_scale[2] = np.inf
    with pytest.raises(fp4moe.Error, match="up.global_scale"):
        fp4moe.make_weights(p, **{**good, "up_global_scale": bad_scale})


def test_inputs_reject_bad_arrays(rng):
    p = fp4moe.make_problem(hidden=128, intermediate=64, num_experts=4, top_k=2)
    arrays, _ = tiny_layer(rng, "nvfp4", "swiglu", False)
    w = fp4moe.make_weights(p, **arrays)
    x = rng.standard_normal((3, 128)).astype(F32)
    logits = rng.standard_normal((3, 4)).astype(F32)
    with pytest.raises(fp4moe.Error, match=r"logits must have shape \[3, 4\]"):
        fp4moe.reference_forward(p, w, x, logits[:, :3].copy())
    with pytest.raises(fp4moe.Error, match="x must be float32, uint16"):
        fp4moe.reference_forward(p, w, x.astype(np.float64), logits)
    with pytest.raises(fp4moe.Error, match=r"x must have shape \[\*, 128\]"):
        fp4moe.reference_forward(p, w, x[:, :64].copy(), logits)
    with pytest.raises(fp4moe.Error, match="pass router logits"):
        fp4moe.reference_forward(p, w, x)
    with pytest.raises(fp4moe.Error, match="topk_ids"):
        fp4moe.reference_forward(p, w, x, topk_ids=np.zeros((3, 2), np.int64),
                                 topk_weights=np.ones((3, 2), F32))
    with pytest.raises(fp4moe.Error, match=r"topk_ids\[0\]\[1\] = 9"):
        fp4moe.reference_forward(p, w, x, topk_ids=np.array([[0, 9]] * 3, np.int32),
                                 topk_weights=np.ones((3, 2), F32))
    with pytest.raises(fp4moe.Error, match="float32"):
        fp4moe.quantize_nvfp4(x.astype(np.float64))
    with pytest.raises(fp4moe.Error, match="multiple of the block size 16"):
        fp4moe.quantize_nvfp4(x[:, :40].copy())
    with pytest.raises(fp4moe.Error, match="C-contiguous"):
        fp4moe.quantize_mxfp4(x[:, ::2])


def test_prepack_sizes(rng):
    p = fp4moe.make_problem(hidden=128, intermediate=64, num_experts=4, top_k=2)
    arrays, _ = tiny_layer(rng, "nvfp4", "swiglu", False)
    packed = fp4moe.prepack(p, fp4moe.make_weights(p, **arrays))
    assert packed.layout.experts == 4 and packed.nbytes == packed.layout.total_bytes > 0
    assert packed.bytes.shape == (packed.nbytes,)
    assert fp4moe.workspace_size(p) > 0
    wrong = fp4moe.make_problem(hidden=128, intermediate=64, num_experts=8, top_k=2)
    with pytest.raises(fp4moe.Error, match="expert"):
        fp4moe.prepack(wrong, fp4moe.make_weights(p, **arrays))


def test_gpu_entry_points_without_gpu():
    if fp4moe.gpu_available():
        pytest.skip("a Hopper GPU is present; tests/python/test_package_gpu.py covers the GPU path")
    assert fp4moe.gpu_unavailable_reason()
    p = fp4moe.make_problem(hidden=128, intermediate=64, num_experts=4, top_k=2)
    packed = fp4moe.prepack(p, fp4moe.random_weights(p, 1))
    with pytest.raises(fp4moe.Error, match="cannot upload"):
        fp4moe.upload(p, packed)


def test_checkpoint_loader_binding():
    if fp4moe.has_checkpoint_loader():
        with pytest.raises(fp4moe.Error):
            fp4moe.load_moe_layer("/nonexistent/checkpoint", 0)
    else:
        with pytest.raises(fp4moe.Error, match="no checkpoint loader"):
            fp4moe.load_moe_layer("/nonexistent/checkpoint", 0)
