"""`fp4moe plan` without a GPU (CUDA_VISIBLE_DEVICES empty): the table's rows, the tactic per T, the
device it names, batch-invariant mode. Runs the CMake build's program (FP4MOE_BUILD_DIR)."""

import os
import pathlib
import re
import subprocess

import pytest


def _cli():
    build = os.environ.get("FP4MOE_BUILD_DIR")
    exe = pathlib.Path(build) / "fp4moe" if build else None
    if exe is None or not exe.exists():
        pytest.skip("the fp4moe program is not built (set FP4MOE_BUILD_DIR to a CMake build)")
    return str(exe)


def plan(*args):
    r = subprocess.run([_cli(), "plan", *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.startswith("preset "))
    cols = lines[header].split()
    rows = []
    for l in lines[header + 1:]:
        if not l.strip():
            break
        rows.append(dict(zip(cols, l.split())))
    notes = {m.group(1): m.group(2) for m in (re.match(r"\[(\d+)\] (.*)", l) for l in lines) if m}
    return lines, rows, notes


def test_rows_and_tactics_per_token_count():
    tokens = [1, 8, 64, 65, 1024, 4096, 16384]
    lines, rows, notes = plan("--preset", "deepseek-v3,qwen3-30b-a3b", "--tokens", ",".join(map(str, tokens)),
                              "--device", "h200")
    assert "NVIDIA H200" in lines[0] and "--device" in lines[0], lines[0]
    assert [(r["preset"], int(r["T"])) for r in rows] == \
        [(p, t) for p in ("deepseek-v3", "qwen3-30b-a3b") for t in tokens]
    for r in rows:
        assert r["tactic"] in ("decode", "prefill"), r
        assert r["why"].strip("[]") in notes, r
        if r["tactic"] == "prefill":
            m, n = map(int, r["tile"].split("x"))
            assert m % 128 == 0 and n % 16 == 0 and 0 < n <= 256, r
            assert int(r["stages"]) >= 2, r
            assert int(r["chunk"]) * int(r["passes"]) >= int(r["T"]), r
        else:
            assert r["stages"] == "-" and re.fullmatch(r"k\d/\d", r["tile"]), r
            assert int(r["passes"]) == -(-int(r["T"]) // 64), r
    by = {(r["preset"], int(r["T"])): r for r in rows}
    for p in ("deepseek-v3", "qwen3-30b-a3b"):
        # The rule: the decode tactic at T = 8, the prefill tactic at T = 4096.
        assert by[(p, 8)]["tactic"] == "decode"
        assert by[(p, 4096)]["tactic"] == "prefill"
        ws = [int(by[(p, t)]["workspace_B"]) for t in tokens]
        assert ws == sorted(ws), ws
        floors = [float(by[(p, t)]["floor_us"]) for t in tokens]
        assert floors == sorted(floors), floors


def test_without_gpu_names_the_preset_device():
    lines, rows, _ = plan("--preset", "gpt-oss-120b", "--tokens", "8")
    assert "preset 'h200'" in lines[0] and "no CUDA device" in lines[0], lines[0]
    lines, _, _ = plan("--preset", "gpt-oss-120b", "--tokens", "8", "--device", "h100")
    assert "H100" in lines[0], lines[0]


def test_batch_invariant_is_prefill_with_one_tile():
    _, rows, notes = plan("--preset", "qwen3-235b-a22b", "--tokens", "1,8,64,65,4096", "--batch-invariant")
    assert {r["tactic"] for r in rows} == {"prefill"}
    assert len({r["tile"] for r in rows}) == 1, rows
    assert any("batch_invariant" in n for n in notes.values()), notes


def test_problem_flags_reach_the_planner():
    _, full, _ = plan("--preset", "qwen3-30b-a3b", "--tokens", "4096", "--device", "h200")
    _, half, _ = plan("--preset", "qwen3-30b-a3b", "--tokens", "4096", "--device", "h200", "--experts-local", "0:64")
    assert float(half[0]["est_MB"]) < float(full[0]["est_MB"])
    assert float(half[0]["GFLOP"]) < float(full[0]["GFLOP"])
    _, mx, _ = plan("--preset", "qwen3-30b-a3b", "--tokens", "4096", "--device", "h200", "--format", "mxfp4")
    assert float(mx[0]["est_MB"]) < float(full[0]["est_MB"])  # one scale per 32 weights instead of 16
