"""The one-call GPU suite (benchmarks/gpu_suite.sh) checked on CPU through its --dry-run mode: every
step runs its CPU stand-in, CUDA_HOME is resolved through an nvcc wrapper script that lives outside
the toolkit, at most 8 files land in the output folder, and a step that cannot run fails the suite."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils timeout")


def _fake_toolkit(tmp_path: Path) -> Path:
    """A toolkit at tmp/toolkit (bin/nvcc + include/cuda_runtime.h) and a wrapper tmp/wrap/nvcc that
    execs it, as on machines where `nvcc` on PATH is a script outside the CUDA folder."""
    kit = tmp_path / "toolkit"
    (kit / "bin").mkdir(parents=True)
    (kit / "include").mkdir()
    (kit / "include" / "cuda_runtime.h").write_text("/* stand-in */\n")
    nvcc = kit / "bin" / "nvcc"
    nvcc.write_text('#!/bin/sh\ncase "$*" in *--dryrun*) echo "#\\$ _HERE_=' + str(kit / "bin") + '" >&2;; '
                    '*) echo "Cuda compilation tools, release 0.0 (stand-in)";; esac\n')
    wrap = tmp_path / "wrap"
    wrap.mkdir()
    (wrap / "nvcc").write_text(f'#!/bin/sh\nexec {nvcc} "$@"\n')
    for f in (nvcc, wrap / "nvcc"):
        f.chmod(0o755)
    return wrap


def _env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "TRITON_INTERPRET")}
    env["PATH"] = f"{_fake_toolkit(tmp_path)}:{env['PATH']}"
    env["TMPDIR"] = str(tmp_path)
    env.update(extra)
    return env


def test_dry_run_passes(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SUITE), str(out), "--dry-run"], cwd=ROOT, env=_env(tmp_path),
                         capture_output=True, text=True, timeout=300)
    log = (out / "suite.log").read_text()
    assert res.returncode == 0, log[-4000:] + res.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8, files
    assert {"suite.log", "environment.txt", "tests.log", "bench_triton.csv", "targets.csv"} <= set(files), files
    assert f"CUDA_HOME={tmp_path / 'toolkit'}" in log  # the toolkit, not the wrapper's folder
    env_txt = (out / "environment.txt").read_text()
    assert env_txt.index("torch") < env_txt.index("triton")  # versions first, before any step
    for step in ("install", "build", "tests", "bench-triton", "targets"):
        assert f"[{step}] start" in log, step
    assert "collected" in (out / "tests.log").read_text()
    assert "all steps passed" in log
    assert not list(tmp_path.glob("pyattn-gpu-suite.*")), "temporary build folder left behind"


def test_budget_exhausted_fails(tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(["bash", str(SUITE), str(out), "--dry-run"], cwd=ROOT,
                         env=_env(tmp_path, PYATTN_SUITE_BUDGET="0"), capture_output=True, text=True, timeout=120)
    log = (out / "suite.log").read_text()
    assert res.returncode != 0
    assert "SKIPPED: suite budget" in log and "FAILED steps:" in log
