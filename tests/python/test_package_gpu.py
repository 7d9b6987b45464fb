"""GPU path of the fp4moe Python package through PyTorch: the op against an independent PyTorch
float32 implementation of SPEC, CUDA-graph capture and replay, torch.compile, and argument checks.

Skips (with the reason) without PyTorch, without a CUDA device, or without a Hopper GPU. The
package is found as in test_package_cpu.py: FP4MOE_BUILD_DIR/python first, then the installed one.
"""


import numpy as np
import pytest
from package_under_test import import_fp4moe, require_gpu

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
ml_dtypes = pytest.importorskip("ml_dtypes")


fp4moe = import_fp4moe()

require_gpu(fp4moe, torch)

DEV = torch.device("cuda", torch.cuda.current_device())
E2M1_VALUES = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]


@pytest.fixture(autouse=True)
def exact_fp32_matmul():
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


# ---- an independent PyTorch implementation of SPEC -------------------------------------------------


def t_dequantize(packed, scales, fmt, g):
    """float32 [E, rows, cols] from packed codes [E, rows, cols/2], scales and per-expert g."""
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=packed.device)
    codes = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).long()
    v = lut[codes]
    if fmt == "nvfp4":
        s = scales.view(torch.float8_e4m3fn).float()
        v = v * s.repeat_interleave(16, dim=-1)
        return v * g.view(-1, 1, 1)
    s = torch.exp2(scales.float() - 127)
    return v * s.repeat_interleave(32, dim=-1)


def t_route(method, logits, k, bias=None, renormalize=True):
    logits = logits.float()
    if method == "softmax_topk":
        probs = torch.softmax(logits, dim=-1)
        w, ids = torch.topk(probs, k, dim=-1)
        if renormalize:
            w = w / w.sum(dim=-1, keepdim=True)
    elif method == "topk_softmax":
        top, ids = torch.topk(logits + (bias if bias is not None else 0), k, dim=-1)
        w = torch.softmax(top, dim=-1)
    else:
        raise AssertionError(method)
    return ids.int(), w


def t_activation(kind, gate, up, alpha=1.702, limit=7.0):
    if kind == "swiglu":
        return torch.nn.functional.silu(gate) * up
    if kind == "swiglu_oai":
        g = gate.clamp(max=limit)
        return (up.clamp(-limit, limit) + 1) * g * torch.sigmoid(alpha * g)
    if kind == "relu2":
        return torch.relu(up) ** 2
    raise AssertionError(kind)


def t_layer(kind, x, ids, tw, W):
    """SPEC "The layer" in float32, looping over experts; `a` rounded to bf16, out once."""
    x = x.float()
    T, H = x.shape
    out = torch.zeros(T, H, dtype=torch.float32, device=x.device)
    for e in range(W["up"].shape[0]):
        tok, slot = (ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x[tok]
        up = xe @ W["up"][e].T + (W["up_bias"][e] if W["up_bias"] is not None else 0)
        gate = up
        if W["gate"] is not None:
            gate = xe @ W["gate"][e].T + (W["gate_bias"][e] if W["gate_bias"] is not None else 0)
        a = t_activation(kind, gate, up).bfloat16().float()
        y = a @ W["down"][e].T + (W["down_bias"][e] if W["down_bias"] is not None else 0)
        out.index_add_(0, tok, tw[tok, slot].unsqueeze(1) * y)
    return out.bfloat16()


# ---- layers ---------------------------------------------------------------------------------------


def random_fp4(rng, shape, fmt):
    *lead, rows, cols = shape
    packed = rng.integers(0, 256, size=(*lead, rows, cols // 2), dtype=np.uint8)
    if fmt == "nvfp4":
        s = rng.uniform(0.25, 2.0, size=(*lead, rows, cols // 16)).astype(ml_dtypes.float8_e4m3fn)
        return packed, s.view(np.uint8)
    return packed, rng.integers(127 - 8, 127 - 5, size=(*lead, rows, cols // 32), dtype=np.uint8)


def make_layer(rng, fmt, kind, routing, has_bias, E, H, I, k):
    p = fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E, top_k=k, format=fmt,
                            activation=kind, routing=routing, has_bias=has_bias,
                            router_bias=routing == "topk_softmax")
    gated = kind != "relu2"
    nv = fmt == "nvfp4"
    arrays = {}
    if gated:
        arrays["gate"], arrays["gate_scales"] = random_fp4(rng, (E, I, H), fmt)
    arrays["up"], arrays["up_scales"] = random_fp4(rng, (E, I, H), fmt)
    arrays["down"], arrays["down_scales"] = random_fp4(rng, (E, H, I), fmt)
    for name in (["gate"] if gated else []) + ["up", "down"]:
        if nv:  # per-expert global scales that differ between gate and up
            arrays[f"{name}_global_scale"] = rng.uniform(0.002, 0.01, E).astype(np.float32)
    if has_bias:
        for name, n in ([("gate", I)] if gated else []) + [("up", I), ("down", H)]:
            arrays[f"{name}_bias"] = (0.1 * rng.standard_normal((E, n))).astype(np.float32)
    host = fp4moe.make_weights(p, **arrays)
    dw = fp4moe.to_device(p, host, DEV)

    def t(a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).to(DEV)

    ones = torch.ones(E, device=DEV)
    W = {
        "gate": t_dequantize(t(arrays["gate"]), t(arrays["gate_scales"]), fmt,
                             t(arrays.get("gate_global_scale")) if nv else ones) if gated else None,
        "up": t_dequantize(t(arrays["up"]), t(arrays["up_scales"]), fmt,
                           t(arrays.get("up_global_scale")) if nv else ones),
        "down": t_dequantize(t(arrays["down"]), t(arrays["down_scales"]), fmt,
                             t(arrays.get("down_global_scale")) if nv else ones),
        "gate_bias": t(arrays.get("gate_bias")),
        "up_bias": t(arrays.get("up_bias")),
        "down_bias": t(arrays.get("down_bias")),
    }
    return p, host, dw, W


def rel_l2(got, want):
    got, want = got.float(), want.float()
    return (torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).item()


def poison_allocator(shape):
    # The op allocates its output with torch.empty: hand it a block that held NaNs, so that an
    # element the kernel does not write shows up.
    torch.full(shape, float("nan"), dtype=torch.bfloat16, device=DEV)
    torch.cuda.synchronize()


CASES = [
    # fmt, activation, routing, biases, E, H, I, k, T, logits dtype
    ("nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2, 1, torch.float32),
    ("nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2, 130, torch.bfloat16),
    ("nvfp4", "swiglu", "softmax_topk", False, 16, 192, 80, 4, 7, torch.float32),
    ("mxfp4", "swiglu_oai", "topk_softmax", True, 8, 256, 128, 2, 5, torch.float32),
    ("nvfp4", "relu2", "precomputed", False, 8, 256, 128, 2, 9, None),
]


@pytest.mark.parametrize("fmt,kind,routing,has_bias,E,H,I,k,T,ldtype", CASES)
def test_op_matches_pytorch_spec(rng, fmt, kind, routing, has_bias, E, H, I, k, T, ldtype):
    p, host, dw, W = make_layer(rng, fmt, kind, routing, has_bias, E, H, I, k)
    x = torch.from_numpy(rng.standard_normal((T, H)).astype(np.float32)).to(DEV).bfloat16()
    bias = None
    if routing == "precomputed":
        ids = torch.from_numpy(np.stack([rng.permutation(E)[:k] for _ in range(T)])).int().to(DEV)
        tw = torch.from_numpy(rng.uniform(0.1, 1, (T, k)).astype(np.float32)).to(DEV)
        kwargs = dict(topk_ids=ids, topk_weights=tw)
    else:
        logits = torch.from_numpy(2 * rng.standard_normal((T, E)).astype(np.float32)).to(DEV)
        logits = logits.to(ldtype)
        if p.routing.has_bias:
            bias = torch.from_numpy(0.5 * rng.standard_normal(E).astype(np.float32)).to(DEV)
        ids, tw = t_route(routing, logits, k, bias)
        kwargs = dict(router_logits=logits, router_bias=bias)
    want = t_layer(kind, x, ids, tw, W)

    poison_allocator((T, H))
    out = fp4moe.moe_forward(dw, x, **kwargs)
    torch.cuda.synchronize()
    assert out.shape == (T, H) and out.dtype == torch.bfloat16 and out.device == DEV
    assert not torch.isnan(out).any(), "NaN in the output (an element left unwritten?)"
    err = rel_l2(out, want)
    assert err < 1e-2, f"relative L2 error {err:.2e} against the PyTorch float32 layer"

    again = fp4moe.moe_forward(dw, x, **kwargs)
    assert torch.equal(out.view(torch.int16), again.view(torch.int16)), "not deterministic"

    # The DLPack entry point gives the same bits (out poisoned with NaN first).
    out2 = torch.full((T, H), float("nan"), dtype=torch.bfloat16, device=DEV)
    ws = torch.empty(fp4moe.workspace_size(p, T), dtype=torch.uint8, device=DEV)
    fp4moe._C.moe_forward_dlpack(dw, x, out2, ws, torch.cuda.current_stream().cuda_stream,
                                 kwargs.get("router_logits"), bias, kwargs.get("topk_ids"),
                                 kwargs.get("topk_weights"))
    torch.cuda.synchronize()
    assert torch.equal(out.view(torch.int16), out2.view(torch.int16))


def test_op_matches_cpu_reference(rng):
    p, host, dw, _ = make_layer(rng, "nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2)
    x = rng.standard_normal((33, 256)).astype(np.float32)
    logits = (2 * rng.standard_normal((33, 8))).astype(np.float32)
    ref = fp4moe.reference_forward(p, host, x, logits)
    out = fp4moe.moe_forward(dw, torch.from_numpy(x).to(DEV).bfloat16(),
                             torch.from_numpy(logits).to(DEV))
    err = rel_l2(out.cpu(), torch.from_numpy(ref.out))
    assert err < 1e-2, err


def test_zero_tokens(rng):
    p, _, dw, _ = make_layer(rng, "nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2)
    out = fp4moe.moe_forward(dw, torch.empty(0, 256, dtype=torch.bfloat16, device=DEV),
                             torch.empty(0, 8, device=DEV))
    assert out.shape == (0, 256)


def test_cuda_graph_capture_and_replay(rng):
    p, _, dw, _ = make_layer(rng, "nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2)
    T = 4
    x = torch.randn(T, 256, device=DEV).bfloat16()
    logits = torch.randn(T, 8, device=DEV)
    experts = fp4moe.MoeExperts(dw)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up off the default stream, as PyTorch recommends
        eager = experts(x, logits)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_out = experts(x, logits)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(static_out.view(torch.int16), eager.view(torch.int16))
    # New inputs in the captured buffers: the replay follows them.
    x.copy_(torch.randn(T, 256, device=DEV).bfloat16())
    logits.copy_(torch.randn(T, 8, device=DEV))
    g.replay()
    torch.cuda.synchronize()
    want = experts(x, logits)
    assert torch.equal(static_out.view(torch.int16), want.view(torch.int16))
    assert not torch.equal(static_out, eager)


@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
def test_torch_compile(rng, mode):
    p, _, dw, _ = make_layer(rng, "nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2)
    router = torch.nn.Linear(256, 8, bias=False, device=DEV, dtype=torch.bfloat16)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.router = router
            self.experts = fp4moe.MoeExperts(dw)

        def forward(self, h):
            return self.experts(h, self.router(h).float()) + h

    block = Block()
    compiled = torch.compile(block, mode=mode, fullgraph=True)
    for T in (3, 3, 3, 5):
        h = torch.randn(T, 256, device=DEV).bfloat16()
        got = compiled(h).clone()
        want = block(h)
        torch.cuda.synchronize()
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), T


def test_rejects_bad_inputs(rng):
    p, _, dw, _ = make_layer(rng, "nvfp4", "swiglu", "softmax_topk", False, 8, 256, 128, 2)
    x = torch.randn(4, 256, device=DEV).bfloat16()
    logits = torch.randn(4, 8, device=DEV)
    f = fp4moe.moe_forward
    cases = [
        (dict(x=x.float(), router_logits=logits), "x must have dtype bfloat16"),
        (dict(x=x[:, :128], router_logits=logits), r"x must have shape \[4, 256\]"),
        (dict(x=torch.randn(256, 4, device=DEV).bfloat16().t(), router_logits=logits),
         "x must be contiguous"),
        (dict(x=x, router_logits=logits.double()), "router_logits must have dtype float32 or bfloat16"),
        (dict(x=x, router_logits=logits[:, :7]), r"router_logits must have shape \[4, 8\]"),
        (dict(x=x, router_logits=torch.randn(8, 4, device=DEV).t()), "router_logits must be contiguous"),
        (dict(x=x, router_logits=logits.cpu()), "router_logits is on cpu"),
        (dict(x=x), "pass router_logits"),
        (dict(x=x, router_logits=logits, router_bias=torch.zeros(8, device=DEV)), "no router bias"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int64, device=DEV),
              topk_weights=torch.ones(4, 2, device=DEV)), "topk_ids must have dtype int32"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int32, device=DEV),
              topk_weights=torch.ones(4, 2, device=DEV).bfloat16()), "topk_weights must have dtype float32"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int32, device=DEV)), "together"),
        (dict(x=x, router_logits=logits, workspace=torch.empty(16, dtype=torch.uint8, device=DEV)),
         "workspace holds 16 bytes"),
        (dict(x=x.cpu(), router_logits=logits.cpu()), "CUDA"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(fp4moe.Error, match=msg):
            f(dw, **kwargs)
    # DLPack path: its own checks, in C++.
    out = torch.empty(4, 256, dtype=torch.bfloat16, device=DEV)
    ws = torch.empty(fp4moe.workspace_size(p), dtype=torch.uint8, device=DEV)
    with pytest.raises(fp4moe.Error, match="x must have dtype bfloat16"):
        fp4moe._C.moe_forward_dlpack(dw, x.float(), out, ws, 0, logits)
    with pytest.raises(fp4moe.Error, match="logits must be C-contiguous"):
        fp4moe._C.moe_forward_dlpack(dw, x, out, ws, 0, torch.randn(8, 4, device=DEV).t())
    # A released or collected DeviceWeights is reported, not used.
    h = fp4moe._torch.handle(dw)
    dw.release()
    with pytest.raises(fp4moe.Error, match="released"):
        torch.ops.fp4moe.moe_forward(x, logits, None, None, None, h, None)
    del dw
    import gc

    gc.collect()
    with pytest.raises(fp4moe.Error, match="does not exist"):
        torch.ops.fp4moe.moe_forward(x, logits, None, None, None, h, None)


def test_upload_to_wrong_device_index_is_rejected(rng):
    p = fp4moe.make_problem(hidden=256, intermediate=128, num_experts=8, top_k=2)
    packed = fp4moe.prepack(p, fp4moe.random_weights(p, 3))
    with pytest.raises(fp4moe.Error, match="does not exist"):
        fp4moe.upload(p, packed, device=torch.cuda.device_count())


def test_empty_batch_precomputed_with_router_bias_and_nan_token():
    # gpt-oss-like problem: topk_softmax with a router bias, MXFP4, expert biases.
    p = fp4moe.make_problem(hidden=256, intermediate=128, num_experts=8, top_k=2, format="mxfp4",
                            routing="topk_softmax", router_bias=True, activation="swiglu_oai",
                            has_bias=True)
    dw = fp4moe.to_device(p, fp4moe.random_weights(p, 5))
    bias = torch.zeros(8, device=DEV)
    # T = 0: empty in, empty out, through the op and the DLPack path.
    out = fp4moe.moe_forward(dw, torch.empty(0, 256, dtype=torch.bfloat16, device=DEV),
                             torch.empty(0, 8, device=DEV), router_bias=bias)
    assert out.shape == (0, 256)
    ws = torch.empty(fp4moe.workspace_size(p), dtype=torch.uint8, device=DEV)
    empty = torch.empty(0, 256, dtype=torch.bfloat16, device=DEV)
    fp4moe._C.moe_forward_dlpack(dw, empty, empty, ws, torch.cuda.current_stream().cuda_stream,
                                 torch.empty(0, 8, device=DEV), bias)
    # Precomputed top-k for a problem whose routing has a router bias: the bias is unused.
    x = torch.randn(3, 256, device=DEV).bfloat16()
    ids = torch.tensor([[0, 1], [2, 3], [4, 5]], dtype=torch.int32, device=DEV)
    tw = torch.full((3, 2), 0.5, device=DEV)
    pre = fp4moe.moe_forward(dw, x, topk_ids=ids, topk_weights=tw)
    assert torch.isfinite(pre.float()).all()
    # A NaN logit makes that token NaN and leaves the others bitwise unchanged.
    logits = torch.randn(3, 8, device=DEV)
    clean = fp4moe.moe_forward(dw, x, logits, router_bias=bias)
    logits[1, 4] = float("nan")
    got = fp4moe.moe_forward(dw, x, logits, router_bias=bias)
    torch.cuda.synchronize()
    assert torch.isnan(got[1].float()).all()
    assert torch.equal(got[[0, 2]].view(torch.int16), clean[[0, 2]].view(torch.int16))
