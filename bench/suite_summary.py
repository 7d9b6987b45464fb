#!/usr/bin/env python3
"""Short summary of a bench/device_suite.sh out dir: the card and its measured rates, the decode and
prefill tables against their floors and PyTorch, the issue targets, batch_invariant's cost, the
crossover, and the seconds per step. Reads only the files the suite wrote; missing ones are named.

    python3 bench/suite_summary.py OUT_DIR
"""

import csv
import pathlib
import sys


def read_csv(path):
    if not path.exists() or path.stat().st_size == 0:
        return None
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def num(v):
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def span(values, fmt="{:.2f}"):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    lo, hi = min(values), max(values)
    return fmt.format(lo) if lo == hi else f"{fmt.format(lo)}..{fmt.format(hi)}"


def by_preset(rows):
    out = {}
    for r in rows:
        out.setdefault(r["preset"], []).append(r)
    return out


def summarize(out):
    lines = []
    say = lines.append
    missing = []
    card = out / "card.txt"
    rows = card.read_text().strip().splitlines() if card.exists() else []
    if rows:
        say("card: " + (rows[1] if len(rows) > 1 else rows[0]))
    else:
        missing.append("card.txt")
    for name, path in (("fp4moe", out / "bench.txt"), ("torch", out / "torch.log")):
        if path.exists():
            for l in path.read_text().splitlines():
                if "bf16 dense rate" in l:
                    say(f"{name}: " + l.lstrip("# ").split(";")[0].split(", comp")[0])
                    break

    decode = read_csv(out / "fp4moe.csv")
    if decode is None:
        missing.append("fp4moe.csv")
    else:
        say("decode (T = 1..64): ratio to the byte floor | speedup over torch bf16")
        for p, rs in by_preset(decode).items():
            sp = [num(r["torch_us"]) / num(r["median_us"]) for r in rs if num(r["torch_us"])]
            say(f"  {p:<16} {span([num(r['ratio']) for r in rs]):>12} | {span(sp):>12}x")

    prefill = read_csv(out / "prefill.csv")
    targets = []
    if prefill is None:
        missing.append("prefill.csv")
    else:
        say("prefill: T: layer/roofline, TFLOP/s, speedup over torch bf16")
        for p, rs in by_preset(prefill).items():
            cells = []
            for r in rs:
                T, rx, tf = int(r["tokens"]), num(r["roofline_ratio"]), num(r["tflops"])
                sp = num(r["torch_us"]) / num(r["median_us"]) if num(r["torch_us"]) else None
                if T in (1024, 4096, 16384):
                    cells.append(f"{T}: {rx:.2f}x {tf:.0f}" + (f" {sp:.2f}x" if sp else ""))
                if T >= 1024:
                    targets.append((f"{p} T={T} layer <= 1.25x roofline", rx, rx is not None and rx <= 1.25))
                if p == "deepseek-v3" and T >= 4096:
                    frac = tf / num(r["bf16_tflops"])
                    targets.append((f"{p} T={T} >= 60% of the bf16 rate", frac, frac >= 0.6))
                if sp is not None and T >= 128:
                    targets.append((f"{p} T={T} faster than torch bf16", sp, sp > 1.0))
            say(f"  {p:<16} " + " | ".join(cells))
    if targets:
        met = sum(1 for _, _, ok in targets if ok)
        say(f"prefill targets met: {met} of {len(targets)}")
        for what, v, ok in targets:
            if not ok:
                say(f"  missed: {what} (measured {v:.2f})" if v is not None else f"  missed: {what}")

    bi = read_csv(out / "batch_invariant.csv")
    if bi is None:
        missing.append("batch_invariant.csv")
    else:
        base = {(r["preset"], r["tokens"]): num(r["median_us"]) for r in (decode or []) + (prefill or [])}
        cells = []
        for r in bi:
            b = base.get((r["preset"], r["tokens"]))
            cost = f"{num(r['median_us']) / b:.2f}x" if b else f"{num(r['median_us']):.1f} us"
            cells.append(f"{r['preset']} T={r['tokens']} {cost}")
        say("batch_invariant cost (its time / the default mode's): " + ", ".join(cells))

    cross = out / "crossover.txt"
    if not cross.exists():
        missing.append("crossover.txt")
    else:
        say("crossover:")
        for l in cross.read_text().splitlines():
            if l.startswith("# ") and ": " in l and ("wins" in l):
                say("  " + l[2:])

    steps = out / "steps.txt"
    if steps.exists():
        failed = [l.split()[0] for l in steps.read_text().splitlines() if "exit" in l and not l.rstrip().endswith("exit 0")]
        total = [l for l in steps.read_text().splitlines() if l.startswith("total")]
        say("steps: " + (total[0].split(None, 1)[1].strip() if total else "?") + " in all" +
            (f"; FAILED: {', '.join(failed)}" if failed else "; every step exited 0"))
    if missing:
        say("missing: " + ", ".join(missing))
    return lines


def main(argv):
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    print("\n".join(summarize(pathlib.Path(argv[1]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
