"""The benchmark suite measures what it says: each row times its own shape, and the CLI writes its report."""
import csv
import json

import pytest
import torch

import pyattn
import pyattn.ops.glu as glu_ops
from pyattn.bench import __main__ as bench_main
from pyattn.bench import glu as glu_bench
from pyattn.bench import rms_norm as rms_bench

CPU = torch.device("cpu")


def _record_shapes(monkeypatch, module, name):
    seen = []
    real = getattr(module, name)

    def spy(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return real(x, *args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return seen


def test_rms_norm_rows_time_their_own_shape(monkeypatch):
    monkeypatch.setattr(rms_bench, "SHAPES", [(8, 16), (4, 32), (2, 8)])
    seen = _record_shapes(monkeypatch, pyattn, "rms_norm")
    cases = rms_bench.rms_norm_cases(CPU, quick=False)
    assert len(cases) == 6
    for case in cases:
        seen.clear()
        case.impls["pyattn"]()
        rows, hidden = map(int, case.config.split("x"))
        assert seen == [(rows, hidden)], case.config


def test_glu_rows_time_their_own_shape(monkeypatch):
    monkeypatch.setattr(glu_bench, "SHAPES", [(8, 16, 24), (4, 8, 12)])
    seen = _record_shapes(monkeypatch, glu_ops, "glu_ffn")
    cases = glu_bench.glu_cases(CPU, quick=False)
    assert [c.mode for c in cases] == ["fwd", "fwd+bwd"] * 2
    for case in cases:
        seen.clear()
        case.impls["pyattn"]()
        tokens, hidden, _ = map(int, case.config.split("x"))
        assert seen and all(s == (tokens, hidden) for s in seen), case.config


def _run_cli(monkeypatch, tmp_path, *extra):
    monkeypatch.setattr(rms_bench, "SHAPES", [(16, 64)])
    out = tmp_path / "report"
    rc = bench_main.main(["--ops", "rms_norm", "--quick", "--budget", "0.01", "--peers", "eager", "--out", str(out),
                          "--no-progress", *extra])
    return rc, out, json.loads((out / "results.json").read_text())


def test_cli_writes_report(monkeypatch, tmp_path, capsys):
    rc, out, data = _run_cli(monkeypatch, tmp_path, "--no-strict")
    assert rc == 0
    assert {"results.csv", "results.json", "results.md"} <= {p.name for p in out.iterdir()}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [(r["mode"], r["config"], r["impl"]) for r in rows] == [
        ("fwd", "16x64", "pyattn"), ("fwd", "16x64", "eager"), ("fwd+bwd", "16x64", "pyattn"),
        ("fwd+bwd", "16x64", "eager")]
    for r in rows:
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["spread"]) >= 0
        assert r["backend"] == ("cpu" if r["impl"] == "pyattn" else "peer")
    assert data["banner"] == [] and data["limits"]["copy_GBs"] > 0 and "float32" not in data["limits"]["gemm_TFLOPs"]
    env = data["environment"]
    assert env["torch"] == torch.__version__ and "isa_flags" in env and "blas" in env and "cpu_model" in env
    assert isinstance(env["cpu_attention_tiles"], str)  # the cpu attention tile choices made in the process
    printed = capsys.readouterr().out
    assert "x vs eager" in printed and "pyattn bench summary" in printed


def _fail_cpu_build(monkeypatch):
    real = pyattn._dispatch.environment_reason

    def reason(name, family, device):
        if name == "cpu":
            return "forced build failure: error: C++20 or later compatible compiler is required"
        return real(name, family, device)

    monkeypatch.setattr(pyattn._dispatch, "environment_reason", reason)


def test_forced_build_failure_gives_an_unavailable_banner_not_reference_times(monkeypatch, tmp_path, capsys):
    _fail_cpu_build(monkeypatch)
    assert pyattn.backend_status("rms_norm")["cpu"].startswith("forced build failure")
    rc, out, data = _run_cli(monkeypatch, tmp_path, "--no-strict")
    assert rc == 0
    mine = [r for r in data["rows"] if r["impl"] == "pyattn"]
    assert len(mine) == 2
    for r in mine:  # the reference backend ran: the row is labelled, not timed as pyattn
        assert r["status"] == "unavailable" and r["backend"] == "reference" and r["median_ms"] is None
        assert "forced build failure" in r["reason"]
    assert all(r["status"] == "ok" for r in data["rows"] if r["impl"] == "eager")
    assert len(data["banner"]) == 1 and "forced build failure" in data["banner"][0]
    md = (out / "results.md").read_text()
    assert "UNAVAILABLE" in md.split("|")[0]  # banner above the table
    assert (out / "results.csv").read_text().startswith("# UNAVAILABLE")
    printed = capsys.readouterr().out
    assert printed.count("UNAVAILABLE") >= 2


@pytest.mark.parametrize("how", ["--strict", "CI"])
def test_strict_exits_nonzero_when_a_backend_is_unavailable(monkeypatch, tmp_path, how):
    _fail_cpu_build(monkeypatch)
    if how == "CI":
        monkeypatch.setenv("CI", "true")
    rc, _, data = _run_cli(monkeypatch, tmp_path, *([how] if how.startswith("--") else []))
    assert rc == 3 and data["banner"]


def test_strict_run_passes_when_backends_are_available(monkeypatch, tmp_path):
    rc, _, data = _run_cli(monkeypatch, tmp_path, "--strict")
    assert rc == 0 and not data["banner"]


def test_cli_rejects_unknown_family(capsys):
    assert bench_main.main(["--ops", "no_such_op"]) == 2
    assert "unknown --ops" in capsys.readouterr().err
