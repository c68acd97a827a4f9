"""Static checks of the CUDA backend that run without a GPU.

Every ``csrc/cuda/*.cu`` file is compiled with nvcc for sm_80 and sm_90a (``-Xptxas -v``); the test
asserts a clean compile (no warnings), no register spills and static shared memory within 48 KB for
every kernel. The binding's ``extern "C"`` launcher declarations are force-included into each compile,
so a signature mismatch between binding and kernels fails here. The torch binding ``csrc/cuda_binding.cpp`` is syntax-checked with the host compiler
against the installed torch headers when those ship the CUDA headers it needs.

All compiles run once, in parallel, in a module-scoped fixture (about 40 s on 2 cores).
Skips (with the reason) only when nvcc is not on PATH.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
BINDING = ROOT / "csrc" / "cuda_binding.cpp"
EXPECTED = ["attention.cu", "glu.cu", "rms_norm.cu"]
ARCHS = {
    "sm_80": ["-arch=sm_80"],
    "sm_90a": ["-gencode", "arch=compute_90a,code=sm_90a"],
}
NVCC = shutil.which("nvcc")
SMEM_STATIC_LIMIT = 48 * 1024

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")

_ENTRY_RE = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(\w+)'")


def _parse_ptxas(log: str):
    """-> list of (kernel, arch, info dict) from `-Xptxas -v` output."""
    out = []
    parts = _ENTRY_RE.split(log)
    # parts: [pre, name, arch, body, name, arch, body, ...]
    for i in range(1, len(parts) - 2, 3):
        name, arch, body = parts[i], parts[i + 1], parts[i + 2]
        info = {}
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", body)
        if m:
            info["spill_stores"], info["spill_loads"] = int(m.group(1)), int(m.group(2))
        m = re.search(r"Used (\d+) registers", body)
        if m:
            info["registers"] = int(m.group(1))
        m = re.search(r"(\d+) bytes smem", body)
        info["smem"] = int(m.group(1)) if m else 0
        out.append((name, arch, info))
    return out


def _launcher_header(tmp: Path):
    """The binding's ``extern "C"`` launcher declarations as a header, force-included into every .cu compile:
    a launcher whose definition drifted from what the binding declares is then a compile error
    (conflicting declaration of a C function) instead of silent undefined behaviour at run time."""
    if not BINDING.exists():
        return None
    text = BINDING.read_text()
    start = text.find('extern "C" {')
    if start < 0:
        return None
    end = text.find("\n}", start)
    header = tmp / "pyattn_launchers.h"
    header.write_text("#pragma once\n#include <cuda_runtime.h>\n#include <stdint.h>\n" + text[start:end + 2] + "\n")
    return header


def _nvcc_job(src: Path, arch: str, tmp: Path, header):
    obj = tmp / f"{src.stem}_{arch}.o"
    cmd = [NVCC, "-c", "-O3", "-std=c++17", *ARCHS[arch], "-Xptxas", "-v", "-I", str(ROOT / "csrc")]
    if header is not None:
        cmd += ["-include", str(header)]
    cmd += [str(src), "-o", str(obj)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr, " ".join(cmd)


def _torch_include():
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import include_paths
    except Exception:  # pragma: no cover - torch is a hard dependency of the package
        return None
    return include_paths()


def _cuda_include():
    nvcc = Path(NVCC).resolve()
    for cand in (nvcc.parent.parent / "include", Path("/usr/local/cuda/include")):
        if (cand / "cuda_runtime.h").exists():
            return cand
    return None


def _binding_job(tmp: Path):
    """g++ -fsyntax-only of the binding; returns (status, log) with status in {'ok', 'fail', 'skip: why'}."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        return "skip: no host C++ compiler", ""
    incs = _torch_include()
    if not incs:
        return "skip: torch include paths unavailable", ""
    base = Path(incs[0])
    if not (base / "c10" / "cuda" / "CUDAGuard.h").exists():
        return "skip: this torch install ships no c10/cuda headers", ""
    cuda_inc = _cuda_include()
    if cuda_inc is None:
        return "skip: cuda_runtime.h not found next to nvcc", ""
    extra = []
    # CPU-only torch wheels lack this CMake-generated header; an empty stand-in is enough to parse.
    if not (base / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        stub = tmp / "stub" / "c10" / "cuda" / "impl"
        stub.mkdir(parents=True, exist_ok=True)
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        extra = ["-I", str(tmp / "stub")]
    cmd = [cxx, "-fsyntax-only", "-std=c++17", "-Wall", "-Wextra", *extra]
    for inc in incs:
        cmd += ["-isystem", inc]
    cmd += ["-isystem", str(cuda_inc), "-I", str(ROOT / "csrc"), str(BINDING)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    return ("ok" if proc.returncode == 0 else "fail"), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("nvcc")
    sources = sorted(CUDA_DIR.glob("*.cu"), key=lambda p: p.stat().st_size, reverse=True)  # biggest first
    jobs = {}
    header = _launcher_header(tmp)
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        for src in sources:
            for arch in ARCHS:
                jobs[(src.name, arch)] = pool.submit(_nvcc_job, src, arch, tmp, header)
        binding = pool.submit(_binding_job, tmp) if BINDING.exists() else None
        results = {key: fut.result() for key, fut in jobs.items()}
        results["binding"] = binding.result() if binding else ("skip: csrc/cuda_binding.cpp missing", "")
    return results


def test_expected_sources_exist():
    present = sorted(p.name for p in CUDA_DIR.glob("*.cu"))
    for name in EXPECTED:
        assert name in present, f"csrc/cuda/{name} is missing (found {present})"


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", EXPECTED)
def test_nvcc_compiles_without_spills(builds, name, arch):
    rc, log, cmd = builds[(name, arch)]
    assert rc == 0, f"nvcc failed ({cmd}):\n{log[-6000:]}"
    warnings = [ln for ln in log.splitlines() if re.search(r"\bwarning\b", ln, re.IGNORECASE)]
    assert not warnings, "nvcc warnings:\n" + "\n".join(warnings[:40])
    kernels = _parse_ptxas(log)
    assert kernels, f"no ptxas -v output parsed for {name} / {arch}:\n{log[-3000:]}"
    for kname, karch, info in kernels:
        assert karch == arch, (kname, karch, arch)
        assert "spill_stores" in info, f"could not parse spill info for {kname}"
        assert info["spill_stores"] == 0 and info["spill_loads"] == 0, f"{kname} ({arch}) spills: {info}"
        assert info["smem"] <= SMEM_STATIC_LIMIT, f"{kname} ({arch}) static smem {info['smem']} B"
        assert info.get("registers", 0) <= 255, f"{kname} ({arch}) uses {info['registers']} registers"


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except Exception:
        return None
    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else None


def sass_counts(obj: Path) -> dict:
    """Tensor-core (HMMA), ldmatrix (LDSM) and cp.async (LDGSTS) instructions in an object's SASS."""
    sass = subprocess.run([_cuobjdump(), "-sass", str(obj)], capture_output=True, text=True, timeout=300).stdout
    return {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HMMA", "LDSM", "LDGSTS")}


# Instruction counts of csrc/cuda/attention.cu today (nvcc 13.0, all template instances): WMMA
# 16x16x16 tiles (HMMA + LDSM from shared memory) with synchronous global loads (no LDGSTS).
# A kernel change may raise these; lowering any of them is a regression (e.g. a path that drops
# tensor cores or ldmatrix). An FA2-level kernel adds LDGSTS (cp.async double buffering).
SASS_FLOOR = {("attention.cu", "sm_80"): dict(HMMA=424, LDSM=212, LDGSTS=0),
              ("attention.cu", "sm_90a"): dict(HMMA=424, LDSM=212, LDGSTS=0)}


@pytest.mark.skipif(_cuobjdump() is None, reason="cuobjdump not found (CUDA toolkit or triton's bundled copy)")
@pytest.mark.parametrize("name, arch", list(SASS_FLOOR))
def test_attention_sass_uses_tensor_cores(builds, tmp_path_factory, name, arch):
    rc, log, cmd = builds[(name, arch)]
    assert rc == 0, log[-3000:]
    obj = Path(cmd.split(" -o ")[-1])
    counts = sass_counts(obj)
    floor = SASS_FLOOR[(name, arch)]
    low = {op: (counts[op], n) for op, n in floor.items() if counts[op] < n}
    assert not low, f"{name} {arch}: SASS instruction counts dropped below the recorded floor (got, floor): {low}"


def test_binding_syntax(builds):
    status, log = builds["binding"]
    if status.startswith("skip"):
        pytest.skip(status[6:])
    assert status == "ok", f"g++ -fsyntax-only of csrc/cuda_binding.cpp failed:\n{log[-6000:]}"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))
