"""Host-side pieces of bench/torch_grouped_mm.py that run without PyTorch or a GPU: the FLOP formula,
the calls-per-row rule, the memory bound, the roofline columns, the table and the CSV that
`fp4moe bench --torch-csv` reads (preset, tokens, experts, bytes, median_us first)."""

import csv
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tgm():
    spec = importlib.util.spec_from_file_location("torch_grouped_mm", ROOT / "bench" / "torch_grouped_mm.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports torch only in main()
    return mod


def test_flops_follow_the_benchmark_formula(tgm):
    # deepseek-v3 at T = 1024: 2 * T * k * (2I * H + H * I) = 0.72 TFLOP (BENCH.md's worked example).
    f = tgm.layer_flops(1024, 7168, 2048, 8)
    assert f == 2 * 1024 * 8 * (2 * 2048 * 7168 + 7168 * 2048)
    assert 0.71e12 < f < 0.73e12
    assert tgm.layer_flops(4096, 7168, 2048, 8) == 4 * f


def test_calls_per_row(tgm):
    assert tgm.calls_for_row(1, 4) == (1, True)        # one call touches 4x L2: one call, one copy
    assert tgm.calls_for_row(0, 1) == (1, True)
    assert tgm.calls_for_row(3, 4) == (4, True)        # every copy once, same logits
    assert tgm.calls_for_row(6, 2) == (6, False)       # cycling over 2 copies with fresh logits
    assert tgm.calls_for_row(2, 2) == (2, True)


def test_activation_bound_grows_linearly(tgm):
    a = tgm.activation_bytes(1024, 7168, 2048, 8)
    assert tgm.activation_bytes(2048, 7168, 2048, 8) == 2 * a
    # About 100 kB per routed slot for deepseek-v3: 16384 tokens stay far below an H200's memory
    # next to one 22.5 GB bf16 copy, twice over.
    big = tgm.activation_bytes(16384, 7168, 2048, 8)
    assert 10e9 < big < 20e9
    assert 2 * big + 22.55e9 < 0.8 * 141e9


def row(tgm, **kw):
    r = {"preset": "qwen3-30b-a3b", "tokens": 4096, "experts": 128.0, "bytes": 1.2e9, "median_us": 900.0,
         "min_us": 890.0, "max_us": 950.0, "floor_us": 300.0, "flops": tgm.layer_flops(4096, 2048, 768, 8),
         "calls": 1}
    r.update(kw)
    return tgm.with_roofline(r, 8e14)


def test_roofline_columns(tgm):
    r = row(tgm)
    assert r["compute_us"] == pytest.approx(r["flops"] / 8e14 * 1e6)
    assert r["roofline_us"] == max(r["floor_us"], r["compute_us"])
    assert r["roofline_ratio"] == pytest.approx(900.0 / r["roofline_us"])
    assert r["tflops"] == pytest.approx(r["flops"] / 900e-6 / 1e12)
    assert r["ratio"] == pytest.approx(3.0)
    slow_floor = row(tgm, floor_us=5000.0)
    assert slow_floor["roofline_us"] == 5000.0


def test_table_and_csv(tgm, tmp_path):
    rows = [row(tgm), row(tgm, tokens=16384, median_us=3600.0, flops=tgm.layer_flops(16384, 2048, 768, 8))]
    table = tgm.format_table(rows).splitlines()
    assert table[0].split() == ["preset", "T", "experts", "bytes", "median_us", "min_us", "max_us", "TB/s",
                                "floor_us", "ratio", "GFLOP", "comp_us", "roof_us", "roof_x", "TFLOP/s", "calls"]
    assert len({len(l) for l in table[2:]}) == 1, "fixed width"
    path = tmp_path / "torch.csv"
    tgm.write_csv(path, rows)
    with open(path) as f:
        got = list(csv.reader(f))
    assert got[0] == tgm.COLUMNS
    assert got[0][:5] == ["preset", "tokens", "experts", "bytes", "median_us"]  # what fp4moe bench reads
    assert [g[1] for g in got[1:]] == ["4096", "16384"]
    assert float(got[2][4]) == 3600.0
    assert float(got[2][got[0].index("roofline_ratio")]) == pytest.approx(rows[1]["roofline_ratio"], rel=1e-3)


def test_argument_checks(tgm):
    args = tgm.parse_args(["--tokens", "128,16384", "--preset", "deepseek-v3"])
    assert args.tokens == [128, 16384] and args.gemm_size == 8192
    for bad in (["--gemm-size", "100"], ["--tokens", "0"], ["--reps", "10"], ["--preset", "nope"]):
        with pytest.raises(SystemExit):
            tgm.parse_args(bad)


# ---- bench/suite_summary.py over a fabricated out dir (the files fp4moe bench and the suite write) ----

FP4MOE_COLUMNS = ("preset,tokens,tactic,experts,bytes,median_us,min_us,max_us,tbps,floor_us,ratio,flops,compute_us,"
                  "roofline_us,roofline_ratio,tflops,rel_err,torch_us,copies,bf16_tflops,card")


def fp4moe_row(preset, T, median, ratio, roof_x, tflops, torch_us=""):
    return f"{preset},{T},prefill,128.0,1e9,{median},{median},{median},1.0,1.0,{ratio},1e12,1.0,1.0,{roof_x},{tflops},1e-3,{torch_us},1,800.0,NVIDIA H200"


@pytest.fixture(scope="module")
def summary():
    spec = importlib.util.spec_from_file_location("suite_summary", ROOT / "bench" / "suite_summary.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_summary(summary, tmp_path):
    (tmp_path / "card.txt").write_text("name, driver_version\nNVIDIA H200, 580.1\n")
    (tmp_path / "fp4moe.csv").write_text("\n".join([FP4MOE_COLUMNS, fp4moe_row("deepseek-v3", 1, 100.0, 1.5, 1.5, 0.1, 350.0),
                                                    fp4moe_row("deepseek-v3", 64, 2000.0, 1.2, 1.2, 10.0, 7000.0)]) + "\n")
    (tmp_path / "prefill.csv").write_text("\n".join([
        FP4MOE_COLUMNS,
        fp4moe_row("deepseek-v3", 1024, 1800.0, 1.2, 1.2, 400.0, 9000.0),
        fp4moe_row("deepseek-v3", 4096, 5000.0, 2.0, 1.3, 580.0, 30000.0),  # misses 1.25x, meets 60% (580 of 800)
        fp4moe_row("deepseek-v3", 16384, 18000.0, 2.0, 1.2, 640.0, 100.0),  # slower than torch
    ]) + "\n")
    (tmp_path / "batch_invariant.csv").write_text("\n".join([FP4MOE_COLUMNS, fp4moe_row("deepseek-v3", 1, 150.0, 2, 2, 0.1),
                                                             fp4moe_row("deepseek-v3", 4096, 5500.0, 2, 1.4, 500)]) + "\n")
    (tmp_path / "crossover.txt").write_text("preset T ...\n\n# deepseek-v3: prefill wins at every measured T >= 64; "
                                            "planner switches at T = 65 (x); planner disagrees at T = 64\n")
    (tmp_path / "steps.txt").write_text("torch 20 s  exit 0\nprefill 50 s  exit 1\ntotal 300 s\n")
    text = "\n".join(summary.summarize(tmp_path))
    assert "card: NVIDIA H200, 580.1" in text
    assert "deepseek-v3" in text and "1.20..1.50" in text  # decode ratios
    assert "3.50..3.50x" not in text and "3.50x" in text    # torch speedups 3.5 and 3.5
    assert "prefill targets met: 6 of 8" in text, text
    assert "missed: deepseek-v3 T=4096 layer <= 1.25x roofline (measured 1.30)" in text
    assert "missed: deepseek-v3 T=4096 >= 60% of the bf16 rate (measured 0.72)" not in text
    assert "missed: deepseek-v3 T=16384 faster than torch bf16 (measured 0.01)" in text
    assert "deepseek-v3 T=1 1.50x" in text and "deepseek-v3 T=4096 1.10x" in text
    assert "prefill wins at every measured T >= 64" in text
    assert "300 s in all; FAILED: prefill" in text
