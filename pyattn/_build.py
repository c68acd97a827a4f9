"""Just-in-time build of the C++ (CPU) and CUDA extensions against the installed torch.

Each op family is its own small extension (``csrc/cpu/<family>.cpp``), compiled on first use
with ninja into a per-user cache and registered as ``torch.ops.pyattn_cpu.*`` (no pybind
module). A missing compiler never breaks ``import pyattn``: the failure is recorded and the
backend reports itself unavailable with the reason.
"""
from __future__ import annotations

import hashlib
import os
import sys
import threading
from pathlib import Path
from typing import Dict, Optional

import torch

_lock = threading.Lock()
_loaded: Dict[str, Optional[str]] = {}  # extension key -> None (ok) or failure reason


def csrc_dir() -> Path:
    """Directory holding the C++/CUDA sources (source checkout or installed package data)."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "cpu").is_dir():
            return candidate
    raise FileNotFoundError("pyattn C++ sources not found next to the package")


def cpu_tier() -> str:
    """The vector ISA the CPU kernels are compiled for: what ATen itself dispatches to here."""
    forced = os.environ.get("PYATTN_CPU_ISA")
    if forced:
        return forced.upper()
    return torch.backends.cpu.get_cpu_capability().upper()


_TIER_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
}


def cpu_cflags(tier: str) -> list:
    # No -march=native: the flags name an ISA tier that torch itself detected, so a cache
    # directory shared between machines never holds code for the wrong CPU.
    return ["-O3", "-std=c++17", "-fopenmp", "-DNDEBUG"] + _TIER_FLAGS.get(tier, ["-DCPU_CAPABILITY=DEFAULT"])


def build_root() -> Path:
    root = os.environ.get("PYATTN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(base) / "pyattn" / tag


def _digest(paths) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()[:10]


def load_cpu_extension(family: str) -> Optional[str]:
    """Build (once) and load ``csrc/cpu/<family>.cpp``. Returns None on success, else the reason."""
    key = f"cpu:{family}"
    with _lock:
        if key in _loaded:
            return _loaded[key]
        reason = _load_cpu(family)
        _loaded[key] = reason
        return reason


def _load_cpu(family: str) -> Optional[str]:
    try:
        src = csrc_dir() / "cpu" / f"{family}.cpp"
        headers = sorted((csrc_dir() / "cpu").glob("*.h"))
        if not src.exists():
            return f"source {src} is missing"
        from torch.utils import cpp_extension

        tier = cpu_tier()
        name = f"pyattn_cpu_{family}_{tier.lower()}_{_digest([src, *headers])}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print(f"pyattn: compiling the {family} CPU kernels ({tier}) into {build_dir} "
                  "(first use only; takes about a minute)", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name, sources=[str(src)], extra_cflags=cpu_cflags(tier), extra_ldflags=["-fopenmp"],
            extra_include_paths=[str(csrc_dir())], build_directory=str(build_dir),
            is_python_module=False, verbose=os.environ.get("PYATTN_VERBOSE_BUILD") == "1",
        )
        return None
    except Exception as exc:  # compiler missing, ninja missing, compile error
        msg = str(exc).strip().splitlines()
        reason = f"C++ extension build failed: {msg[-1] if msg else type(exc).__name__}"
        import warnings

        warnings.warn(f"pyattn: {reason}; the '{family}' op falls back to other backends", RuntimeWarning)
        return reason


def load_cuda_extension() -> Optional[str]:
    """Build (once) the CUDA kernels and their torch binding. Returns None on success, else the reason."""
    key = "cuda"
    with _lock:
        if key in _loaded:
            return _loaded[key]
        _loaded[key] = _load_cuda()
        return _loaded[key]


def _load_cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch reports no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    try:
        from torch.utils import cpp_extension

        root = csrc_dir()
        sources = [root / "cuda_binding.cpp", *sorted((root / "cuda").glob("*.cu"))]
        missing = [str(s) for s in sources if not s.exists()]
        if missing:
            return f"CUDA sources missing: {missing}"
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
        name = f"pyattn_cuda_sm{arch}_{_digest(sources)}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"pyattn: loading/compiling the CUDA kernels for sm_{arch} in {build_dir}", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name, sources=[str(s) for s in sources],
            extra_cflags=["-O3", "-std=c++17"],
            extra_cuda_cflags=["-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}",
                               "--use_fast_math", "-lineinfo"],
            extra_include_paths=[str(root)], build_directory=str(build_dir), is_python_module=False,
            verbose=os.environ.get("PYATTN_VERBOSE_BUILD") == "1",
        )
        return None
    except Exception as exc:
        msg = str(exc).strip().splitlines()
        return f"CUDA extension build failed: {msg[-1] if msg else type(exc).__name__}"
