"""The benchmark's outputs from a small synthetic result set (no timed runs): report files, plots,
compare, README tables, the default suite's planned time, and unavailable backends."""
import json

import pytest
import torch

from pyattn.bench import cases as bench_cases
from pyattn.bench import compare, plots, readme
from pyattn.bench import __main__ as bench_main
from pyattn.bench.report import console_report, markdown_report, summary, write_report
from pyattn.bench.results import Run, load_run, write_run
from pyattn.bench.runner import base_row

CPU = torch.device("cpu")
ENV = {"date": "2026-12-02 10:00 UTC", "device": "Test CPU, 2 cores (avx512f)", "torch": torch.__version__}


def _row(op, mode, config, dtype, impl, ms, *, figure=None, x=None, facets=(), params=None, unit="TFLOP/s",
         work=1e9, status="ok", backend=None, spread=0.02, mem=None):
    case = bench_cases.Case(op, mode, config, dtype, {impl: lambda: None}, work=work, unit=unit,
                            params=params or {}, x=x, facets=tuple(facets), figure=figure)
    r = base_row(case, op, impl)
    r.update(status=status, backend=backend or ("cpu" if impl == "pyattn" else "peer"))
    if status == "ok":
        r.update(median_ms=ms, q1_ms=ms * (1 - spread / 2), q3_ms=ms * (1 + spread / 2), iqr_ms=ms * spread,
                 spread=spread, reps=10, noisy=spread > 0.1, throughput=work / (ms * 1e-3) / 1e12, peak_mem_MB=mem)
    else:
        r["reason"] = "cpu: forced build failure"
    return r


def synthetic_run(scale=1.0):
    """attention: 2 modes x 2 dtypes x D in {64, 128}, N in {512, 1024, 2048}, 3 impls (8 panels);
    glu: one shape, with peak memory (bars, 2 panels); hf: no x axis (bars, 1 panel)."""
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        for dtype in ("float32", "bfloat16"):
            for D in (64, 128):
                for N in (512, 1024, 2048):
                    for impl, f in (("pyattn", 1.0), ("sdpa", 1.3), ("eager", 2.0)):
                        rows.append(_row("attention", mode, f"B1 H8 N{N} D{D}", dtype, impl, scale * f * N / 100,
                                         figure="attention", x="N", facets=("D",), params={"N": N, "D": D},
                                         spread=0.3 if (impl, N) == ("eager", 512) else 0.02))
    for mode in ("fwd", "fwd+bwd"):
        for impl, f, mem in (("pyattn", 1.0, 150.0), ("eager", 1.1, 220.0)):
            rows.append(_row("glu_ffn", mode, "4096x1024x2816", "float32", impl, scale * 400 * f, figure="glu_ffn",
                             x="T", facets=("H",), params={"T": 4096, "H": 1024}, mem=mem))
    for impl, f in (("pyattn", 1.0), ("sdpa", 1.05)):
        rows.append(_row("hf_llama", "fwd", "L4 d512", "float32", impl, scale * 420 * f, figure="hf_models"))
    limits = {"copy_GBs": 31.5, "gemm_TFLOPs": {"float32": 0.5, "bfloat16": 1.2}}
    return Run(rows, dict(ENV), limits, scope="default", wall_s=12.0)


def test_report_writes_every_file_and_plots_open(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image as mpimg

    run = synthetic_run()
    written = write_report(run, tmp_path)
    names = {p.name for p in written}
    assert names == {"results.json", "results.csv", "results.md", "attention.png", "glu_ffn.png",
                     "glu_ffn-memory.png", "hf_models.png"}
    for p in written:
        if p.suffix == ".png":
            img = mpimg.imread(p)
            h, w = img.shape[:2]
            assert 300 <= w <= 2000 and 200 <= h <= 1600, (p.name, w, h)  # readable at natural size
    md = (tmp_path / "results.md").read_text()
    assert "![attention.png](attention.png)" in md and "## glu_ffn" in md
    # the plots are generic: one axes per (mode, dtype, facet) panel, labelled with units
    fig = plots.figure_for(run, "attention")
    assert len(fig.axes) == 8
    assert all(ax.get_ylabel() == "throughput (TFLOP/s)" for ax in fig.axes)
    assert all(ax.get_xlabel() for ax in fig.axes)
    assert len(plots.figure_for(run, "glu_ffn", "peak_mem_MB").axes) == 2
    assert len(plots.figure_for(run, "hf_models").axes) == 1


def test_results_round_trip_and_csv(tmp_path):
    run = synthetic_run()
    write_run(run, tmp_path)
    back = load_run(tmp_path)
    assert back.by_key().keys() == run.by_key().keys()
    assert back.limits == run.limits
    header = [l for l in (tmp_path / "results.csv").read_text().splitlines() if not l.startswith("#")][0]
    for col in ("impl", "backend", "median_ms", "iqr_ms", "spread", "noisy"):
        assert col in header.split(",")


def test_noisy_rows_are_flagged_in_tables():
    text = console_report(synthetic_run())
    noisy_line = next(l for l in text.splitlines() if "N512 D64" in l and "float32" in l and l.lstrip().startswith("fwd "))
    assert "10.24*" in noisy_line and "5.120*" not in noisy_line and "spread" in text


def test_compare_matches_rows_and_computes_ratios(tmp_path, capsys):
    a, b = synthetic_run(1.0), synthetic_run(0.5)  # b is twice as fast everywhere
    b.rows = [r for r in b.rows if r["impl"] != "eager"] + [
        _row("attention", "fwd", "B1 H8 N9999 D64", "float32", "pyattn", 1.0)]  # only in b: not matched
    matched = compare.match([a, b])
    assert len(matched) == len([r for r in a.rows if r["impl"] != "eager"])
    for key, impl, rows in matched:
        assert rows[0]["key"] == rows[1]["key"] == key and rows[1]["impl"] == impl
        assert compare.ratio(rows[0], rows[1]) == pytest.approx(2.0)
    assert compare.geomean_by_impl(matched, 1)["pyattn"][0] == pytest.approx(2.0)
    write_run(a, tmp_path / "a")
    write_run(b, tmp_path / "b")
    assert compare.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "cmp")]) == 0
    out = capsys.readouterr().out
    assert "2.00x" in out
    assert (tmp_path / "cmp" / "compare.csv").exists()


def test_unavailable_backend_row_is_labelled_with_a_banner(tmp_path):
    run = synthetic_run()
    r = next(r for r in run.rows if r["impl"] == "pyattn" and r["op"] == "glu_ffn")
    r.update(status="unavailable", backend="reference", reason="glu/cpu: forced build failure",
             median_ms=None, throughput=None)
    run = Run(run.rows, run.environment, run.limits, scope="default")
    assert run.banner and "UNAVAILABLE" in run.banner[0] and "forced build failure" in run.banner[0]
    text = console_report(run)
    assert text.splitlines()[0].startswith("!! UNAVAILABLE")
    glu_line = next(l for l in text.splitlines() if "4096x1024x2816" in l and l.lstrip().startswith("fwd "))
    assert "unavailable" in glu_line and "400" not in glu_line.split("unavailable")[0]
    assert markdown_report(run).splitlines()[2].startswith("> **UNAVAILABLE")
    assert "UNAVAILABLE" in summary(run)
    write_run(run, tmp_path)
    assert json.loads((tmp_path / "results.json").read_text())["banner"] == run.banner
    assert (tmp_path / "results.csv").read_text().startswith("# UNAVAILABLE")


def test_readme_tables_are_generated_from_the_run(tmp_path):
    write_run(synthetic_run(), tmp_path / "results" / "r1")
    text = ("intro\n<!-- bench-table run=results/r1 figure=attention mode=fwd dtype=float32 columns=N,D -->\n"
            "stale\n<!-- /bench-table -->\nend\n")
    out = readme.regenerate(text, tmp_path)
    assert "stale" not in out and out.startswith("intro\n") and out.endswith("<!-- /bench-table -->\nend\n")
    table = [l for l in out.splitlines() if l.startswith("| ")]
    assert table[0] == "| N | D | mode | dtype | pyattn ms | throughput | backend | × sdpa | × eager |"
    assert len(table) == 1 + 6  # 3 N x 2 D, fwd, fp32
    assert "| 1024 | 64 | fwd | fp32 | 10.24 |" in out and "| 1.30 | 2.00 |" in out
    assert "Run: [`results/r1`](results/r1/results.md) — Test CPU" in out
    assert readme.regenerate(out, tmp_path) == out  # idempotent


def test_legacy_results_load_and_match_new_rows(tmp_path):
    (tmp_path / "results.csv").write_text(
        "# date: 2026-11-25 14:45 UTC\n# device: AMD EPYC\nconfig,dtype,eager_ms,mode,op,pyattn_ms,unit,work\n"
        "4096x1024,float32,11.658,fwd,rms_norm,0.695,GB/s,33554432\n")
    run = load_run(tmp_path)
    rows = {r["impl"]: r for r in run.rows}
    assert rows["pyattn"]["median_ms"] == 0.695 and rows["pyattn"]["backend"] == "not recorded"
    assert rows["eager"]["key"] == bench_cases.case_key("rms_norm", "fwd", "4096x1024", "float32")
    assert rows["pyattn"]["params"]["elements"] == 4096 * 1024


def test_default_suite_fits_its_time_budget():
    """The default run must finish in about 5 minutes on 2 CPU cores: planned time from the case
    list (cases x planned repetitions x per-call cost estimate), nothing is timed."""
    bench_main._load_suites()
    budget = 0.4  # the CLI's default per-implementation timing budget
    full_lists = {fam: build(CPU, False) for fam, build in bench_cases.SUITES.items()}  # built once
    selected = [c for fam, cs in full_lists.items()
                for c in bench_cases.default_headlines(fam, bench_cases.select_scope(list(cs), "default"))]
    planned = bench_cases.estimate_cases_s(selected, CPU, budget)
    assert planned <= 330, f"default suite planned at {planned:.0f} s"
    families = {c.figure_name.split("-")[0] for c in selected}
    assert {"rms_norm", "attention", "glu_ffn", "hf_models"} <= families
    assert len(selected) < sum(len(cs) for cs in full_lists)
    assert len({c.key for c in selected}) == len(selected)  # one row per case key
