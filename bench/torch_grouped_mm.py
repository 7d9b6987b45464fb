#!/usr/bin/env python3
"""PyTorch bf16 MoE baseline built on torch._grouped_mm, timed the way docs/benchmarking.md asks.

Usage:
    python bench/torch_grouped_mm.py [--preset qwen3-30b-a3b,gpt-oss-120b,deepseek-v3 | all]
                                     [--tokens 1,2,4,8,16,32,64 | 128,256,...,16384]
                                     [--routing uniform|balanced|skewed] [--reps 100] [--csv PATH]
                                     [--copies N] [--gemm-size 8192] [--no-verify]
    python bench/torch_grouped_mm.py --list-presets

Needs PyTorch >= 2.8 on an sm_90 GPU (torch._grouped_mm takes its CUTLASS bf16 path there).

The layer, per call (routing included, everything captured in one CUDA graph):
    route (fp32)  ->  sort the T*k slots by expert  ->  gather x rows  ->
    h = grouped_mm(x_sorted, W13[E, H, 2I], offs)  ->  a = silu(h[:, :I]) * h[:, I:]  ->
    y = grouped_mm(a, W2[E, I, H], offs)  ->  out (fp32) index_add_ w * y  ->  bf16
Routing follows each preset's method: softmax_topk (renormalized), topk_softmax (gpt-oss, zero router
bias), the full DeepSeek-V3 grouped sigmoid routing (zero correction bias, the preset's n_group,
topk_group and scaling factor), llama4 (top-1, sigmoid weight applied to the input rows).
Every preset uses plain SwiGLU without biases: gpt-oss's clamped activation and its biases cost a
few elementwise ops and a few kB, nothing next to the weight traffic. Shared experts are not run.

Weights are random normal bf16 (std 1/sqrt(K)), stored per expert as [N, K] (K-major, as checkpoints
store them) and handed to torch._grouped_mm as the transposed view [E, K, N]; --weight-layout kn
stores [E, K, N] row-major instead. offs holds int32 cumulative end rows of each expert's group.

Keeping weights out of L2: every timed call touches `bytes` of expert weights (distinct experts x
3*H*I*2). The graph holds enough layer calls, rotating over copies of the layer's weights, that the
bytes touched between two uses of the same copy are >= 4x the L2 size. When memory allows fewer
copies than that (DeepSeek-V3 is ~22.5 GB per copy in bf16), the calls cycle over the copies that
fit and each call gets its own random logits, so consecutive uses of one copy touch mostly different
experts; the run prints which of the two was done, and `experts`/`bytes` are then means over calls.
Once one call touches >= 4x L2 (large T), the graph holds one call on one copy: that call streams
the other weights through L2 between two reads of the same byte. Rows whose activations (about
100 kB per routed slot for DeepSeek-V3, twice over: the eager warm-up and the graph's pool) do not
fit next to the weights run fewer calls, or are skipped with a message; an out-of-memory error skips
that row only.

Roofline, measured in the same run: the byte floor of a row is a float32-accumulating torch.sum over
exactly the touched bytes of the same copies (the first `experts` experts of W13 and W2), captured
in the same graph structure; the compute floor is the row's FLOPs, 2*T*k*(2I*H + H*I), over the bf16
dense rate of torch.matmul on random n x n bf16 matrices (n = --gemm-size, 8192 by default; median
of 20 after a warm-up). roof = max(floor, compute floor); roof_x = median / roof.

Timing: warm-up, one CUDA graph of all calls, >= 50 replays each timed with CUDA events; the
reported median/min/max are per layer call (replay time / calls in the graph). TB/s = bytes / median.
Correctness: once per preset at T=4, the layer is compared with a per-token float32 loop over the
same weights and routing (relative L2 error; bf16 rounding of h, a and out puts it near 1e-3..1e-2).
"""

import argparse
import csv
import math
import shlex
import statistics
import subprocess
import sys

torch = None  # imported in main() so that --help and --list-presets work without PyTorch
F = None

# name: (H, I, E, k, routing, routing parameters); mirrors src/core/presets.cpp and SPEC's table.
PRESETS = {
    "deepseek-v3": (7168, 2048, 256, 8, "deepseek_v3", {"n_group": 8, "topk_group": 4, "scale": 2.5}),
    "kimi-k2": (7168, 2048, 384, 8, "deepseek_v3", {"n_group": 1, "topk_group": 1, "scale": 2.827}),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "softmax_topk", {}),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, "softmax_topk", {}),
    "qwen3-next-80b-a3b": (2048, 512, 512, 10, "softmax_topk", {}),
    "gpt-oss-20b": (2880, 2880, 32, 4, "topk_softmax", {}),
    "gpt-oss-120b": (2880, 2880, 128, 4, "topk_softmax", {}),
    "llama4-scout": (5120, 8192, 16, 1, "llama4", {}),
    "llama4-maverick": (5120, 8192, 128, 1, "llama4", {}),
    "mixtral-8x7b": (4096, 14336, 8, 2, "softmax_topk", {}),
    "glm-4.5": (5120, 1536, 160, 8, "deepseek_v3", {"n_group": 1, "topk_group": 1, "scale": 2.5}),
}

DEFAULT_PRESETS = "qwen3-30b-a3b,gpt-oss-120b,deepseek-v3"
MIN_REPS = 50
GiB = 1 << 30

COLUMNS = ["preset", "tokens", "experts", "bytes", "median_us", "min_us", "max_us", "tbps", "floor_us", "ratio",
           "flops", "compute_us", "roofline_us", "roofline_ratio", "tflops", "calls"]


def positive_int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'")
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def preset_list(text):
    if text.strip() == "all":
        return list(PRESETS)
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown preset(s) {', '.join(unknown) or '(none given)'}; known: {', '.join(PRESETS)}, all")
    return names


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="PyTorch bf16 torch._grouped_mm MoE baseline (CUDA graph timing).")
    p.add_argument("--preset", type=preset_list, default=preset_list(DEFAULT_PRESETS),
                   help=f"comma-separated presets or 'all' (default {DEFAULT_PRESETS})")
    p.add_argument("--tokens", type=positive_int_list, default=[1, 2, 4, 8, 16, 32, 64],
                   help="comma-separated token counts (default 1,2,4,8,16,32,64)")
    p.add_argument("--routing", choices=["uniform", "balanced", "skewed"], default="uniform",
                   help="uniform: i.i.d. normal logits; balanced: slot (t, j) goes to expert (t*k+j) mod E; "
                        "skewed: expert 0 is in every token's top-k, the rest uniform")
    p.add_argument("--reps", type=int, default=100, help=f"timed graph replays (>= {MIN_REPS}, default 100)")
    p.add_argument("--warmup", type=int, default=10, help="untimed graph replays before timing (default 10)")
    p.add_argument("--copies", type=int, default=0,
                   help="weight copies to allocate (default 0: as many as needed for 4x L2, as memory allows)")
    p.add_argument("--l2-factor", type=float, default=4.0,
                   help="bytes touched between reuses of one copy, in multiples of L2 (default 4)")
    p.add_argument("--reserve-gib", type=float, default=4.0,
                   help="GPU memory left free when sizing the copies (default 4 GiB)")
    p.add_argument("--weight-layout", choices=["nk", "kn"], default="nk",
                   help="nk: experts stored [N, K], passed transposed (default); kn: stored [K, N] row-major")
    p.add_argument("--gemm-size", type=int, default=8192,
                   help="n of the n^3 bf16 torch.matmul that measures the dense rate (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV (" + ",".join(COLUMNS) + ")")
    p.add_argument("--no-verify", action="store_true", help="skip the T=4 float32 correctness check")
    p.add_argument("--list-presets", action="store_true", help="print the presets and exit")
    args = p.parse_args(argv)
    if args.reps < MIN_REPS:
        p.error(f"--reps must be >= {MIN_REPS}: a median over fewer replays is not worth reporting")
    if args.warmup < 0 or args.copies < 0 or args.l2_factor <= 0 or args.reserve_gib < 0:
        p.error("--warmup, --copies and --reserve-gib must be >= 0 and --l2-factor > 0")
    if args.gemm_size < 256 or args.gemm_size % 64:
        p.error("--gemm-size must be a multiple of 64, at least 256")
    return args


def expert_bytes(H, I):
    return 3 * H * I * 2  # W13 [2I, H] + W2 [H, I], bf16


def layer_flops(T, H, I, k):
    """FLOPs of the routed slots (docs/benchmarking.md): 2 * T * k * (2I * H + H * I)."""
    return 2.0 * T * k * (2 * I * H + H * I)


def calls_for_row(need, ncopies):
    """(calls in the graph, whether every call reuses its own logits): `need` calls keep 4x L2 between
    two uses of one copy. One call suffices once a call touches 4x L2; otherwise at least `ncopies`
    calls, cycling with fresh logits when there are fewer copies than needed."""
    if need <= 1:
        return 1, True
    return max(need, ncopies), ncopies >= need


def activation_bytes(T, H, I, k):
    """Upper bound of the device memory one eager layer call allocates (the sorted rows, h, the
    activation, y in bf16 and float32 twice, the output)."""
    slots = T * k
    return slots * (H * 2 + 2 * I * 2 + 2 * I * 2 + H * 2 + 2 * H * 4) + T * H * 6


def fmt_count(v):
    return str(int(v)) if float(v).is_integer() else f"{v:.1f}"


def with_roofline(r, bf16_rate):
    """Adds the derived columns to a row holding preset, tokens, experts, bytes, times, floor_us, flops."""
    r["tbps"] = r["bytes"] / (r["median_us"] * 1e-6) / 1e12
    r["ratio"] = r["median_us"] / r["floor_us"]
    r["compute_us"] = r["flops"] / bf16_rate * 1e6
    r["roofline_us"] = max(r["floor_us"], r["compute_us"])
    r["roofline_ratio"] = r["median_us"] / r["roofline_us"]
    r["tflops"] = r["flops"] / (r["median_us"] * 1e-6) / 1e12
    return r


def format_table(rows):
    """Fixed-width table of result dicts keyed by COLUMNS."""
    head = f"{'preset':<20} {'T':>6} {'experts':>8} {'bytes':>14} {'median_us':>10} {'min_us':>10} " \
           f"{'max_us':>10} {'TB/s':>6} {'floor_us':>10} {'ratio':>6} {'GFLOP':>9} {'comp_us':>10} " \
           f"{'roof_us':>10} {'roof_x':>6} {'TFLOP/s':>7} {'calls':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['preset']:<20} {r['tokens']:>6} {fmt_count(r['experts']):>8} {int(r['bytes']):>14} "
                     f"{r['median_us']:>10.1f} {r['min_us']:>10.1f} {r['max_us']:>10.1f} {r['tbps']:>6.2f} "
                     f"{r['floor_us']:>10.1f} {r['ratio']:>6.2f} {r['flops'] / 1e9:>9.1f} {r['compute_us']:>10.1f} "
                     f"{r['roofline_us']:>10.1f} {r['roofline_ratio']:>6.2f} {r['tflops']:>7.1f} {r['calls']:>5}")
    return "\n".join(lines)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r["preset"], r["tokens"], fmt_count(r["experts"]), int(r["bytes"]),
                        f"{r['median_us']:.2f}", f"{r['min_us']:.2f}", f"{r['max_us']:.2f}", f"{r['tbps']:.4f}",
                        f"{r['floor_us']:.2f}", f"{r['ratio']:.3f}", f"{r['flops']:.4e}", f"{r['compute_us']:.2f}",
                        f"{r['roofline_us']:.2f}", f"{r['roofline_ratio']:.3f}", f"{r['tflops']:.2f}", r["calls"]])


def list_presets():
    print(f"{'preset':<20} {'H':>6} {'I':>6} {'E':>4} {'k':>3}  {'routing':<13} {'bf16 GB/copy':>12}")
    for name, (H, I, E, k, method, params) in PRESETS.items():
        extra = " ".join(f"{a}={b}" for a, b in params.items())
        print(f"{name:<20} {H:>6} {I:>6} {E:>4} {k:>3}  {method:<13} {E * expert_bytes(H, I) / 1e9:>12.2f}  {extra}")


# ---------------------------------------------------------------------------------------------
# The layer (CUDA-graph capturable: no host synchronization, static shapes)


def route(logits, E, k, method, params):
    """Returns (ids [T, k] int64, weights [T, k] fp32)."""
    s = logits.float()
    if method == "softmax_topk":
        w, ids = torch.topk(torch.softmax(s, dim=-1), k, dim=-1)
        w = w / w.sum(dim=-1, keepdim=True)
    elif method == "topk_softmax":
        v, ids = torch.topk(s, k, dim=-1)  # router bias taken as zero
        w = torch.softmax(v, dim=-1)
    elif method == "llama4":
        v, ids = torch.topk(s, 1, dim=-1)
        w = torch.sigmoid(v)
    elif method == "deepseek_v3":
        n_group, topk_group = params["n_group"], params["topk_group"]
        scores = torch.sigmoid(s)
        c = scores  # + e_score_correction_bias, zero here
        T = s.shape[0]
        if n_group > 1:
            group_scores = torch.topk(c.view(T, n_group, E // n_group), 2, dim=-1)[0].sum(dim=-1)
            kept = torch.topk(group_scores, topk_group, dim=-1)[1]
            group_mask = torch.zeros_like(group_scores).scatter_(1, kept, 1.0)
            expert_mask = group_mask.unsqueeze(-1).expand(T, n_group, E // n_group).reshape(T, E)
            c = c.masked_fill(expert_mask == 0, float("-inf"))
        ids = torch.topk(c, k, dim=-1)[1]
        w = scores.gather(1, ids)
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20) * params["scale"]
    else:
        raise ValueError(f"unknown routing method {method}")
    return ids, w


def moe_layer(x, logits, w13, w2, cfg):
    """x [T, H] bf16; w13 [E, H, 2I] and w2 [E, I, H] bf16 views. Returns bf16 [T, H]."""
    H, I, E, k, method, params = cfg
    T = x.shape[0]
    ids, w = route(logits, E, k, method, params)
    flat = ids.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    offs = torch.searchsorted(sorted_ids, torch.arange(E, device=x.device, dtype=sorted_ids.dtype),
                              right=True, out_int32=True)
    token = order // k
    w_sorted = w.reshape(-1)[order]
    xs = x.index_select(0, token)
    if method == "llama4":
        xs = (xs.float() * w_sorted.unsqueeze(1)).to(torch.bfloat16)
    h = torch._grouped_mm(xs, w13, offs=offs)
    a = F.silu(h[:, :I]) * h[:, I:]
    y = torch._grouped_mm(a, w2, offs=offs)
    y = y.float()
    if method != "llama4":
        y = y * w_sorted.unsqueeze(1)
    out = torch.zeros(T, H, device=x.device, dtype=torch.float32)
    out.index_add_(0, token, y)
    return out.to(torch.bfloat16)


def reference_layer(x, logits, w13, w2, cfg):
    """Per-token float32 loop over the same weights; routing recomputed token by token."""
    H, I, E, k, method, params = cfg
    out = torch.zeros(x.shape[0], H, dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        ids, wts = route(logits[t:t + 1], E, k, method, params)
        xt = x[t].float()
        for j in range(ids.shape[1]):
            e, wt = int(ids[0, j]), float(wts[0, j])
            xin = xt * wt if method == "llama4" else xt
            h = xin @ w13[e].float()
            a = F.silu(h[:I]) * h[I:]
            y = a @ w2[e].float()
            out[t] += y if method == "llama4" else wt * y
    return out


# ---------------------------------------------------------------------------------------------
# Inputs


def make_logits(T, E, k, mode, gen):
    dev = "cuda"
    if mode == "uniform":
        return torch.randn(T, E, device=dev, generator=gen)
    if mode == "balanced":
        # Chosen experts get distinct large logits, the rest a very negative one: every routing
        # method (sigmoid groups included, the k experts are consecutive) then picks exactly them.
        logits = torch.full((T, E), -12.0, device=dev)
        slots = torch.arange(T * k, device=dev).view(T, k)
        ids = slots % E
        vals = 12.0 - 0.01 * torch.arange(k, device=dev, dtype=torch.float32).expand(T, k)
        return logits.scatter_(1, ids, vals)
    logits = torch.randn(T, E, device=dev, generator=gen)
    logits[:, 0] = 12.0
    return logits


def alloc_copy(E, H, I, layout, gen):
    """One layer's weights as the views torch._grouped_mm takes: w13 [E, H, 2I], w2 [E, I, H]
    (their storage is contiguous per expert either way: see storage_per_expert)."""
    def one(K, N):
        if layout == "nk":
            t = torch.empty(E, N, K, device="cuda", dtype=torch.bfloat16)
            t.normal_(0.0, 1.0 / math.sqrt(K), generator=gen)
            return t.transpose(1, 2)
        t = torch.empty(E, K, N, device="cuda", dtype=torch.bfloat16)
        t.normal_(0.0, 1.0 / math.sqrt(K), generator=gen)
        return t
    w13 = one(H, 2 * I)
    w2 = one(I, H)
    return w13, w2


def storage_per_expert(w):
    """The contiguous [E, ...] tensor behind a weight view (the transposed view of the nk layout)."""
    base = w if w.is_contiguous() else w.transpose(1, 2)
    assert base.is_contiguous()
    return base


def distinct_experts(logits, cfg):
    H, I, E, k, method, params = cfg
    ids, _ = route(logits, E, k, method, params)
    return int(torch.unique(ids).numel())


# ---------------------------------------------------------------------------------------------
# Timing


def time_graph(calls, reps, warmup):
    """calls: list of (x, logits, w13, w2, cfg). Returns per-call times in microseconds."""
    outs = [None] * len(calls)

    def step():
        for i, (x, lg, a, b, cfg) in enumerate(calls):
            outs[i] = moe_layer(x, lg, a, b, cfg)

    return time_step(step, len(calls), reps, warmup)


def time_floor(reads, reps, warmup):
    """reads: list of (w13, w2, experts): per call, a float32 sum over the first `experts` experts'
    storage of both weights (exactly the bytes the call's experts hold). Per-call times in us."""
    sinks = [None] * len(reads)

    def step():
        for i, (a, b, d) in enumerate(reads):
            sinks[i] = storage_per_expert(a)[:d].sum(dtype=torch.float32) + \
                storage_per_expert(b)[:d].sum(dtype=torch.float32)

    return time_step(step, len(reads), reps, warmup)


def time_step(step, ncalls, reps, warmup):
    """Warm-up, one CUDA graph of step(), `reps` replays timed with events; per-call times in us."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for _ in range(warmup):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = [start.elapsed_time(end) * 1000.0 / ncalls for start, end in events]
    del graph
    return times


def measure_bf16_rate(n, gen):
    """FLOP/s of torch.matmul on random n x n bf16 matrices (cuBLAS), median of 20 after 5 warm-ups."""
    a = torch.randn(n, n, device="cuda", generator=gen).to(torch.bfloat16)
    b = torch.randn(n, n, device="cuda", generator=gen).to(torch.bfloat16)
    for _ in range(5):
        c = a @ b
    times = []
    for _ in range(20):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        c = a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del a, b, c
    torch.cuda.empty_cache()
    return 2.0 * n ** 3 / statistics.median(times)


def header():
    props = torch.cuda.get_device_properties(0)
    driver = "unknown"
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i", "0"],
                                capture_output=True, text=True, timeout=20).stdout.strip() or driver
    except (OSError, subprocess.SubprocessError):
        pass
    l2 = getattr(props, "L2_cache_size", 0) or 50 * (1 << 20)
    total = torch.cuda.mem_get_info()[1]
    print(f"# device: {props.name} (sm_{props.major}{props.minor}, {total / GiB:.1f} GiB, L2 {l2 / 2**20:.0f} MiB), "
          f"driver {driver}")
    print(f"# torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"# command: python {' '.join(shlex.quote(a) for a in sys.argv)}")
    return l2


def run_preset(name, args, l2, rows, failures):
    H, I, E, k, method, params = PRESETS[name]
    cfg = (H, I, E, k, method, params)
    if H % 16 or I % 16:
        print(f"[{name}] skipped: torch._grouped_mm needs K and N multiples of 16 (H={H}, I={I})")
        return
    eb = expert_bytes(H, I)
    layer_bytes = E * eb
    gen = torch.Generator(device="cuda")
    gen.manual_seed(args.seed)

    # Routing first (it does not depend on the weights) so the copy count can be sized from it.
    plans = []
    for T in args.tokens:
        x = (torch.randn(T, H, device="cuda", generator=gen)).to(torch.bfloat16)
        lg = make_logits(T, E, k, args.routing, gen)
        d = distinct_experts(lg, cfg)
        need = max(1, math.ceil(args.l2_factor * l2 / (d * eb)))
        plans.append((T, x, lg, d, need))
    want = args.copies or max(p[4] for p in plans)

    # Room for the activations of the largest row (its eager warm-up and the graph's own pool).
    act_max = max(2 * activation_bytes(p[0], H, I, k) for p in plans)
    free, _ = torch.cuda.mem_get_info()
    budget = free - int(args.reserve_gib * GiB)
    fit = max(0, (budget - act_max) // layer_bytes)
    if fit < 1 and budget >= layer_bytes:
        fit = 1  # one copy; the rows whose activations do not fit beside it are skipped below
    ncopies = min(want, fit)
    if ncopies < 1:
        print(f"[{name}] skipped: one bf16 copy of the layer needs {layer_bytes / GiB:.1f} GiB, "
              f"{free / GiB:.1f} GiB free (reserve {args.reserve_gib} GiB)")
        return
    print(f"[{name}] H={H} I={I} E={E} k={k} routing={method} ({args.routing} logits); "
          f"{layer_bytes / GiB:.2f} GiB per copy, {ncopies} cop{'y' if ncopies == 1 else 'ies'} "
          f"(wanted {want}, fit {fit}, {act_max / GiB:.1f} GiB kept for the activations)")

    copies = []
    try:
        for _ in range(ncopies):
            copies.append(alloc_copy(E, H, I, args.weight_layout, gen))
        torch.cuda.synchronize()

        if not args.no_verify:
            xv = torch.randn(4, H, device="cuda", generator=gen).to(torch.bfloat16)
            lv = make_logits(4, E, k, args.routing, gen)
            w13, w2 = copies[0]
            got = moe_layer(xv, lv, w13, w2, cfg).float()
            ref = reference_layer(xv, lv, w13, w2, cfg)
            err = float((got - ref).norm() / ref.norm().clamp_min(1e-30))
            finite = bool(torch.isfinite(got).all())
            verdict = "ok" if finite and err < 2e-2 else "FAILED"
            print(f"[{name}] check T=4 vs per-token float32 loop: rel L2 error {err:.2e} ({verdict})")
            if verdict != "ok":
                failures.append(name)
            del w13, w2, got, ref

        for T, x, lg, d, need in plans:
            oom = None
            try:
                run_row(name, T, x, lg, d, need, copies, cfg, args, gen, rows)
            except torch.cuda.OutOfMemoryError as e:
                oom = str(e).splitlines()[0]
            # Outside the except block, so the exception's frames no longer pin the row's tensors.
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            if oom:
                print(f"[{name}] T={T}: skipped, out of GPU memory ({oom})")
    finally:
        del copies
        plans.clear()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def run_row(name, T, x, lg, d, need, copies, cfg, args, gen, rows):
    H, I, E, k, method, params = cfg
    eb = expert_bytes(H, I)
    ncopies = len(copies)
    ncalls, same = calls_for_row(need, ncopies)
    # Memory: one call's activations twice (eager warm-up, graph pool) and every call's output.
    free, _ = torch.cuda.mem_get_info()
    act, out = 2 * activation_bytes(T, H, I, k), T * H * 2
    room = free - int(args.reserve_gib * GiB) / 2 - act
    if room < out:
        print(f"[{name}] T={T}: skipped, needs {(act + out) / GiB:.1f} GiB for the activations, "
              f"{free / GiB:.1f} GiB free")
        return
    short = ""
    if ncalls * out > room:
        ncalls = max(1, int(room // out))
        same = ncopies >= ncalls
        if ncalls < need:
            short = f"; FEWER calls than {args.l2_factor:g} x L2 between reuses needs ({need}): memory"
    if same:
        # Enough copies (or one call that touches 4x L2): the same routing on each copy, so bytes
        # are exact for this row.
        calls = [(x, lg, copies[i % ncopies][0], copies[i % ncopies][1], cfg) for i in range(ncalls)]
        ds = [d] * ncalls
        note = (f"{ncalls} call{'s' if ncalls > 1 else ''} over {min(ncalls, ncopies)} "
                f"cop{'y' if min(ncalls, ncopies) == 1 else 'ies'}, same logits"
                + (" (one call touches >= %g x L2)" % args.l2_factor if need <= 1 else ""))
    else:
        lgs = [lg] + [make_logits(T, E, k, args.routing, gen) for _ in range(ncalls - 1)]
        ds = [d] + [distinct_experts(l, cfg) for l in lgs[1:]]
        calls = [(x, lgs[i], copies[i % ncopies][0], copies[i % ncopies][1], cfg) for i in range(ncalls)]
        note = f"{ncalls} calls over {ncopies} cop{'y' if ncopies == 1 else 'ies'}, fresh logits per call"
    times = time_graph(calls, args.reps, args.warmup)
    del calls
    torch.cuda.empty_cache()
    reads = [(copies[i % ncopies][0], copies[i % ncopies][1], ds[i]) for i in range(ncalls)]
    floor = statistics.median(time_floor(reads, args.reps, args.warmup))
    med = statistics.median(times)
    experts = sum(ds) / len(ds)
    r = {"preset": name, "tokens": T, "experts": experts, "bytes": experts * eb, "median_us": med,
         "min_us": min(times), "max_us": max(times), "floor_us": floor, "flops": layer_flops(T, H, I, k),
         "calls": ncalls}
    rows.append(with_roofline(r, args.bf16_rate))
    print(f"[{name}] T={T}: {note}{short}; median {med:.1f} us, floor {floor:.1f} us, "
          f"{r['tflops']:.1f} TFLOP/s, {r['roofline_ratio']:.2f}x the roofline")


def main(argv=None):
    args = parse_args(argv)
    if args.list_presets:
        list_presets()
        return 0
    global torch, F
    try:
        import torch as _torch
        import torch.nn.functional as _F
    except ImportError:
        print("error: PyTorch is not installed (pip install torch)", file=sys.stderr)
        return 2
    torch, F = _torch, _F
    if not torch.cuda.is_available():
        print("error: no CUDA device visible to PyTorch", file=sys.stderr)
        return 2
    if not hasattr(torch, "_grouped_mm"):
        print(f"error: torch {torch.__version__} has no torch._grouped_mm (needs >= 2.8)", file=sys.stderr)
        return 2
    l2 = header()
    gen = torch.Generator(device="cuda")
    gen.manual_seed(args.seed)
    args.bf16_rate = measure_bf16_rate(args.gemm_size, gen)
    print(f"# bf16 dense rate {args.bf16_rate / 1e12:.1f} TFLOP/s (torch.matmul {args.gemm_size}^3 bf16, random, "
          f"median of 20); floor = float32 torch.sum over the touched bf16 bytes, same graph structure")
    print(f"# routing {args.routing}, tokens {','.join(map(str, args.tokens))}, reps {args.reps}, "
          f"weight layout {args.weight_layout}, L2 factor {args.l2_factor}")
    rows, failures = [], []
    for name in args.preset:
        try:
            run_preset(name, args, l2, rows, failures)
        except torch.cuda.OutOfMemoryError as e:
            print(f"[{name}] skipped: out of GPU memory ({str(e).splitlines()[0]})")
        # Outside the except block, so the exception's frames no longer pin the copies.
        torch.cuda.empty_cache()
    print()
    print(format_table(rows))
    if args.csv:
        write_csv(args.csv, rows)
        print(f"# wrote {args.csv}")
    if failures:
        print(f"error: correctness check failed for {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
