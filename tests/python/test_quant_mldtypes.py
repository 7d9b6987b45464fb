"""Cross-checks the library's FP4 codecs and quantizers (through the C ABI) against ml_dtypes.

The reference quantizers below are written in numpy + ml_dtypes from SPEC "FP4 formats": NVFP4 with
the ModelOpt recipe, MXFP4 with the OCP MX v1.0 rule. They must match the library byte for byte.
"""

import ctypes
import os
import pathlib

import ml_dtypes
import numpy as np
import pytest

BUILD_DIR = os.environ.get("FP4MOE_BUILD_DIR")
if not BUILD_DIR:
    pytest.skip(
        "FP4MOE_BUILD_DIR is not set; set it to a build directory holding libfp4moe_c.so "
        "(ctest sets it for the python_tests test)",
        allow_module_level=True,
    )

E2M1 = ml_dtypes.float4_e2m1fn
E4M3 = ml_dtypes.float8_e4m3fn
E8M0 = ml_dtypes.float8_e8m0fnu
F32 = np.float32

_u8p = ctypes.POINTER(ctypes.c_uint8)
_u16p = ctypes.POINTER(ctypes.c_uint16)
_f32p = ctypes.POINTER(ctypes.c_float)
_i64 = ctypes.c_int64
_size = ctypes.c_size_t


@pytest.fixture(scope="module")
def lib():
    path = pathlib.Path(BUILD_DIR) / "libfp4moe_c.so"
    assert path.is_file(), f"{path} does not exist: build the fp4moe_c target in {BUILD_DIR}"
    so = ctypes.CDLL(str(path))
    so.fp4moe_last_error.restype = ctypes.c_char_p
    so.fp4moe_last_error.argtypes = []
    for name in ("e2m1", "e4m3", "e8m0"):
        getattr(so, f"fp4moe_{name}_decode").argtypes = [_u8p, _size, _f32p]
        getattr(so, f"fp4moe_{name}_encode").argtypes = [_f32p, _size, _u8p]
    so.fp4moe_bf16_decode.argtypes = [_u16p, _size, _f32p]
    so.fp4moe_bf16_encode.argtypes = [_f32p, _size, _u16p]
    so.fp4moe_nvfp4_global_scale.argtypes = [ctypes.c_float, _f32p]
    so.fp4moe_quantize_nvfp4.argtypes = [_f32p, _i64, _i64, ctypes.c_float, ctypes.c_int, _u8p,
                                         _u8p, _f32p]
    so.fp4moe_quantize_mxfp4.argtypes = [_f32p, _i64, _i64, _u8p, _u8p]
    so.fp4moe_dequantize.argtypes = [ctypes.c_int, _i64, _i64, _u8p, _u8p, ctypes.c_float, _f32p]
    so.fp4moe_swizzled_128x4_size.argtypes = [_i64, _i64, ctypes.POINTER(_size)]
    so.fp4moe_swizzle_scales_128x4.argtypes = [_u8p, _i64, _i64, _u8p, _size]
    so.fp4moe_unswizzle_scales_128x4.argtypes = [_u8p, _size, _i64, _i64, _u8p]
    for fn in (so.fp4moe_e2m1_decode, so.fp4moe_quantize_nvfp4, so.fp4moe_quantize_mxfp4,
               so.fp4moe_dequantize, so.fp4moe_swizzle_scales_128x4):
        fn.restype = ctypes.c_int
    return so


def ptr(a, ctype):
    assert a.flags["C_CONTIGUOUS"]
    return a.ctypes.data_as(ctypes.POINTER(ctype))


def check(lib, rc):
    assert rc == 0, f"fp4moe C API failed ({rc}): {lib.fp4moe_last_error().decode()}"


# ---- library wrappers ---------------------------------------------------------------------------


def lib_decode(lib, name, codes):
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    out = np.full(codes.shape, np.nan, dtype=F32)
    check(lib, getattr(lib, f"fp4moe_{name}_decode")(ptr(codes, ctypes.c_uint8), codes.size,
                                                     ptr(out, ctypes.c_float)))
    return out


def lib_encode(lib, name, values):
    values = np.ascontiguousarray(values, dtype=F32)
    out = np.full(values.shape, 0xAA, dtype=np.uint8)
    check(lib, getattr(lib, f"fp4moe_{name}_encode")(ptr(values, ctypes.c_float), values.size,
                                                     ptr(out, ctypes.c_uint8)))
    return out


def lib_quantize_nvfp4(lib, x, global_scale, direction):
    rows, cols = x.shape
    data = np.full(rows * cols // 2, 0xAA, dtype=np.uint8)
    scales = np.full(rows * cols // 16, 0xAA, dtype=np.uint8)
    g_used = np.full(1, np.nan, dtype=F32)
    check(lib, lib.fp4moe_quantize_nvfp4(ptr(x, ctypes.c_float), rows, cols, F32(global_scale),
                                         direction, ptr(data, ctypes.c_uint8),
                                         ptr(scales, ctypes.c_uint8), ptr(g_used, ctypes.c_float)))
    return data, scales, g_used[0]


def lib_quantize_mxfp4(lib, x):
    rows, cols = x.shape
    data = np.full(rows * cols // 2, 0xAA, dtype=np.uint8)
    scales = np.full(rows * cols // 32, 0xAA, dtype=np.uint8)
    check(lib, lib.fp4moe_quantize_mxfp4(ptr(x, ctypes.c_float), rows, cols,
                                         ptr(data, ctypes.c_uint8), ptr(scales, ctypes.c_uint8)))
    return data, scales


def lib_dequantize(lib, fmt, rows, cols, data, scales, global_scale):
    out = np.full(rows * cols, np.nan, dtype=F32)
    check(lib, lib.fp4moe_dequantize(fmt, rows, cols, ptr(data, ctypes.c_uint8),
                                     ptr(scales, ctypes.c_uint8), F32(global_scale),
                                     ptr(out, ctypes.c_float)))
    return out.reshape(rows, cols)


# ---- numpy + ml_dtypes references ---------------------------------------------------------------


def e2m1_codes(values):
    return values.astype(E2M1).view(np.uint8) & 0xF


def pack(codes):
    flat = codes.reshape(-1)
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def ref_nvfp4(x, g):
    """ModelOpt recipe with the decode-direction global scale g (fp32 arithmetic throughout)."""
    rows, cols = x.shape
    g = F32(g)
    xb = x.reshape(rows, cols // 16, 16)
    amax = np.abs(xb).max(axis=-1)
    scale = amax / (F32(6.0) * g)
    scale = np.where(amax == 0, F32(1.0), scale)
    scale = np.maximum(scale, F32(2.0 ** -9)).astype(F32)
    scale8 = scale.astype(E4M3)
    denom = scale8.astype(F32) * g
    codes = e2m1_codes((xb / denom[..., None]).astype(F32))
    return pack(codes), scale8.view(np.uint8).reshape(-1)


def ref_mxfp4(x):
    """OCP MX v1.0: s = floor(log2(amax)) - 2 clamped to [-127, 127]; all-zero block s = -127."""
    rows, cols = x.shape
    xb = x.reshape(rows, cols // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    _, e = np.frexp(amax)  # amax = m * 2^e with m in [0.5, 1): floor(log2(amax)) = e - 1
    s = np.where(amax > 0, e - 1 - 2, -127)
    s = np.clip(s, -127, 127).astype(np.int32)
    q = np.ldexp(xb, -s[..., None]).astype(F32)
    codes = e2m1_codes(q)
    return pack(codes), (s + 127).astype(np.uint8).reshape(-1)


def random_blocks(rng, rows, cols, block):
    """Normal values with one magnitude per block (2^-30 .. 2^30), some all-zero blocks."""
    x = rng.standard_normal((rows, cols // block, block)).astype(F32)
    mags = np.ldexp(F32(1.0), rng.integers(-30, 31, size=(rows, cols // block, 1)))
    x = (x * mags).astype(F32)
    x[rng.random((rows, cols // block)) < 0.05] = 0.0
    return np.ascontiguousarray(x.reshape(rows, cols))


def assert_bytes_equal(got, want, what):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    bad = np.flatnonzero(got != want)
    assert bad.size == 0, (f"{what}: {bad.size} mismatches, first at {bad[0]}: "
                           f"got {got.reshape(-1)[bad[0]]:#04x}, want {want.reshape(-1)[bad[0]]:#04x}")


def assert_floats_identical(got, want, what):
    got, want = np.asarray(got, dtype=F32), np.asarray(want, dtype=F32)
    same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    bad = np.flatnonzero(~same)
    assert bad.size == 0, (f"{what}: {bad.size} mismatches, first at {bad[0]}: "
                           f"got {got.reshape(-1)[bad[0]]!r}, want {want.reshape(-1)[bad[0]]!r}")


def midpoints_and_neighbours(values):
    """Midpoints between neighbouring representable values and one ulp either side of them."""
    v = np.unique(values[np.isfinite(values)].astype(np.float64))
    mid = ((v[:-1] + v[1:]) / 2).astype(F32)
    out = np.concatenate([mid, np.nextafter(mid, F32(np.inf)), np.nextafter(mid, F32(-np.inf))])
    return out.astype(F32)


# ---- codecs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,dtype,count", [("e2m1", E2M1, 16), ("e4m3", E4M3, 256),
                                              ("e8m0", E8M0, 256)])
def test_all_codes_decode_like_ml_dtypes(lib, name, dtype, count):
    codes = np.arange(count, dtype=np.uint8)
    want = codes.view(dtype).astype(F32)
    assert_floats_identical(lib_decode(lib, name, codes), want, f"{name} decode")


def test_e2m1_encode_matches_ml_dtypes(lib):
    rng = np.random.default_rng(11)
    table = np.arange(16, dtype=np.uint8).view(E2M1).astype(F32)
    values = np.concatenate([
        rng.uniform(-8, 8, 20000).astype(F32),
        midpoints_and_neighbours(table),
        np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -5.0, 6.5, 7.0, 1e30, np.inf, -np.inf,
                  -0.0, 0.0, 1e-30, -1e-30], dtype=F32),
    ])
    assert_bytes_equal(lib_encode(lib, "e2m1", values), e2m1_codes(values), "e2m1 encode")


def test_e4m3_encode_matches_ml_dtypes(lib):
    # ml_dtypes turns values beyond the rounding range of 448 (>= 464) into NaN where the library
    # saturates (formats.h), so the random values stay below 464.
    rng = np.random.default_rng(12)
    mags = np.exp2(rng.uniform(-14, np.log2(463.0), 20000))
    values = (mags * rng.choice([-1.0, 1.0], mags.size)).astype(F32)
    table = np.arange(256, dtype=np.uint8).view(E4M3).astype(F32)
    values = np.concatenate([values, midpoints_and_neighbours(table[np.abs(table) <= 448]),
                             np.array([0.0, -0.0, 2.0 ** -10, 2.0 ** -11, 463.99], dtype=F32)])
    assert_bytes_equal(lib_encode(lib, "e4m3", values), values.astype(E4M3).view(np.uint8),
                       "e4m3 encode")


def test_e8m0_encode_matches_ml_dtypes(lib):
    # Inputs stay in the normal fp32 range: ml_dtypes maps every subnormal fp32 input in
    # [2^-127, 2^-126) to 2^-126, where the library picks the nearer power of two.
    rng = np.random.default_rng(13)
    values = np.exp2(rng.uniform(-126, 127.5, 20000)).astype(F32)
    k = np.arange(-126, 127, dtype=np.float64)
    ties = (1.5 * np.exp2(k)).astype(F32)
    values = np.concatenate([values, ties, np.nextafter(ties, F32(0)), np.nextafter(ties, F32(np.inf))])
    assert_bytes_equal(lib_encode(lib, "e8m0", values), values.astype(E8M0).view(np.uint8),
                       "e8m0 encode")


def test_bf16_matches_ml_dtypes(lib):
    rng = np.random.default_rng(14)
    values = np.concatenate([rng.standard_normal(20000).astype(F32),
                             rng.integers(0, 2 ** 32, 20000, dtype=np.uint64).astype(np.uint32).view(F32)])
    values = values[np.isfinite(values)]
    out = np.zeros(values.shape, dtype=np.uint16)
    check(lib, lib.fp4moe_bf16_encode(ptr(values, ctypes.c_float), values.size,
                                      ptr(out, ctypes.c_uint16)))
    assert_bytes_equal(out, values.astype(ml_dtypes.bfloat16).view(np.uint16), "bf16 encode")


# ---- quantizers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("rows,cols,seed", [(1, 16, 1), (17, 48, 2), (64, 256, 3)])
def test_nvfp4_matches_modelopt_recipe(lib, rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = random_blocks(rng, rows, cols, 16)
    amax = np.abs(x).max()
    g = np.full(1, np.nan, dtype=F32)
    check(lib, lib.fp4moe_nvfp4_global_scale(F32(amax), ptr(g, ctypes.c_float)))
    assert g[0] == F32(amax) / F32(6.0 * 448.0)

    data, scales, g_used = lib_quantize_nvfp4(lib, x, g[0], direction=0)
    want_data, want_scales = ref_nvfp4(x, g[0])
    assert g_used == g[0]
    assert_bytes_equal(scales, want_scales, "nvfp4 block scales")
    assert_bytes_equal(data, want_data, "nvfp4 data")

    deq = lib_dequantize(lib, 0, rows, cols, data, scales, g[0])
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(rows, cols // 16, 16)
    want = (codes.view(E2M1).astype(F32) * scales.view(E4M3).astype(F32).reshape(rows, -1, 1)
            * g[0]).reshape(rows, cols)
    assert_floats_identical(deq, want, "nvfp4 dequantize")


def test_nvfp4_encode_direction(lib):
    """FlashInfer-style encode scale: the library reads it as decode = 1 / encode."""
    rng = np.random.default_rng(21)
    x = random_blocks(rng, 8, 64, 16)
    encode = F32(6.0 * 448.0) / np.abs(x).max()
    data, scales, g_used = lib_quantize_nvfp4(lib, x, encode, direction=1)
    decode = F32(1.0) / encode
    assert g_used == decode
    want_data, want_scales = ref_nvfp4(x, decode)
    assert_bytes_equal(scales, want_scales, "nvfp4 block scales (encode direction)")
    assert_bytes_equal(data, want_data, "nvfp4 data (encode direction)")


def test_nvfp4_subnormal_and_clamped_scales(lib):
    rng = np.random.default_rng(22)
    x = (rng.standard_normal((4, 64)) * np.float32(2.0 ** -12)).astype(F32)
    x[0, :16] = 0.0
    data, scales, _ = lib_quantize_nvfp4(lib, x, 1.0, direction=0)
    want_data, want_scales = ref_nvfp4(x, F32(1.0))
    assert (want_scales < 8).any(), "the case must exercise subnormal E4M3 scales"
    assert_bytes_equal(scales, want_scales, "nvfp4 small block scales")
    assert_bytes_equal(data, want_data, "nvfp4 small data")


@pytest.mark.parametrize("rows,cols,seed", [(1, 32, 4), (9, 96, 5), (64, 512, 6)])
def test_mxfp4_matches_ocp_rule(lib, rows, cols, seed):
    rng = np.random.default_rng(seed)
    x = random_blocks(rng, rows, cols, 32)
    data, scales = lib_quantize_mxfp4(lib, x)
    want_data, want_scales = ref_mxfp4(x)
    assert_bytes_equal(scales, want_scales, "mxfp4 block scales")
    assert_bytes_equal(data, want_data, "mxfp4 data")

    deq = lib_dequantize(lib, 1, rows, cols, data, scales, 1.0)
    codes = np.stack([data & 0xF, data >> 4], axis=-1).reshape(rows, cols // 32, 32)
    want = (codes.view(E2M1).astype(F32) * scales.view(E8M0).astype(F32).reshape(rows, -1, 1))
    assert_floats_identical(deq, want.reshape(rows, cols), "mxfp4 dequantize")


def test_mxfp4_extreme_blocks(lib):
    x = np.zeros((1, 128), dtype=F32)
    x[0, 32] = 3e38
    x[0, 64] = 2.0 ** -140
    x[0, 96] = -(2.0 ** -125)
    data, scales = lib_quantize_mxfp4(lib, x)
    want_data, want_scales = ref_mxfp4(x)
    assert_bytes_equal(scales, want_scales, "mxfp4 extreme scales")
    assert_bytes_equal(data, want_data, "mxfp4 extreme data")


# ---- layouts and errors ---------------------------------------------------------------------------


def test_swizzle_matches_spec_formula(lib):
    rows, kcols = 130, 5
    rng = np.random.default_rng(31)
    linear = rng.integers(1, 256, rows * kcols, dtype=np.uint8)
    size = _size(0)
    check(lib, lib.fp4moe_swizzled_128x4_size(rows, kcols, ctypes.byref(size)))
    assert size.value == 256 * 8
    out = np.full(size.value, 0xAA, dtype=np.uint8)
    check(lib, lib.fp4moe_swizzle_scales_128x4(ptr(linear, ctypes.c_uint8), rows, kcols,
                                               ptr(out, ctypes.c_uint8), size.value))
    m, k = np.meshgrid(np.arange(rows), np.arange(kcols), indexing="ij")
    kt = (kcols + 3) // 4
    off = (m // 128) * kt * 512 + (k // 4) * 512 + (m % 32) * 16 + ((m % 128) // 32) * 4 + k % 4
    want = np.zeros(size.value, dtype=np.uint8)
    want[off.reshape(-1)] = linear
    assert_bytes_equal(out, want, "swizzled scales")
    back = np.full(rows * kcols, 0xAA, dtype=np.uint8)
    check(lib, lib.fp4moe_unswizzle_scales_128x4(ptr(out, ctypes.c_uint8), out.size, rows, kcols,
                                                 ptr(back, ctypes.c_uint8)))
    assert_bytes_equal(back, linear, "unswizzled scales")


def test_errors_are_reported_not_raised(lib):
    x = np.ones((2, 24), dtype=F32)
    data = np.zeros(24, dtype=np.uint8)
    scales = np.zeros(3, dtype=np.uint8)
    rc = lib.fp4moe_quantize_nvfp4(ptr(x, ctypes.c_float), 2, 24, F32(1.0), 0,
                                   ptr(data, ctypes.c_uint8), ptr(scales, ctypes.c_uint8), None)
    assert rc != 0
    assert b"multiple" in lib.fp4moe_last_error()

    x = np.ones((1, 32), dtype=F32)
    x[0, 5] = np.nan
    data = np.zeros(16, dtype=np.uint8)
    scales = np.zeros(2, dtype=np.uint8)
    rc = lib.fp4moe_quantize_nvfp4(ptr(x, ctypes.c_float), 1, 32, F32(1.0), 0,
                                   ptr(data, ctypes.c_uint8), ptr(scales, ctypes.c_uint8), None)
    assert rc != 0
    assert b"col 5" in lib.fp4moe_last_error()

    rc = lib.fp4moe_quantize_nvfp4(ptr(np.ones((1, 32), dtype=F32), ctypes.c_float), 1, 32,
                                   F32(1.0), 7, ptr(data, ctypes.c_uint8),
                                   ptr(scales, ctypes.c_uint8), None)
    assert rc != 0
    assert b"direction" in lib.fp4moe_last_error()

    check(lib, lib.fp4moe_quantize_mxfp4(ptr(np.ones((1, 32), dtype=F32), ctypes.c_float), 1, 32,
                                         ptr(data, ctypes.c_uint8), ptr(scales, ctypes.c_uint8)))
    assert lib.fp4moe_last_error() == b"", "a successful call clears the previous error"
