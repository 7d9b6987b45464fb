"""Python call overhead of fp4moe at T = 1 (decode) on qwen3-30b-a3b-sized random weights.

Each path makes `--iters` back-to-back calls on one stream, timed two ways:
  host_us    wall time of the Python (or C++) loop per call: what a call costs the CPU
  device_us  CUDA-event time per call over the same loop: the stream's time per call; when host_us
             exceeds the kernel time the GPU waits on the host and device_us rises with it
Paths:
  C++ run()        fp4moe::run in a C++ loop (fp4moe._C.time_run): the floor
  _C ptr binding   fp4moe._C.moe_forward_ptr from Python (nanobind, raw pointers)
  torch op         torch.ops.fp4moe.moe_forward (validation + dispatcher + binding)
  MoeExperts       the nn.Module around the op
  DLPack binding   fp4moe._C.moe_forward_dlpack with torch tensors (DLPack import per argument)
  CUDA graph       one captured op call replayed `--iters` times (no Python per call)
With --cli PATH the `fp4moe bench` line for the same preset and T is printed too (it times CUDA-graph
replays with cold L2, so compare it with the CUDA graph row).

    python bench/python_overhead.py [--preset qwen3-30b-a3b] [--iters 2000] [--cli build/fp4moe]
"""

import argparse
import statistics
import subprocess
import time

import torch

import fp4moe


def time_loop(fn, iters, stream):
    """(host_us, device_us) per call of fn() over `iters` calls on `stream`."""
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record(stream)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t1 = time.perf_counter()
    end.record(stream)
    end.synchronize()
    return 1e6 * (t1 - t0) / iters, 1e3 * start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser(description="Python call overhead of fp4moe at T = 1")
    ap.add_argument("--preset", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=1)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=5, help="median over this many loops")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--cli", help="path of the fp4moe program, to print its bench line")
    args = ap.parse_args()
    if not fp4moe.gpu_available():
        raise SystemExit(f"needs a Hopper GPU: {fp4moe.gpu_unavailable_reason()}")

    dev = torch.device("cuda", torch.cuda.current_device())
    T = args.tokens
    p = fp4moe.make_problem(args.preset, tokens=T)
    t0 = time.perf_counter()
    dw = fp4moe.to_device(p, fp4moe.random_weights(p, args.seed), dev)
    print(f"# {args.preset} T={T}: {dw.nbytes / 1e9:.2f} GB packed, set up in "
          f"{time.perf_counter() - t0:.1f} s on {torch.cuda.get_device_name(dev)}")

    g = torch.Generator(device=dev).manual_seed(args.seed)
    x = torch.randn(T, p.hidden, device=dev, generator=g).bfloat16()
    logits = torch.randn(T, p.num_experts, device=dev, generator=g)
    bias = torch.zeros(p.num_experts, device=dev) if p.routing.has_bias else None
    out = torch.empty(T, p.hidden, dtype=torch.bfloat16, device=dev)
    ws = torch.empty(max(fp4moe.workspace_size(p), 256), dtype=torch.uint8, device=dev)
    stream = torch.cuda.current_stream(dev)
    s = stream.cuda_stream
    experts = fp4moe.MoeExperts(dw, bias)
    h = fp4moe._torch.handle(dw)
    op = torch.ops.fp4moe.moe_forward
    C = fp4moe._C

    rows = []

    def record(name, samples):
        host = statistics.median(x[0] for x in samples)
        devu = statistics.median(x[1] for x in samples)
        rows.append((name, host, devu))

    if bias is None:
        record("C++ run()", [C.time_run(dw, T, x.data_ptr(), out.data_ptr(), logits.data_ptr(),
                                        False, 0, 0, ws.data_ptr(), ws.numel(), s, args.iters)[::-1]
                             for _ in range(args.repeats)])
    paths = {
        "_C ptr binding": lambda: C.moe_forward_ptr(
            dw, T, x.data_ptr(), out.data_ptr(), logits.data_ptr(), False,
            0 if bias is None else bias.data_ptr(), 0, 0, ws.data_ptr(), ws.numel(), s),
        "torch op": lambda: op(x, logits, bias, None, None, h, None),
        "MoeExperts": lambda: experts(x, logits),
        "DLPack binding": lambda: C.moe_forward_dlpack(dw, x, out, ws, s, logits, bias),
    }
    for name, fn in paths.items():
        record(name, [time_loop(fn, args.iters, stream) for _ in range(args.repeats)])

    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream(dev)
    side.wait_stream(stream)
    with torch.cuda.stream(side):
        op(x, logits, bias, None, None, h, None)
    stream.wait_stream(side)
    with torch.cuda.graph(graph):
        op(x, logits, bias, None, None, h, None)
    record("CUDA graph replay",
           [time_loop(graph.replay, args.iters, stream) for _ in range(args.repeats)])

    base = rows[0][1] if rows[0][0] == "C++ run()" else None
    print(f"{'path':<20} {'host_us':>9} {'device_us':>10} {'host_overhead_us':>17}")
    for name, host, devu in rows:
        extra = f"{host - base:17.2f}" if base is not None else f"{'-':>17}"
        print(f"{name:<20} {host:9.2f} {devu:10.2f} {extra}")
    print(f"# median of {args.repeats} loops of {args.iters} calls; host_overhead = host_us minus "
          "the C++ loop's host_us")
    print(f"# reproduce: python bench/python_overhead.py --preset {args.preset} --tokens {T} "
          f"--iters {args.iters}")

    if args.cli:
        cmd = [args.cli, "bench", "--preset", args.preset, "--tokens", str(T)]
        print("# " + " ".join(cmd))
        res = subprocess.run(cmd, capture_output=True, text=True)
        print(res.stdout.rstrip())
        if res.returncode != 0:
            print(res.stderr.rstrip())


if __name__ == "__main__":
    main()
