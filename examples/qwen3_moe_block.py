"""A Qwen3-MoE-style sparse MoE block in PyTorch, with its experts replaced by the fp4moe op.

The block (router -> softmax top-k with renormalization -> SwiGLU experts) is written the way
Hugging Face's Qwen3MoeSparseMoeBlock computes it. Its expert weights are quantized to NVFP4 with
fp4moe.quantize_nvfp4 (ModelOpt recipe), and `Fp4Qwen3MoeBlock` keeps the router in PyTorch and runs
the experts with fp4moe.MoeExperts (torch.ops.fp4moe.moe_forward). The script compares the two:
the difference is the FP4 quantization error, while against the dequantized weights it is only
bf16 rounding. Needs a Hopper GPU.

    python examples/qwen3_moe_block.py                  # small random block
    python examples/qwen3_moe_block.py --hidden 2048 --intermediate 768 --experts 128 --top-k 8
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F

import fp4moe


class Qwen3MoeBlock(torch.nn.Module):
    """Reference block in bf16: router, top-k softmax routing, SwiGLU experts."""

    def __init__(self, hidden, intermediate, experts, top_k):
        super().__init__()
        self.top_k = top_k
        self.gate = torch.nn.Linear(hidden, experts, bias=False)  # the router
        self.gate_proj = torch.nn.Parameter(torch.randn(experts, intermediate, hidden) * 0.02)
        self.up_proj = torch.nn.Parameter(torch.randn(experts, intermediate, hidden) * 0.02)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, hidden, intermediate) * 0.02)

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)  # norm_topk_prob
        out = torch.zeros_like(x, dtype=torch.float32)
        for e in ids.unique().tolist():
            tok, slot = (ids == e).nonzero(as_tuple=True)
            h = F.silu(x[tok] @ self.gate_proj[e].T) * (x[tok] @ self.up_proj[e].T)
            y = h @ self.down_proj[e].T
            out.index_add_(0, tok, weights[tok, slot, None] * y.float())
        return out.to(x.dtype).reshape(shape)


def quantize_experts(block):
    """NVFP4 arrays in the checkpoint layout (what a ModelOpt export holds), stacked over experts."""
    arrays = {}
    for name, param in (("gate", block.gate_proj), ("up", block.up_proj), ("down", block.down_proj)):
        w = param.detach().float().cpu().numpy()
        qs = [fp4moe.quantize_nvfp4(np.ascontiguousarray(w[e])) for e in range(w.shape[0])]
        arrays[name] = np.stack([q.data for q in qs])
        arrays[f"{name}_scales"] = np.stack([q.scales for q in qs])
        arrays[f"{name}_global_scale"] = np.array([q.global_scale for q in qs], np.float32)
    return arrays


class Fp4Qwen3MoeBlock(torch.nn.Module):
    """The same block: router in PyTorch, experts through fp4moe."""

    def __init__(self, block, device):
        super().__init__()
        E, I, H = block.gate_proj.shape
        self.gate = block.gate  # the router stays a bf16 nn.Linear
        problem = fp4moe.make_problem(hidden=H, intermediate=I, num_experts=E,
                                      top_k=block.top_k, format="nvfp4", routing="softmax_topk",
                                      renormalize=True, activation="swiglu")
        weights = fp4moe.make_weights(problem, **quantize_experts(block))
        self.experts = fp4moe.MoeExperts(fp4moe.to_device(problem, weights, device))

    def forward(self, x):
        logits = self.gate(x.reshape(-1, x.shape[-1]))
        return self.experts(x, logits)  # bf16 or fp32 logits are both accepted


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=384)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=16)
    args = ap.parse_args()
    if not fp4moe.gpu_available():
        raise SystemExit(f"needs a Hopper GPU: {fp4moe.gpu_unavailable_reason()}")
    torch.manual_seed(0)
    device = torch.device("cuda")
    block = Qwen3MoeBlock(args.hidden, args.intermediate, args.experts, args.top_k)
    block = block.to(device=device, dtype=torch.bfloat16)
    fp4_block = Fp4Qwen3MoeBlock(block, device)

    x = torch.randn(args.tokens, args.hidden, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = block(x)
        got = fp4_block(x)
        # The same reference block run on the dequantized FP4 weights isolates the kernel error
        # from the quantization error.
        deq = Qwen3MoeBlock(args.hidden, args.intermediate, args.experts, args.top_k)
        deq = deq.to(device=device, dtype=torch.bfloat16)
        deq.gate = block.gate
        problem = fp4_block.experts.problem
        arrays = quantize_experts(block)
        for name in ("gate", "up", "down"):
            mats = [fp4moe.dequantize(fp4moe.QuantizedMatrix(
                        arrays[name][e], arrays[f"{name}_scales"][e], fp4moe.Format.nvfp4,
                        float(arrays[f"{name}_global_scale"][e])))
                    for e in range(problem.num_experts)]
            getattr(deq, f"{name}_proj").data.copy_(torch.from_numpy(np.stack(mats)))
        ref_deq = deq(x)

    def rel(a, b):
        return (torch.linalg.vector_norm((a - b).float()) / torch.linalg.vector_norm(b.float())).item()

    print(f"fp4moe vs bf16 block (FP4 quantization error): rel L2 {rel(got, ref):.3e}")
    print(f"fp4moe vs block on the dequantized weights:    rel L2 {rel(got, ref_deq):.3e}")

    compiled = torch.compile(fp4_block, fullgraph=True)
    with torch.inference_mode():
        same = torch.equal(compiled(x), got)
    print(f"torch.compile output identical: {same}")


if __name__ == "__main__":
    main()
