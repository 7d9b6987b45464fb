"""Property-based tests of the host API (hypothesis): for any shape (empty ones included) and any
values (NaN and infinities included), the formats round-trip, routing returns k distinct ids in
range and makes a NaN token's weights NaN, and anything refused is refused with fp4moe.Error.
"""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from test_package_cpu import fp4moe  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
F32 = np.float32


@SETTINGS
@given(rows=st.integers(0, 300), kcols=st.integers(0, 9), seed=st.integers(0, 2**32 - 1))
def test_swizzle_round_trip_any_shape(rows, kcols, seed):
    lin = np.random.default_rng(seed).integers(0, 256, (rows, kcols), dtype=np.uint8)
    sw = fp4moe.swizzle_scales(lin)
    assert sw.shape == (fp4moe.swizzled_size(rows, kcols),)
    assert np.array_equal(fp4moe.unswizzle_scales(sw, rows, kcols), lin)


@SETTINGS
@given(rows=st.integers(-2**63, 2**63 - 1), kcols=st.integers(-2**63, 2**63 - 1))
def test_swizzled_size_any_ints(rows, kcols):
    # Either a size (and then the padded product fits in 64 bits) or fp4moe.Error, never a wrap.
    try:
        n = fp4moe.swizzled_size(rows, kcols)
    except fp4moe.Error:
        return
    assert rows >= 0 and kcols >= 0
    assert n == -(-rows // 128) * -(-kcols // 4) * 512


@SETTINGS
@given(x=hnp.arrays(F32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=0, max_side=6).map(
    lambda s: (s[0], 32 * s[1])), elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
def test_quantize_any_values(x):
    # Finite input quantizes and dequantizes to the same shape; non-finite input is refused.
    for quantize in (fp4moe.quantize_nvfp4, fp4moe.quantize_mxfp4):
        if np.isfinite(x).all():
            m = quantize(x)
            back = fp4moe.dequantize(m)
            assert back.shape == x.shape and np.isfinite(back).all()
        else:
            with pytest.raises(fp4moe.Error, match="non-finite"):
                quantize(x)


METHODS = st.sampled_from(["softmax_topk", "sigmoid_topk", "topk_softmax", "deepseek_v3", "llama4"])


@SETTINGS
@given(method=METHODS, T=st.integers(0, 5), seed=st.integers(0, 2**32 - 1),
       specials=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 7),
                                   st.sampled_from([np.nan, np.inf, -np.inf, 1e30, -1e30])),
                         max_size=4))
def test_route_any_logits(method, T, seed, specials):
    E, k = 8, (1 if method == "llama4" else 3)
    kw = dict(n_group=4, topk_group=2) if method == "deepseek_v3" else {}
    p = fp4moe.make_problem(hidden=64, intermediate=32, num_experts=E, top_k=k, routing=method,
                            router_bias=method in ("topk_softmax", "deepseek_v3"), **kw)
    logits = np.random.default_rng(seed).standard_normal((T, E)).astype(F32)
    for t, e, v in specials:
        if t < T:
            logits[t, e] = v
    bias = np.zeros(E, F32) if p.routing.has_bias else None
    ids, w = fp4moe.route(p, logits, bias)
    assert ids.shape == (T, k) and w.shape == (T, k)
    for t in range(T):
        assert len(set(ids[t].tolist())) == k, (t, ids[t])
        assert ((ids[t] >= 0) & (ids[t] < E)).all(), (t, ids[t])
        if np.isnan(logits[t]).any():
            assert np.isnan(w[t]).all(), (t, logits[t], w[t])
