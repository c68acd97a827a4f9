"""The JIT build follows the installed torch: its flags compile against torch's headers, every C++
family builds, and a failed build says which compiler error stopped it and where the full log is."""
from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

from pyattn import _build

CPU_FAMILIES = sorted(p.stem for p in (_build.csrc_dir() / "cpu").glob("*.cpp"))


def test_cpu_flags_leave_the_standard_to_torch():
    for tier in ("AVX512", "AVX2", "DEFAULT"):
        flags = _build.cpu_cflags(tier)
        assert not any(f.startswith("-std=") for f in flags), flags
        assert "-march=native" not in flags
    assert not any(f.startswith("-std=") for f in _build.cuda_flags("90a"))


def test_openmp_flag_follows_atens_parallel_backend():
    uses_omp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    assert ("-fopenmp" in _build.cpu_cflags(_build.cpu_tier())) == uses_omp


def test_flags_compile_against_the_installed_torch_headers(tmp_path):
    """A tiny translation unit that includes ATen, built exactly as the kernels are."""
    from torch.utils import cpp_extension

    src = tmp_path / "tiny.cpp"
    src.write_text("#include <ATen/ATen.h>\n#include <ATen/Parallel.h>\n"
                   "int pyattn_tiny(int n) { int s = 0; at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) "
                   "{ s += int(b - a); }); return s; }\n")
    tier = _build.cpu_tier()
    cpp_extension.load(name="pyattn_tiny_flags_probe", sources=[str(src)], extra_cflags=_build.cpu_cflags(tier),
                       extra_ldflags=_build.cpu_ldflags(), build_directory=str(tmp_path), is_python_module=False,
                       verbose=False)
    assert any(tmp_path.glob("*.so"))


@pytest.mark.parametrize("family", CPU_FAMILIES)
def test_every_cpu_extension_builds(family):
    assert _build.load_cpu_extension(family) is None


def test_first_error_lines_skip_ninja_summary():
    log = ("Error building extension 'x': [1/2] c++ -c a.cpp -o a.o\nFAILED: a.o\n"
           "In file included from a.cpp:1:\n/usr/include/ATen/ATen.h:4:2: error: #error C++20 or later required\n"
           "a.cpp:7:3: error: expected ';'\nninja: build stopped: subcommand failed.\n")
    lines = _build.first_error_lines(log)
    assert lines[0] == "/usr/include/ATen/ATen.h:4:2: error: #error C++20 or later required"
    assert lines[1] == "a.cpp:7:3: error: expected ';'"
    assert not any("ninja: build stopped" in ln for ln in lines)


def test_failed_build_quotes_the_compiler_error_and_keeps_the_log(monkeypatch, tmp_path):
    root = tmp_path / "csrc"
    (root / "cpu").mkdir(parents=True)
    # the error sits in a shared header, as torch's own "#error C++20 ..." does for every family
    (root / "cpu" / "bad.h").write_text("inline int f() { return pyattn_undeclared_marker; }\n")
    (root / "cpu" / "broken.cpp").write_text('#include "cpu/bad.h"\nint g() { return f(); }\n')
    monkeypatch.setattr(_build, "csrc_dir", lambda: root)
    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_warned_errors", set())
    monkeypatch.setenv("PYATTN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning) as record:
        reason = _build.load_cpu_extension("broken")
    assert reason is not None
    assert "pyattn_undeclared_marker" in reason and "error" in reason, reason
    assert "ninja: build stopped" not in reason
    log = Path(reason.split("full log: ")[1].split(";")[0])
    assert log.exists() and "pyattn_undeclared_marker" in log.read_text()
    assert len(record) == 1 and "pyattn_undeclared_marker" in str(record[0].message)
    # the same error in a second family does not warn again
    (root / "cpu" / "broken2.cpp").write_text('#include "cpu/bad.h"\nint h() { return f(); }\n')
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reason2 = _build.load_cpu_extension("broken2")
    assert reason2 is not None and "pyattn_undeclared_marker" in reason2


def test_backend_status_shows_the_build_failure(monkeypatch, tmp_path):
    import pyattn

    monkeypatch.setattr(_build, "_loaded", {"cpu:rms_norm": "'rms_norm' C++ extension build failed: a.cpp:1: error: x"})
    status = pyattn.backend_status("rms_norm", "cpu")
    assert status["cpu"].startswith("'rms_norm' C++ extension build failed: a.cpp:1: error")


def _fake_toolkit(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "include").mkdir()
    (root / "include" / "cuda_runtime.h").write_text("")
    nvcc = root / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\n")
    nvcc.chmod(nvcc.stat().st_mode | stat.S_IEXEC)
    return nvcc


def test_cuda_home_resolves_symlinked_nvcc(monkeypatch, tmp_path):
    nvcc = _fake_toolkit(tmp_path / "toolkit")
    farm = tmp_path / "farm" / "bin"
    farm.mkdir(parents=True)
    (farm / "nvcc").symlink_to(nvcc)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("PATH", f"{farm}{os.pathsep}{os.environ['PATH']}")
    assert _build.cuda_home() == (tmp_path / "toolkit").resolve()


def test_cuda_home_ignores_a_variable_without_headers(monkeypatch, tmp_path):
    _fake_toolkit(tmp_path / "toolkit")
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "not-a-toolkit"))
    monkeypatch.setenv("CUDA_PATH", str(tmp_path / "toolkit"))
    assert _build.cuda_home() == (tmp_path / "toolkit").resolve()
