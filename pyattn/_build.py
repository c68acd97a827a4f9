"""Just-in-time build of the C++ (CPU) and CUDA extensions against the installed torch.

Each op family is its own small extension (``csrc/cpu/<family>.cpp``), compiled on first use
with ninja into a per-user cache and registered as ``torch.ops.pyattn_cpu.*`` (no pybind
module). A missing compiler never breaks ``import pyattn``: the failure is recorded and the
backend reports itself unavailable with the reason.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Dict, List, Optional

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


def openmp_flags() -> list:
    """-fopenmp only when ATen's own parallel backend is OpenMP (at::parallel_for is inline there)."""
    info = torch.__config__.parallel_info()
    return ["-fopenmp"] if "parallel backend: OpenMP" in info else []


def cpu_cflags(tier: str) -> list:
    """Compiler flags for the CPU kernels, derived from the installed torch.

    No ``-std=``: torch's extension builder adds the C++ standard its own headers need (C++17 up
    to torch 2.12, C++20 from torch 2.13 on; torch 2.14's headers refuse anything older), so a
    flag of ours could only disagree with it. No ``-march=native`` either: the ISA flags name a
    tier that torch itself detected, so a cache directory shared between machines never holds code
    for the wrong CPU.
    """
    return ["-O3", "-DNDEBUG"] + openmp_flags() + _TIER_FLAGS.get(tier, ["-DCPU_CAPABILITY=DEFAULT"]) \
        + extra_flags("PYATTN_EXTRA_CFLAGS")


def extra_flags(var: str) -> list:
    """Extra compiler / linker flags from the environment (``PYATTN_EXTRA_CFLAGS``,
    ``PYATTN_EXTRA_LDFLAGS``: whitespace-separated, e.g. ``-fsanitize=address,undefined`` for
    scripts/sanitize.sh). They are part of the build digest, so such a build has its own cache entry."""
    return os.environ.get(var, "").split()


def cpu_ldflags() -> list:
    return openmp_flags() + extra_flags("PYATTN_EXTRA_LDFLAGS")


def build_root() -> Path:
    root = os.environ.get("PYATTN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))
    tag = f"torch{torch.__version__.split('+')[0]}-py{sys.version_info.major}{sys.version_info.minor}"
    return Path(base) / "pyattn" / tag


def _digest(paths, flags=()) -> str:
    h = hashlib.sha1()
    for p in paths:
        h.update(Path(p).read_bytes())
    h.update(" ".join(flags).encode())
    return h.hexdigest()[:10]


_ERROR_LINE = re.compile(r"(\berror\b|\bError\b|No such file|not found|undefined reference)")
_warned_errors: set = set()


def first_error_lines(log: str, limit: int = 3) -> List[str]:
    """The first compiler/linker error lines of a build log (not ninja's closing summary)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    hits = [ln for ln in lines if _ERROR_LINE.search(ln) and not ln.startswith(("ninja: build stopped",
                                                                                  "Error building extension"))]
    if not hits:  # not a compiler error (e.g. ninja or the compiler itself missing): say what was said
        hits = [ln for ln in lines if not ln.startswith("ninja: build stopped")]
    return [ln if len(ln) <= 300 else ln[:297] + "..." for ln in hits[:limit]]


def _build_failed(what: str, exc: Exception, build_dir: Optional[Path], consequence: str) -> str:
    """Record a failed build: full log to ``build.log``, first error lines in the reason, one warning."""
    log = str(exc)
    log_path = None
    if build_dir is not None:
        try:
            log_path = build_dir / "build.log"
            log_path.write_text(log)
        except OSError:
            log_path = None
    errors = first_error_lines(log)
    reason = f"{what} build failed: " + " | ".join(errors or [type(exc).__name__])
    if log_path is not None:
        reason += f" (full log: {log_path}; PYATTN_VERBOSE_BUILD=1 shows the compiler output)"
    key = errors[0] if errors else reason
    if key not in _warned_errors:  # the same compiler error in every family warns once
        _warned_errors.add(key)
        warnings.warn(f"pyattn: {reason}; {consequence}", RuntimeWarning, stacklevel=3)
    return reason


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
    build_dir = None
    try:
        src = csrc_dir() / "cpu" / f"{family}.cpp"
        headers = sorted((csrc_dir() / "cpu").glob("*.h"))
        if not src.exists():
            return f"source {src} is missing"
        from torch.utils import cpp_extension

        tier = cpu_tier()
        cflags = cpu_cflags(tier)
        name = f"pyattn_cpu_{family}_{tier.lower()}_{_digest([src, *headers], cflags + extra_flags('PYATTN_EXTRA_LDFLAGS'))}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        if not any(build_dir.glob("*.so")):
            print(f"pyattn: compiling the {family} CPU kernels ({tier}) into {build_dir} "
                  "(first use only; takes about a minute)", file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name, sources=[str(src)], extra_cflags=cflags, extra_ldflags=cpu_ldflags(),
            extra_include_paths=[str(csrc_dir())], build_directory=str(build_dir),
            is_python_module=False, verbose=os.environ.get("PYATTN_VERBOSE_BUILD") == "1",
        )
        return None
    except Exception as exc:  # compiler missing, ninja missing, compile error
        return _build_failed(f"'{family}' C++ extension", exc, build_dir,
                             f"the '{family}' op runs on the other backends (pyattn.backend_status shows why)")


def load_cuda_extension() -> Optional[str]:
    """Build (once) the CUDA kernels and their torch binding. Returns None on success, else the reason."""
    key = "cuda"
    with _lock:
        if key in _loaded:
            return _loaded[key]
        _loaded[key] = _load_cuda()
        return _loaded[key]


def cuda_home() -> Optional[Path]:
    """The CUDA toolkit root: the directory whose include/ has cuda_runtime.h.

    ``CUDA_HOME``/``CUDA_PATH`` when they point at a toolkit, else found from ``nvcc`` on PATH with
    symlinks resolved (a wrapper script or a symlink farm often sits outside the toolkit, and the
    folder of such an ``nvcc`` has no CUDA headers), else /usr/local/cuda.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates += [str(real.parent.parent), str(Path(nvcc).parent.parent)]
    candidates.append("/usr/local/cuda")
    for c in candidates:
        if c and (Path(c) / "include" / "cuda_runtime.h").exists():
            return Path(c).resolve()
    return None


def cuda_flags(arch: str) -> list:
    """nvcc flags; the C++ standard comes from torch's extension builder (see :func:`cpu_cflags`)."""
    return ["-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "--use_fast_math", "-lineinfo"]


def _load_cuda() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch reports no CUDA device"
    if torch.version.cuda is None:
        return "this torch build has no CUDA support"
    build_dir = None
    try:
        home = cuda_home()
        if home is None:
            return "no CUDA toolkit found (set CUDA_HOME to the directory with include/cuda_runtime.h)"
        os.environ["CUDA_HOME"] = str(home)
        from torch.utils import cpp_extension

        cpp_extension.CUDA_HOME = str(home)  # read at import time by torch; keep it in step
        root = csrc_dir()
        sources = [root / "cuda_binding.cpp", *sorted((root / "cuda").glob("*.cu"))]
        missing = [str(s) for s in sources if not s.exists()]
        if missing:
            return f"CUDA sources missing: {missing}"
        major, minor = torch.cuda.get_device_capability()
        arch = f"{major}{minor}" + ("a" if major == 9 else "")
        flags = cuda_flags(arch)
        headers = sorted((root / "cuda").glob("*.cuh"))  # part of the digest: a header edit rebuilds
        name = f"pyattn_cuda_sm{arch}_{_digest([*sources, *headers], flags)}"
        build_dir = build_root() / name
        build_dir.mkdir(parents=True, exist_ok=True)
        print(f"pyattn: loading/compiling the CUDA kernels for sm_{arch} in {build_dir} (CUDA_HOME={home})",
              file=sys.stderr, flush=True)
        cpp_extension.load(
            name=name, sources=[str(s) for s in sources],
            extra_cflags=["-O3"], extra_cuda_cflags=flags,
            extra_include_paths=[str(root)], build_directory=str(build_dir), is_python_module=False,
            verbose=os.environ.get("PYATTN_VERBOSE_BUILD") == "1",
        )
        return None
    except Exception as exc:
        return _build_failed("CUDA extension", exc, build_dir, "the cuda backend is unavailable")
