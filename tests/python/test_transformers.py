"""fp4moe.transformers.patch_model on tiny models of every supported model type.

Each model is built from transformers' own config and model classes with random weights (sizes that
meet the library's block multiples: H = 64, I = 32). Its routed experts are quantized here to NVFP4
or MXFP4 with the library's quantizers; the oracle is the same model with those expert weights
replaced by the dequantized FP4 values (running transformers' own expert code). The patched model
(either quantizing the model's bf16 experts itself, or loading an FP4 checkpoint written here in the
ModelOpt NVFP4 or gpt-oss MXFP4 layout) must give the oracle's logits within bf16 tolerance, be
clearly closer to it than to the unquantized model, and generate the same greedy tokens (a different
token only where the oracle's two best logits are tied within that tolerance).

The CPU tests run the CPU reference (HostWeights); the same tests on CUDA skip, saying why, without
a CUDA device or the fp4moe GPU path. Skips without PyTorch or transformers, and for model types the
installed transformers does not have.

The two models' experts round differently (fp4moe accumulates in fp32 and rounds once, the model's
experts round in bf16), so the hidden states that reach a later layer's router differ by ~1e-3. Where
two experts' router logits are closer than that, top-k picks different experts in the two models and
that token's output differs by O(0.1), on tokens that depend on the PyTorch build and the CPU. The
whole-model comparisons therefore give both models the same routing: the patched model routes with
its own routers, and the oracle's routers return the patched model's router outputs after checking
that they saw the same hidden states within bf16 tolerance. Each model still runs its own code on
those outputs (transformers' MoE blocks in the oracle, fp4moe's replacements in the patched model).
"""

import contextlib
import copy
import json
import zlib

import numpy as np
import pytest
from package_under_test import import_fp4moe

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
transformers = pytest.importorskip("transformers", reason="transformers is not installed")


fp4moe = import_fp4moe("transformers")

H, I, E, VOCAB = 64, 32, 8, 96

# ---- tiny models ---------------------------------------------------------------------------------


def _common(**over):
    d = dict(vocab_size=VOCAB, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    d.update(over)
    return d


def _config(kind):
    """The tiny config of a model type; skips when this transformers lacks its classes."""
    def cls(name):
        c = getattr(transformers, name, None)
        if c is None:
            pytest.skip(f"transformers {transformers.__version__} has no {name}")
        return c

    if kind == "qwen3_moe":
        return cls("Qwen3MoeConfig")(**_common(head_dim=16), intermediate_size=64,
                                     moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                                     norm_topk_prob=True)
    if kind == "qwen3_next":
        return cls("Qwen3NextConfig")(**_common(head_dim=16), intermediate_size=64,
                                      moe_intermediate_size=I, num_experts=E, num_experts_per_tok=2,
                                      shared_expert_intermediate_size=32,
                                      layer_types=["linear_attention", "full_attention"],
                                      linear_num_key_heads=2, linear_num_value_heads=4,
                                      linear_key_head_dim=16, linear_value_head_dim=16)
    if kind == "mixtral":
        return cls("MixtralConfig")(**_common(head_dim=16), intermediate_size=I,
                                    num_local_experts=E, num_experts_per_tok=2)
    if kind == "gpt_oss":
        return cls("GptOssConfig")(**_common(head_dim=16), intermediate_size=I,
                                   num_local_experts=E, num_experts_per_tok=2,
                                   layer_types=["sliding_attention", "full_attention"],
                                   sliding_window=8)
    if kind in ("deepseek_v3", "kimi_k2"):
        groups = dict(n_group=2, topk_group=1, routed_scaling_factor=2.5) if kind == "deepseek_v3" \
            else dict(n_group=1, topk_group=1, routed_scaling_factor=2.827)
        return cls("DeepseekV3Config")(**_common(num_key_value_heads=4), intermediate_size=64,
                                       moe_intermediate_size=I, n_routed_experts=E,
                                       num_experts_per_tok=2, n_shared_experts=1,
                                       first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=32,
                                       qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
                                       **groups)
    if kind == "glm4_moe":
        # The first layer dense: the MoE layer is layer 1.
        return cls("Glm4MoeConfig")(**_common(head_dim=16, num_hidden_layers=3),
                                    intermediate_size=64, moe_intermediate_size=I,
                                    n_routed_experts=E, num_experts_per_tok=2, n_group=1,
                                    topk_group=1, n_shared_experts=1, first_k_dense_replace=1)
    if kind == "llama4":
        return cls("Llama4TextConfig")(**_common(head_dim=16), intermediate_size=I,
                                       intermediate_size_mlp=64, num_local_experts=4,
                                       num_experts_per_tok=1, interleave_moe_layer_step=1)
    raise AssertionError(kind)


KINDS = ["qwen3_moe", "qwen3_next", "mixtral", "gpt_oss", "deepseek_v3", "kimi_k2", "glm4_moe",
         "llama4"]

# How transformers' experts modules hold W13 = [gate; up] and W2 (written from the modeling files).
LAYOUT = {"Qwen3MoeExperts": "stacked", "Qwen3NextExperts": "stacked", "MixtralExperts": "stacked",
          "DeepseekV3Experts": "stacked", "Glm4MoeExperts": "stacked", "GptOssExperts": "gpt_oss",
          "Llama4TextExperts": "llama4"}


def seed_of(*parts):
    return zlib.crc32("/".join(map(str, parts)).encode())


def make_model(kind, seed):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind), dtype=torch.bfloat16)
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, mod in model.named_modules():
            cls = type(mod).__name__
            if cls in LAYOUT:  # experts large enough to matter next to the residual
                mod.gate_up_proj.copy_(torch.randn(mod.gate_up_proj.shape, generator=g) * 0.15)
                mod.down_proj.copy_(torch.randn(mod.down_proj.shape, generator=g) * 0.2)
                for b in ("gate_up_proj_bias", "down_proj_bias"):
                    if hasattr(mod, b):
                        getattr(mod, b).copy_(torch.randn(getattr(mod, b).shape, generator=g) * 0.1)
            elif name.endswith((".gate", ".router")) and hasattr(mod, "weight"):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.25)
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.copy_(torch.rand(E, generator=g) * 0.1)
    return model


def experts_of(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__ in LAYOUT]


def get_matrices(mod, e):
    """float32 gate [I, H], up [I, H], down [H, I] of expert e; biases (gate, up, down) or None."""
    layout = LAYOUT[type(mod).__name__]
    gu, dn = mod.gate_up_proj[e].detach().cpu().float(), mod.down_proj[e].detach().cpu().float()
    n = gu.shape[0] // 2 if layout == "stacked" else gu.shape[1] // 2
    if layout == "stacked":
        return gu[:n], gu[n:], dn
    if layout == "gpt_oss":
        return gu[:, 0::2].T, gu[:, 1::2].T, dn.T
    return gu[:, :n].T, gu[:, n:].T, dn.T


def set_matrices(mod, e, gate, up, down):
    layout = LAYOUT[type(mod).__name__]
    with torch.no_grad():
        if layout == "stacked":
            mod.gate_up_proj[e] = torch.cat([gate, up]).bfloat16()
            mod.down_proj[e] = down.bfloat16()
            return
        gu = torch.empty(gate.shape[1], 2 * gate.shape[0])
        if layout == "gpt_oss":
            gu[:, 0::2], gu[:, 1::2] = gate.T, up.T
        else:
            gu[:, : gate.shape[0]], gu[:, gate.shape[0]:] = gate.T, up.T
        mod.gate_up_proj[e] = gu.bfloat16()
        mod.down_proj[e] = down.T.bfloat16()


def quantize(m, fmt):
    a = np.ascontiguousarray(m.numpy(), dtype=np.float32)
    q = fp4moe.quantize_nvfp4(a) if fmt == "nvfp4" else fp4moe.quantize_mxfp4(a)
    return q, torch.from_numpy(fp4moe.dequantize(q))


def fake_quantize(model, fmt):
    """Replaces every expert weight by its FP4-dequantized value, in place; returns the quantized
    matrices {experts module name: [(gate, up, down) per expert]}."""
    out = {}
    for name, mod in experts_of(model):
        qs = []
        for e in range(mod.gate_up_proj.shape[0]):
            (qg, g), (qu, u), (qd, d) = (quantize(m, fmt) for m in get_matrices(mod, e))
            set_matrices(mod, e, g, u, d)
            qs.append((qg, qu, qd))
        out[name] = qs
    return out


# ---- FP4 checkpoints -----------------------------------------------------------------------------


def write_safetensors(path, tensors):
    """tensors: {name: (safetensors dtype, shape, bytes)}, written back to back."""
    header, offset = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for _, _, data in tensors.values():
            f.write(data)


def _t(a, dtype):
    a = np.ascontiguousarray(a)
    return (dtype, a.shape, a.tobytes())


def _bf16(t):
    t = t.detach().cpu().contiguous()
    return ("BF16", tuple(t.shape), t.view(torch.int16).numpy().tobytes())


def write_checkpoint(directory, model, kind, fmt, quantized):
    """An FP4 checkpoint of the model's MoE layers: ModelOpt NVFP4 (per-expert tensors, decode
    global scales) or, for gpt-oss, the Hugging Face MXFP4 layout (fused, interleaved gate/up),
    with each block's router from the model."""
    tensors = {}
    for name, qs in quantized.items():
        prefix = name + "."
        block = name.rsplit(".", 1)[0] + "."
        mod = dict(model.named_modules())[name]
        if fmt == "nvfp4":
            for e, triple in enumerate(qs):
                for proj, q in zip(("gate_proj", "up_proj", "down_proj"), triple):
                    base = f"{prefix}{e}.{proj}."
                    tensors[base + "weight"] = _t(q.data, "U8")
                    tensors[base + "weight_scale"] = _t(np.asarray(q.scales).view(np.uint8), "F8_E4M3")
                    tensors[base + "weight_scale_2"] = _t(np.float32(q.global_scale).reshape(()), "F32")
                    tensors[base + "input_scale"] = _t(np.float32(1.0).reshape(()), "F32")
        else:
            assert kind == "gpt_oss"
            gate_up = np.stack([np.stack([qg.data, qu.data], 1).reshape(2 * I, H // 2)
                                for qg, qu, _ in qs])
            gate_up_s = np.stack([np.stack([np.asarray(qg.scales), np.asarray(qu.scales)], 1)
                                  .reshape(2 * I, H // 32) for qg, qu, _ in qs])
            down = np.stack([qd.data for _, _, qd in qs])
            down_s = np.stack([np.asarray(qd.scales) for _, _, qd in qs])
            tensors[prefix + "gate_up_proj_blocks"] = _t(gate_up.reshape(E, 2 * I, H // 32, 16), "U8")
            tensors[prefix + "gate_up_proj_scales"] = _t(gate_up_s.view(np.uint8), "U8")
            tensors[prefix + "down_proj_blocks"] = _t(down.reshape(E, H, I // 32, 16), "U8")
            tensors[prefix + "down_proj_scales"] = _t(down_s.view(np.uint8), "U8")
            tensors[prefix + "gate_up_proj_bias"] = _bf16(mod.gate_up_proj_bias)
            tensors[prefix + "down_proj_bias"] = _bf16(mod.down_proj_bias)
        for key, value in model.state_dict().items():
            if key.startswith((block + "gate.", block + "router.")):
                tensors[key] = _bf16(value) if value.dtype == torch.bfloat16 else \
                    _t(value.detach().cpu().float().numpy(), "F32")
    directory.mkdir(parents=True, exist_ok=True)
    write_safetensors(directory / "model.safetensors", tensors)
    config = json.loads(model.config.to_json_string())
    if kind == "kimi_k2":
        config["model_type"] = "kimi_k2"
    if fmt == "nvfp4":
        (directory / "hf_quant_config.json").write_text(json.dumps(
            {"producer": {"name": "modelopt"},
             "quantization": {"quant_algo": "NVFP4", "group_size": 16}}))
    else:
        config["quantization_config"] = {"quant_method": "mxfp4"}
    (directory / "config.json").write_text(json.dumps(config))
    return directory


# ---- the comparison ------------------------------------------------------------------------------


def silu(v):
    return v / (1 + np.exp(-v))


def expert_oracle(qs, biases, x, ids, w, kind, alpha=1.702, limit=7.0):
    """SPEC "The layer" in float64 on the exact dequantized FP4 values: out[t] = sum_j w[t, j] *
    W2 act(W13 x[t] + b13) + b2, with `a` rounded to bf16."""
    mats = [tuple(fp4moe.dequantize(q).astype(np.float64) for q in triple) for triple in qs]
    xs = x.float().cpu().numpy().astype(np.float64)
    out = np.zeros_like(xs)
    for t in range(xs.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gm, um, dm = mats[e]
            g, u = gm @ xs[t], um @ xs[t]
            if biases is not None:
                g, u = g + biases[0][e], u + biases[1][e]
            if kind == "gpt_oss":
                g = np.minimum(g, limit)
                a = (np.clip(u, -limit, limit) + 1) * g / (1 + np.exp(-alpha * g))
            else:
                a = silu(g) * u
            a = torch.from_numpy(a).bfloat16().double().numpy()
            y = dm @ a + (biases[2][e] if biases is not None else 0)
            out[t] += float(w[t, j]) * y
    return out


def check_experts_modules(patched, original, quantized, kind, dev, seed):
    """Each replaced experts module on random hidden states and top-k against expert_oracle."""
    mods = dict(patched.named_modules())
    orig = dict(original.named_modules())
    g = torch.Generator().manual_seed(seed)
    for name, qs in quantized.items():
        m = mods[name]
        assert isinstance(m, fp4moe.transformers.Fp4MoeExperts), (name, type(m))
        k = m.top_k
        T = 12
        x = torch.randn(T, H, generator=g).bfloat16()
        ids = torch.stack([torch.randperm(len(qs), generator=g)[:k] for _ in range(T)])
        w = torch.rand(T, k, generator=g)
        biases = None
        o = orig[name]
        if hasattr(o, "gate_up_proj_bias"):
            gub = o.gate_up_proj_bias.detach().cpu().double().numpy()
            biases = (gub[:, 0::2], gub[:, 1::2], o.down_proj_bias.detach().cpu().double().numpy())
        kw = dict(alpha=float(o.alpha), limit=float(o.limit)) if kind == "gpt_oss" else {}
        want = expert_oracle(qs, biases, x, ids, w, kind, **kw)
        with torch.no_grad():
            got = m(x.to(dev), ids.to(dev), w.to(dev)).float().cpu().double().numpy()
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        # SPEC "Numerics": well under 1e-2 (the bf16 rounding of `a` and of the output: ~1.6e-3)
        assert err < 5e-3, (name, err)


def rel_l2(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


# ---- the same routing in both models -------------------------------------------------------------


def routers_of(model):
    """{name: module} of the MoE blocks' routers (kept as they are by patch_model)."""
    return {n: m for n, m in model.named_modules()
            if n.endswith((".gate", ".router")) and hasattr(m, "weight")}


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (tuple, list)):
        return type(out)(_detached(o) for o in out)
    return out


def _chosen(out, k):
    """The experts a router's output selects, [T, k] sorted: its top-k ids where it returns them,
    else (Llama 4: scores and logits) the top-k of its first output."""
    outs = out if isinstance(out, (tuple, list)) else (out,)
    ids = [o for o in outs if isinstance(o, torch.Tensor) and not o.is_floating_point()]
    ids = ids[0] if ids else outs[0].topk(k, -1).indices
    return ids.sort(-1).values


class Routing:
    """The router calls of one model's run, in order: {router name: [(input, output), ...]}.
    Replayed into another model (see replay_routing), `input_errs` holds, per router and call, the
    relative L2 distance between the hidden states its router saw and the recorded ones, and
    `flips` counts the tokens whose own top-k ids differed from the recorded ones (replaced by
    them)."""

    def __init__(self):
        self.calls = {}
        self.position = {}
        self.input_errs = {}
        self.flips = 0

    def input_err(self, calls=None):
        """The largest input distance over every router's first `calls` calls (default: all)."""
        return max(max(e[:calls], default=0.0) for e in self.input_errs.values())

    def complete(self):
        return all(self.position.get(n, 0) == len(c) for n, c in self.calls.items())


@contextlib.contextmanager
def record_routing(model, routing):
    routers = routers_of(model)
    assert routers
    handles = []
    for name, m in routers.items():
        def hook(mod, args, out, calls=routing.calls.setdefault(name, [])):
            calls.append((args[0].detach().clone(), _detached(out)))
        handles.append(m.register_forward_hook(hook))
    try:
        yield routing
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def replay_routing(model, routing, measure=True):
    """Makes the routers of `model` return the recorded outputs, call by call. measure: record
    input_errs and flips (False for a model expected to differ, the unquantized one)."""
    routers = routers_of(model)
    assert set(routers) == set(routing.calls), (sorted(routers), sorted(routing.calls))
    routing.position = {n: 0 for n in routers}
    if measure:
        routing.input_errs = {n: [] for n in routers}
    handles = []
    for name, m in routers.items():
        def hook(mod, args, out, name=name):
            calls, i = routing.calls[name], routing.position[name]
            assert i < len(calls), f"{name}: call {i} was not made by the recorded model"
            x, recorded = calls[i]
            assert args[0].shape == x.shape, (name, i, tuple(args[0].shape), tuple(x.shape))
            routing.position[name] = i + 1
            if measure:
                routing.input_errs[name].append(rel_l2(args[0], x))
                k = model.config.get_text_config().num_experts_per_tok
                routing.flips += int((_chosen(out, k) != _chosen(recorded, k)).any(-1).sum())
            return recorded
        handles.append(m.register_forward_hook(hook))
    try:
        yield routing
    finally:
        for h in handles:
            h.remove()


def forward_with_same_routing(patched, others, ids):
    """Logits of the patched model and of each other model (oracle first) routed as the patched
    model routes; the Routing replayed into the oracle."""
    routing = Routing()
    with torch.no_grad():
        with record_routing(patched, routing):
            got = patched(ids).logits.float()
        outs = []
        for i, m in enumerate(others):
            with replay_routing(m, routing, measure=i == 0):
                outs.append(m(ids).logits.float())
            assert routing.complete()
    return got, outs, routing


# A greedy near tie: two logits closer than this many standard deviations of the step's logits. The
# logits are bf16 (exact ties are common among 96 of them) and the two models' differ by up to
# ~0.07 standard deviations in one element here.
GREEDY_TIE = 0.1


def check_greedy_generation(patched, oracle, ids, new_tokens=4):
    """generate() of the patched model against the oracle's, the oracle routed as the patched model:
    each step's logits within bf16 tolerance and the same greedy tokens. A different token is
    accepted only at a near tie of the oracle's logits (both tokens within the tolerance of its
    best); the sequences are compared up to there."""
    kw = dict(max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(ids),
              return_dict_in_generate=True, output_logits=True)
    routing = Routing()
    with torch.no_grad():
        with record_routing(patched, routing):
            got = patched.generate(ids, **kw)
        with replay_routing(oracle, routing):
            want = oracle.generate(ids, **kw)
    n = ids.shape[1]
    assert got.sequences.shape == (ids.shape[0], n + new_tokens)
    assert torch.equal(got.sequences[:, :n], ids)
    eos = patched.generation_config.eos_token_id
    eos = torch.tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=ids.device)
    running = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)
    for step, (gl, wl) in enumerate(zip(got.logits, want.logits)):
        gl, wl = gl.float(), wl.float()
        assert torch.isfinite(gl).all()
        # Each step is one call of every router (the prompt, then one token per sequence).
        assert routing.input_err(step + 1) < 2e-2, (step, routing.input_err(step + 1))
        assert rel_l2(gl, wl) < 2e-2, (step, rel_l2(gl, wl))
        gt, wt = got.sequences[:, n + step], want.sequences[:, n + step]
        # greedy; a sequence that has ended goes on with padding
        assert torch.equal(gt[running], gl.argmax(-1)[running]), (step, gt.tolist())
        rows = (gt != wt).nonzero().flatten().tolist()
        running &= ~torch.isin(gt, eos)
        for b in rows:
            margin = (wl[b, wt[b]] - wl[b, gt[b]]).item()
            assert margin <= GREEDY_TIE * wl[b].std().item(), \
                (step, b, margin, wl[b].std().item(), got.sequences.tolist(), want.sequences.tolist())
        if rows:
            return
    assert torch.equal(got.sequences, want.sequences)


def device_or_skip(device):
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device visible to PyTorch: the GPU version of this test needs one")
        if not fp4moe.gpu_available():
            pytest.skip(f"fp4moe GPU path unavailable: {fp4moe.gpu_unavailable_reason()}")
    return torch.device(device)


CASES = [(k, "nvfp4", "quantize") for k in KINDS] + [(k, "mxfp4", "quantize") for k in KINDS] + \
        [(k, "mxfp4" if k == "gpt_oss" else "nvfp4", "checkpoint") for k in KINDS]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("kind,fmt,source", CASES, ids=["-".join(c) for c in CASES])
def test_patched_model_matches_dequantized_model(tmp_path, kind, fmt, source, device):
    dev = device_or_skip(device)
    seed = seed_of(kind, fmt)
    original = make_model(kind, seed)
    oracle = copy.deepcopy(original)
    quantized = fake_quantize(oracle, fmt)
    patched = copy.deepcopy(original)
    moe_layers = len(quantized)
    assert moe_layers >= 1
    checkpoint = None
    if source == "checkpoint":
        checkpoint = write_checkpoint(tmp_path / "ckpt", original, kind, fmt, quantized)
    for m in (original, oracle, patched):
        m.to(dev)

    lines = []
    names = fp4moe.transformers.patch_model(patched, checkpoint=checkpoint,
                                            format=None if checkpoint else fmt,
                                            progress=lines.append)
    assert len(names) == moe_layers and len(lines) == moe_layers
    assert not experts_of(patched)  # no bf16 experts left
    assert all(type(m).__name__ != "Llama4TextMoe" for m in patched.modules())
    assert sum(isinstance(m, fp4moe.transformers.Fp4MoeExperts) for m in patched.modules()) == moe_layers
    assert all(str(dev.type) in line for line in lines)

    check_experts_modules(patched, original, quantized, kind, dev, seed + 3)
    assert len(routers_of(patched)) == moe_layers

    g = torch.Generator().manual_seed(seed + 7)
    ids = torch.randint(3, VOCAB, (2, 8), generator=g).to(dev)
    got, (want, bf16), routing = forward_with_same_routing(patched, (oracle, original), ids)
    assert torch.isfinite(got).all()
    # The routers of both models saw the same hidden states (the first MoE layer's exactly).
    assert routing.input_err() < 2e-2, routing.input_err()
    err, quant_effect = rel_l2(got, want), rel_l2(bf16, want)
    # bf16 tolerance: the model's experts round every product and partial sum to bf16, fp4moe
    # accumulates in fp32 and rounds once; both see the same FP4 values and the same routing.
    # Through two layers and the LM head that is up to ~1.2e-2 here, against ~0.2-0.5 between the
    # FP4 and the bf16 experts (the unquantized model routed the same way too).
    assert err < 2e-2, (err, quant_effect, routing.flips)
    assert err < quant_effect / 3, (err, quant_effect)  # FP4 weights were used, not the bf16 ones

    check_greedy_generation(patched, oracle, ids)


def test_patch_options_and_errors(tmp_path):
    model = make_model("qwen3_moe", 5)
    with pytest.raises(fp4moe.Error, match="format must be"):
        fp4moe.transformers.patch_model(copy.deepcopy(model), format="int4")
    with pytest.raises(fp4moe.Error, match="w4a4"):
        fp4moe.transformers.patch_model(copy.deepcopy(model), input_mode="w4a4")
    with pytest.raises(fp4moe.Error, match=r"layers \[7\] have no MoE block"):
        fp4moe.transformers.patch_model(copy.deepcopy(model), layers=[7])
    # One layer only: the other keeps its bf16 experts.
    one = copy.deepcopy(model)
    assert fp4moe.transformers.patch_model(one, layers=[1]) == ["model.layers.1.mlp.experts"]
    assert [n for n, _ in experts_of(one)] == ["model.layers.0.mlp.experts"]
    # A checkpoint of another model's sizes, or in another format than asked, is refused.
    other = make_model("mixtral", 6)
    ckpt = write_checkpoint(tmp_path / "mixtral", other, "mixtral", "nvfp4",
                            fake_quantize(copy.deepcopy(other), "nvfp4"))
    with pytest.raises(fp4moe.Error, match="not of this model|intermediate|top_k"):
        small = transformers.AutoModelForCausalLM.from_config(
            transformers.MixtralConfig(**_common(head_dim=16), intermediate_size=64,
                                       num_local_experts=E, num_experts_per_tok=2),
            dtype=torch.bfloat16)
        fp4moe.transformers.patch_model(small, checkpoint=ckpt)
    with pytest.raises(fp4moe.Error, match="the checkpoint is nvfp4"):
        fp4moe.transformers.patch_model(copy.deepcopy(other), checkpoint=ckpt, format="mxfp4")
    with pytest.raises(fp4moe.Error, match="no router weight|config.json|no FP4"):
        fp4moe.transformers.patch_model(copy.deepcopy(other), checkpoint=tmp_path)
    # A model type the integration does not know, and something that is no model.
    llama = transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(**_common(head_dim=16), intermediate_size=64))
    with pytest.raises(fp4moe.Error, match="model_type 'llama' is not supported"):
        fp4moe.transformers.patch_model(llama)
    with pytest.raises(fp4moe.Error, match="transformers model"):
        fp4moe.transformers.patch_model(torch.nn.Linear(2, 2))


def test_float32_model_runs_its_experts_in_bf16():
    # The op takes bf16: the replacement rounds float32 hidden states and returns float32.
    model = make_model("mixtral", 9).float()
    oracle = copy.deepcopy(model)
    fake_quantize(oracle, "mxfp4")
    fp4moe.transformers.patch_model(model, format="mxfp4")
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert model(ids).logits.dtype == torch.float32
    got, (want,), routing = forward_with_same_routing(model, (oracle,), ids)
    assert routing.input_err() < 2e-2, routing.input_err()
    assert rel_l2(got, want) < 2e-2, (rel_l2(got, want), routing.flips)
