"""The benchmark suite measures what it says: each row times its own shape, and the CLI writes its report."""
import csv

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


def test_cli_writes_report(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(rms_bench, "SHAPES", [(16, 64)])
    out = tmp_path / "report"
    rc = bench_main.main(["--ops", "rms_norm", "--quick", "--budget", "0.01", "--peers", "eager", "--out", str(out)])
    assert rc == 0
    assert {"results.csv", "results.md", "environment.json"} <= {p.name for p in out.iterdir()}
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    assert [(r["mode"], r["config"]) for r in rows] == [("fwd", "16x64"), ("fwd+bwd", "16x64")]
    for r in rows:
        assert float(r["pyattn_ms"]) > 0 and float(r["eager_ms"]) > 0
    assert "x vs eager" in capsys.readouterr().out


def test_cli_rejects_unknown_family(capsys):
    assert bench_main.main(["--ops", "no_such_op"]) == 2
    assert "unknown --ops" in capsys.readouterr().err
