#!/usr/bin/env python3
"""Static instruction report of the weight-streaming loops in a build's SASS.

For every kernel of the library objects (default: the decode and prefill launch units of BUILD_DIR),
finds the innermost loops (a backward branch and the code it jumps over) that contain tensor-core
instructions (HMMA / HGMMA) and prints, per loop, the warp-instructions per KB of FP4 weights by class,
with the kernel's registers, stack and spill instructions.

Weights per loop iteration: every HMMA m16n8k16 consumes a distinct 16 x 16 A fragment (128 bytes of
FP4) in the decode kernel. An HGMMA consumes 16 rows x 16 k per warp (128 bytes) too, but the same A
registers may feed several HGMMAs (token tiles wider than one instruction), so for HGMMA a new A is
counted only where its A register differs from the previous HGMMA's.

Needs cuobjdump (CUDA toolkit, or PyPI's nvidia-cuda-cuobjdump) and c++filt.

  bench/sass_report.py [BUILD_DIR] [--objects a.o b.o] [--filter REGEX] [--json FILE] [--all-loops]
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter, OrderedDict

CLASSES = ("int", "imad", "fp", "tensor", "mem", "ctrl", "unif", "other")
CLASS_TITLES = {"int": "int ALU", "imad": "IMAD", "fp": "FP/FMA", "tensor": "tensor", "mem": "memory",
                "ctrl": "control", "unif": "uniform", "other": "other"}

INT_OPS = {"LOP3", "LOP", "SHF", "SHL", "SHR", "PRMT", "IADD3", "IADD", "ISETP", "SEL", "LEA", "MOV", "IABS",
           "IMNMX", "VIMNMX", "POPC", "FLO", "BREV", "SGXT", "BMSK", "VIADD", "VIADDMNMX", "I2I", "P2R", "R2P",
           "PLOP3", "PSETP", "CS2R", "S2R", "IDP", "IDP4A", "BFE", "BFI", "ICMP", "LEPC"}
FP_OPS = {"HMUL2", "HFMA2", "HADD2", "HMNMX2", "HSETP2", "HSET2", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL",
          "FSETP", "FSET", "F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "MUFU", "FCHK", "FRND", "DADD", "DMUL",
          "DFMA", "FSWZADD"}
TENSOR_OPS = {"HMMA", "HGMMA", "IMMA", "QGMMA", "IGMMA", "WARPGROUP", "WARPGROUPSET"}
MEM_OPS = {"LDG", "STG", "LDS", "STS", "LDL", "STL", "LD", "ST", "LDC", "LDGSTS", "LDGDEPBAR", "ATOM", "ATOMS",
           "ATOMG", "RED", "REDG", "LDSM", "STSM", "UBLKCP", "UBLKPF", "UTMALDG", "UTMASTG", "UTMAPF", "CCTL",
           "SYNCS", "MEMBAR", "FENCE", "ULDC", "LDCU"}
CTRL_OPS = {"BRA", "BRX", "JMP", "JMX", "BAR", "BSSY", "BSYNC", "EXIT", "WARPSYNC", "NOP", "CALL", "RET", "YIELD",
            "DEPBAR", "BMOV", "VOTE", "VOTEU", "MATCH", "SHFL", "BPT", "KILL", "ELECT", "ACQBULK", "ERRBAR",
            "NANOSLEEP", "CGAERRBAR", "UCGABAR_ARV", "UCGABAR_WAIT"}


def classify(op: str) -> str:
    base = op.split(".")[0]
    if base.startswith("IMAD"):
        return "imad"
    if base in TENSOR_OPS:
        return "tensor"
    if base in MEM_OPS:
        return "mem"
    if base in CTRL_OPS:
        return "ctrl"
    if base in FP_OPS:
        return "fp"
    if base in INT_OPS:
        return "int"
    if base.startswith("U") or base in ("R2UR", "S2UR"):
        return "unif"
    return "other"


def find_tool(name: str, skip_missing: bool = False) -> str:
    path = shutil.which(name)
    if path:
        return path
    candidates = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", name)]
    try:
        import nvidia  # noqa: F401  (PyPI's nvidia-cuda-cuobjdump installs under nvidia/cu*/bin)
        for root in nvidia.__path__:
            candidates += glob.glob(os.path.join(root, "cu*", "bin", name))
            candidates += glob.glob(os.path.join(root, "cuda_*", "bin", name))
    except ImportError:
        pass
    for c in candidates:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    print(f"sass_report: {name} not found (install the CUDA toolkit's, or "
          f"`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm`)", file=sys.stderr)
    sys.exit(77 if skip_missing else 2)


def demangle(names):
    if not names:
        return {}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True).stdout
    return dict(zip(names, out.splitlines()))


LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def parse_sass(text: str):
    """{mangled function: [(address, predicate, opcode, operands)]}"""
    funcs, cur = OrderedDict(), None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            cur = m.group(1)
            funcs[cur] = []
            continue
        if cur is None:
            continue
        m = LINE.search(line)
        if m:
            funcs[cur].append((int(m.group(1), 16), (m.group(2) or "").strip(), m.group(3), m.group(4).strip()))
    return funcs


def parse_resources(text: str):
    """{mangled function: {REG, STACK, SHARED, LOCAL}} from cuobjdump -res-usage."""
    res, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            cur = m.group(1).rstrip(":")
            continue
        if cur and "REG:" in line:
            res[cur] = {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", line)}
            cur = None
    return res


def loops(instrs, all_loops=False):
    """Innermost backward-branch regions [target, branch] that hold an HMMA or HGMMA."""
    index = {a: i for i, (a, *_rest) in enumerate(instrs)}
    regions = []
    for i, (addr, _pred, op, args) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", args)
        if not m:
            continue
        tgt = int(m.group(1), 16)
        if tgt > addr or tgt not in index:
            continue
        body = instrs[index[tgt]:i + 1]
        if all_loops or any(o.startswith(("HMMA", "HGMMA")) for _a, _p, o, _x in body):
            regions.append((index[tgt], i))
    inner = [r for r in regions
             if not any(o != r and o[0] >= r[0] and o[1] <= r[1] for o in regions)]
    return sorted(set(inner))


def loop_stats(body):
    counts = Counter(classify(op) for _a, _p, op, _x in body)
    hmma = sum(1 for _a, _p, op, _x in body if op.startswith("HMMA"))
    new_a, last_a = 0, None
    for _a, _p, op, args in body:
        if op.startswith("HGMMA"):
            regs = re.findall(r"\bR\d+\b", args)
            a = regs[1] if len(regs) > 1 else None
            if a is None or a != last_a:
                new_a += 1
            last_a = a
    kb = (hmma + new_a) * 128 / 1024.0
    ops = Counter(op.split(".")[0] for _a, _p, op, _x in body)
    return {"instructions": len(body), "hmma": hmma, "hgmma_new_a": new_a, "weight_kb": kb,
            "classes": {c: counts.get(c, 0) for c in CLASSES},
            "loop_spills": sum(1 for _a, _p, op, _x in body if op.split(".")[0] in ("LDL", "STL")),
            "ldg128": sum(1 for _a, _p, op, _x in body if op.startswith("LDG") and ".128" in op),
            "top_ops": ops.most_common(12)}


def short_name(demangled: str) -> str:
    s = re.sub(r"\([^()]*\)$", "", demangled)
    s = re.sub(r"^void ", "", s)
    s = s.replace("fp4moe::kernels::", "").replace("fp4moe::", "")
    s = re.sub(r"\(Format\)0", "nvfp4", s)
    s = re.sub(r"\(Format\)1", "mxfp4", s)
    s = re.sub(r"\(\w+\)(\d+)", r"\1", s)
    return s


def default_objects(build: str):
    objs = []
    for pat in ("**/decode_launch.cu.o", "**/prefill_launch.cu.o"):
        objs += glob.glob(os.path.join(build, "CMakeFiles", pat), recursive=True)
    if not objs:
        objs = glob.glob(os.path.join(build, "CMakeFiles", "**", "*.cu.o"), recursive=True)
    return sorted(set(objs))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("build", nargs="?", default="build", help="build directory (default: build)")
    ap.add_argument("--objects", nargs="*", help="object files or executables to read instead")
    ap.add_argument("--filter", default=None, help="only kernels whose demangled name matches this regex")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    ap.add_argument("--all-loops", action="store_true", help="also loops without tensor instructions")
    ap.add_argument("--ops", action="store_true", help="print each loop's most frequent opcodes")
    ap.add_argument("--max-per-kb", type=float, default=None,
                    help="exit 1 if a reported loop needs more warp-instructions per KB than this")
    ap.add_argument("--skip-missing-tool", action="store_true",
                    help="exit 77 (a skipped test) instead of failing when cuobjdump is not installed")
    args = ap.parse_args()

    objs = args.objects or default_objects(args.build)
    if not objs:
        sys.exit(f"sass_report: no CUDA objects under {args.build}/CMakeFiles (build first)")
    cuobjdump = find_tool("cuobjdump", args.skip_missing_tool)
    report = []
    for obj in objs:
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True)
        if sass.returncode != 0:
            sys.exit(f"sass_report: cuobjdump -sass {obj} failed: {sass.stderr.strip()}")
        res = parse_resources(subprocess.run([cuobjdump, "-res-usage", obj], capture_output=True,
                                             text=True).stdout)
        funcs = parse_sass(sass.stdout)
        names = demangle(list(funcs))
        for fn, instrs in funcs.items():
            dn = names.get(fn, fn)
            if args.filter and not re.search(args.filter, dn):
                continue
            spills = sum(1 for _a, _p, op, _x in instrs if op.split(".")[0] in ("LDL", "STL"))
            r = res.get(fn, {})
            for li, (i0, i1) in enumerate(loops(instrs, args.all_loops)):
                st = loop_stats(instrs[i0:i1 + 1])
                st.update({"object": os.path.basename(obj), "kernel": short_name(dn), "loop": li,
                           "address": f"0x{instrs[i0][0]:04x}-0x{instrs[i1][0]:04x}",
                           "registers": r.get("REG"), "stack": r.get("STACK"), "spill_instructions": spills})
                report.append(st)

    if not report:
        sys.exit("sass_report: no loop with HMMA/HGMMA found")
    hdr = (f"{'kernel':<52} {'loop':>4} {'instr':>6} {'KB':>5} {'/KB':>6} | "
           + " ".join(f"{CLASS_TITLES[c]:>8}" for c in CLASSES) + f" | {'reg':>4} {'stack':>5} {'spill':>5} {'in loop':>7}")
    print("Weight-streaming loops (instructions per KB of FP4 weights, by class)")
    print(hdr)
    print("-" * len(hdr))
    for st in report:
        kb = st["weight_kb"]
        per = st["instructions"] / kb if kb else float("nan")
        cls = " ".join(f"{(st['classes'][c] / kb if kb else 0):8.1f}" for c in CLASSES)
        name = st["kernel"] if len(st["kernel"]) <= 52 else st["kernel"][:49] + "..."
        print(f"{name:<52} {st['loop']:>4} {st['instructions']:>6} {kb:5.2f} {per:6.1f} | {cls} | "
              f"{st['registers'] if st['registers'] is not None else '?':>4} "
              f"{st['stack'] if st['stack'] is not None else '?':>5} {st['spill_instructions']:>5} {st['loop_spills']:>7}")
        if args.ops:
            print("      " + ", ".join(f"{o} {n}" for o, n in st["top_ops"]))
    print("\nKB: FP4 weight bytes one iteration consumes (128 B per HMMA m16n8k16; per new HGMMA A operand).")
    print("spill: LDL/STL instructions anywhere in the kernel (in loop: inside this loop); stack: bytes of its "
          "stack frame. Loops are numbered in address order (decode: 0 = GEMM1, 1 = GEMM2).")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.max_per_kb is not None:
        over = [st for st in report if st["weight_kb"] and st["instructions"] / st["weight_kb"] > args.max_per_kb]
        for st in over:
            print(f"sass_report: {st['kernel']} loop {st['loop']}: "
                  f"{st['instructions'] / st['weight_kb']:.1f} per KB > {args.max_per_kb}", file=sys.stderr)
        if over:
            sys.exit(1)
        print(f"every reported loop within {args.max_per_kb} warp-instructions per KB")


if __name__ == "__main__":
    main()
