"""The PyTorch op and MoeExperts on CPU tensors (HostWeights: the CPU reference layer).

Runs without a GPU; skips without PyTorch. The op on CPU must give bitwise the output of
fp4moe.reference_forward on the same inputs (it is that layer behind the op's contract), and refuse
bad arguments with the same fp4moe.Error messages as on CUDA. The package is found as in
test_package_cpu.py: FP4MOE_BUILD_DIR/python first, then the installed one.
"""


import numpy as np
import pytest
from package_under_test import import_fp4moe

torch = pytest.importorskip("torch", reason="PyTorch is not installed")


fp4moe = import_fp4moe()


@pytest.fixture
def rng(request):
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def bits(t):
    return t.view(torch.int16)


def layer(fmt="nvfp4", activation="swiglu", routing="softmax_topk", has_bias=False, E=8, H=128,
          I=64, k=2, seed=1, **extra):
    p = fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E, top_k=k, format=fmt,
                            activation=activation, routing=routing, has_bias=has_bias, **extra)
    w = fp4moe.random_weights(p, seed)
    return p, w


def reference(p, w, x, **kw):
    x16 = x.view(torch.int16).numpy().view(np.uint16)
    conv = {}
    for key, v in kw.items():
        if v is None:
            continue
        conv[key] = v.view(torch.int16).numpy().view(np.uint16) if v.dtype == torch.bfloat16 \
            else v.numpy()
    r = fp4moe.reference_forward(p, w, x16, conv.pop("logits", None), **conv)
    return torch.from_numpy(r.out_bf16_bits.view(np.int16))


CASES = [
    dict(),                                                        # qwen / mixtral-like
    dict(fmt="mxfp4", activation="swiglu_oai", routing="topk_softmax", router_bias=True,
         has_bias=True),                                           # gpt-oss-like
    dict(routing="deepseek_v3", router_bias=True, n_group=4, topk_group=2,
         routed_scaling_factor=2.5),                               # deepseek-like
    dict(routing="llama4", k=1),                                   # llama4: input scaling
    dict(activation="relu2"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.get("routing", "softmax_topk") + "-" +
                         c.get("activation", "swiglu"))
@pytest.mark.parametrize("T", [0, 1, 7])
def test_op_on_cpu_is_the_reference(rng, case, T):
    p, w = layer(**case)
    hw = fp4moe.to_device(p, w, "cpu")
    assert isinstance(hw, fp4moe.HostWeights) and hw.device == "cpu"
    x = torch.from_numpy(rng.standard_normal((T, p.hidden), dtype=np.float32)).bfloat16()
    logits = torch.from_numpy(rng.standard_normal((T, p.num_experts), dtype=np.float32))
    bias = None
    if p.routing.has_bias:
        bias = torch.from_numpy(rng.standard_normal(p.num_experts, dtype=np.float32))
    got = fp4moe.moe_forward(hw, x, logits, router_bias=bias)
    assert got.dtype == torch.bfloat16 and got.shape == (T, p.hidden) and got.device.type == "cpu"
    want = reference(p, w, x, logits=logits, router_bias=bias)
    assert torch.equal(bits(got), want)
    if T:
        assert got.float().abs().sum() > 0
    # bf16 logits, the module, the raw op and a leading batch shape give the same.
    got16 = fp4moe.moe_forward(hw, x, logits.bfloat16(), router_bias=bias)
    assert torch.equal(bits(got16), reference(p, w, x, logits=logits.bfloat16(), router_bias=bias))
    m = fp4moe.MoeExperts(hw, bias)
    assert m.device == torch.device("cpu")
    assert torch.equal(bits(m(x, logits)), want)
    if T:
        x3 = x.reshape(1, T, -1)
        assert torch.equal(bits(m(x3, logits.reshape(1, T, -1))).reshape(T, -1), want)
    raw = torch.ops.fp4moe.moe_forward(x, logits, bias, None, None, fp4moe._torch.handle(hw), None)
    assert torch.equal(bits(raw), want)


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_precomputed_topk_on_cpu(rng, fmt):
    # Precomputed top-k on a problem whose routing has a router bias (the bias is then unused).
    p, w = layer(fmt=fmt, routing="topk_softmax", router_bias=True, activation="swiglu_oai",
                 has_bias=True, E=16, k=4)
    hw = fp4moe.to_device(p, w, torch.device("cpu"))
    T = 5
    x = torch.from_numpy(rng.standard_normal((T, p.hidden), dtype=np.float32)).bfloat16()
    ids = torch.from_numpy(np.stack([rng.permutation(16)[:4] for _ in range(T)]).astype(np.int32))
    tw = torch.from_numpy(rng.random((T, 4), dtype=np.float32))
    got = fp4moe.MoeExperts(hw)(x, topk_ids=ids, topk_weights=tw)
    want = reference(p, w, x, topk_ids=ids, topk_weights=tw)
    assert torch.equal(bits(got), want)
    # Each slot is one expert's output times its weight: zero weights remove experts.
    tw0 = tw.clone()
    tw0[:, 1:] = 0
    one = fp4moe.moe_forward(hw, x, topk_ids=ids, topk_weights=tw0)
    assert not torch.equal(bits(one), bits(got))


def test_nan_token_stays_local_on_cpu(rng):
    p, w = layer()
    hw = fp4moe.to_device(p, w, "cpu")
    x = torch.from_numpy(rng.standard_normal((3, p.hidden), dtype=np.float32)).bfloat16()
    logits = torch.from_numpy(rng.standard_normal((3, p.num_experts), dtype=np.float32))
    clean = fp4moe.moe_forward(hw, x, logits)
    logits[1, 3] = float("nan")
    got = fp4moe.moe_forward(hw, x, logits)
    assert torch.isnan(got[1].float()).all()
    assert torch.equal(bits(got[[0, 2]]), bits(clean[[0, 2]]))


def test_torch_compile_traces_the_cpu_op(rng):
    p, w = layer()
    m = fp4moe.MoeExperts(fp4moe.to_device(p, w, "cpu"))
    f = torch.compile(lambda x, lg: m(x, lg), backend="aot_eager", fullgraph=True, dynamic=True)
    for T in (3, 5):
        x = torch.from_numpy(rng.standard_normal((T, p.hidden), dtype=np.float32)).bfloat16()
        lg = torch.from_numpy(rng.standard_normal((T, p.num_experts), dtype=np.float32))
        assert torch.equal(bits(f(x, lg)), bits(m(x, lg)))


def test_cpu_op_rejects_bad_inputs(rng):
    p, w = layer()
    hw = fp4moe.to_device(p, w, "cpu")
    x = torch.randn(4, 128).bfloat16()
    logits = torch.randn(4, 8)
    cases = [
        (dict(x=x.float(), router_logits=logits), "x must have dtype bfloat16"),
        (dict(x=x[:, :64].contiguous(), router_logits=logits), r"x must have shape \[4, 128\]"),
        (dict(x=torch.randn(1, 4, 128).bfloat16(), router_logits=logits), "x must be 2-D"),
        (dict(x=torch.randn(128, 4).bfloat16().t(), router_logits=logits), "x must be contiguous"),
        (dict(x=x, router_logits=logits.double()),
         "router_logits must have dtype float32 or bfloat16"),
        (dict(x=x, router_logits=logits[:, :7].contiguous()), r"router_logits must have shape \[4, 8\]"),
        (dict(x=x, router_logits=torch.randn(8, 4).t()), "router_logits must be contiguous"),
        (dict(x=x), "pass router_logits"),
        (dict(x=x, router_logits=logits, router_bias=torch.zeros(8)), "no router bias"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int64), topk_weights=torch.ones(4, 2)),
         "topk_ids must have dtype int32"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int32),
              topk_weights=torch.ones(4, 2).bfloat16()), "topk_weights must have dtype float32"),
        (dict(x=x, topk_ids=torch.zeros(4, 3, dtype=torch.int32), topk_weights=torch.ones(4, 3)),
         r"topk_ids must have shape \[4, 2\]"),
        (dict(x=x, topk_ids=torch.zeros(4, 2, dtype=torch.int32)), "together"),
        (dict(x=x, router_logits=logits, topk_ids=torch.zeros(4, 2, dtype=torch.int32),
              topk_weights=torch.ones(4, 2)), "not both"),
        (dict(x=x, router_logits=logits, workspace=torch.empty(16, dtype=torch.uint8)),
         "workspace holds 16 bytes"),
        # An expert id out of range is refused by the reference on the host.
        (dict(x=x, topk_ids=torch.full((4, 2), 8, dtype=torch.int32),
              topk_weights=torch.ones(4, 2)), r"topk_ids\[0\]\[0\] = 8 is outside"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(fp4moe.Error, match=msg):
            fp4moe.moe_forward(hw, **kwargs)
    # Biased routing needs its bias.
    pb, wb = layer(routing="topk_softmax", router_bias=True)
    with pytest.raises(fp4moe.Error, match="has a router bias"):
        fp4moe.moe_forward(fp4moe.to_device(pb, wb, "cpu"), x, logits)
    # A freed HostWeights is reported through its handle.
    h = fp4moe._torch.handle(hw)
    del hw
    import gc

    gc.collect()
    with pytest.raises(fp4moe.Error, match="does not exist"):
        torch.ops.fp4moe.moe_forward(x, logits, None, None, None, h, None)


def test_host_weights_are_checked():
    p, w = layer()
    with pytest.raises(fp4moe.Error, match="MoeProblem"):
        fp4moe.HostWeights("qwen", w)
    with pytest.raises(fp4moe.Error, match="MoeWeights"):
        fp4moe.HostWeights(p, None)
    other = fp4moe.make_problem(hidden=256, intermediate=64, num_experts=8, top_k=2)
    with pytest.raises(fp4moe.Error):
        fp4moe.HostWeights(other, w)
    with pytest.raises(fp4moe.Error, match="DeviceWeights .*HostWeights"):
        fp4moe.MoeExperts(w)
    with pytest.raises(fp4moe.Error, match="NumPy"):
        fp4moe.moe_forward(fp4moe.HostWeights(p, w), np.zeros((1, 128), np.float32))
    # The problem is copied: changing the caller's afterwards changes nothing.
    hw = fp4moe.HostWeights(p, w)
    p.top_k = 3
    assert hw.problem.top_k == 2
    assert "HostWeights" in repr(hw)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the cross-device errors")
def test_device_mismatch_is_an_error():
    if not fp4moe.gpu_available():
        pytest.skip(f"fp4moe GPU path unavailable: {fp4moe.gpu_unavailable_reason()}")
    p, w = layer()
    x = torch.randn(2, 128).bfloat16()
    logits = torch.randn(2, 8)
    dw = fp4moe.to_device(p, w, "cuda")
    with pytest.raises(fp4moe.Error, match="CUDA tensors, or run on the CPU with HostWeights"):
        fp4moe.moe_forward(dw, x, logits)
    hw = fp4moe.to_device(p, w, "cpu")
    with pytest.raises(fp4moe.Error, match="pass CPU tensors"):
        fp4moe.moe_forward(hw, x.cuda(), logits.cuda())
    # The GPU and the CPU reference agree to SPEC's tolerance.
    xs = torch.randn(16, 128).bfloat16()
    ls = torch.randn(16, 8)
    g = fp4moe.moe_forward(dw, xs.cuda(), ls.cuda()).cpu().float()
    c = fp4moe.moe_forward(hw, xs, ls).float()
    assert ((g - c).norm() / c.norm()).item() < 1e-2
