"""What a benchmark run ran on: device, CPU model and ISA flags, BLAS, library versions, date, load."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
from typing import Dict, List

import torch

ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16", "amx_tile", "amx_int8")


def _cpuinfo() -> Dict[str, str]:
    info: Dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if ":" not in line:
                    if info:
                        break  # first processor block is enough
                    continue
                k, v = (s.strip() for s in line.split(":", 1))
                info.setdefault(k, v)
    except OSError:
        pass
    return info


def cpu_model() -> str:
    info = _cpuinfo()
    return info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"


def isa_flags() -> List[str]:
    """The ISA extensions among ISA_FLAGS that the CPU reports (Linux /proc/cpuinfo flags)."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in ISA_FLAGS if f in flags]


def blas_info() -> str:
    """BLAS / LAPACK / oneDNN lines of ``torch.__config__.show()``, condensed."""
    try:
        show = torch.__config__.show()
    except Exception:
        return "unknown"
    parts = []
    m = re.search(r"BLAS_INFO=([^,\s]+)", show)
    if m:
        parts.append(f"BLAS={m.group(1)}")
    m = re.search(r"LAPACK_INFO=([^,\s]+)", show)
    if m:
        parts.append(f"LAPACK={m.group(1)}")
    for line in show.splitlines():
        line = line.strip()
        if "Math Kernel Library" in line or "oneMKL" in line:
            parts.append(line[2:].split("-Product")[0].replace("Intel(R) oneAPI Math Kernel Library", "oneMKL"))
        elif "MKL-DNN" in line or "oneDNN" in line:
            parts.append(line[2:].split(" (Git")[0].replace("Intel(R) MKL-DNN", "oneDNN"))
    return "; ".join(parts) or "unknown"


def cpu_attention_tiles() -> str:
    """The cpu attention tile paths chosen in this process (measured at first use; pyattn.cpu_tuning())."""
    try:
        import pyattn
        info = pyattn.cpu_tuning()
    except Exception as exc:  # extension missing: say so instead of failing the report
        return f"unavailable ({type(exc).__name__})"
    if "unavailable" in info:
        return "unavailable"
    parts = []
    for cls, c in info["choices"].items():
        how = (c.get("source") or "").split(" /")[0].split(" (")[0]
        if c["path"]:
            parts.append(f"{cls}: {c['path']} {c['block_q'] or 'default'}x{c['block_k'] or 'default'} ({how})")
        else:
            parts.append(f"{cls}: built-in default ({c.get('source')})")
    return "; ".join(parts) or "none used"


def device_summary(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    flags = isa_flags()
    isa = ", ".join(flags) if flags else torch.backends.cpu.get_cpu_capability()
    return f"{cpu_model()}, {os.cpu_count()} cores ({isa})"


def environment(device: torch.device) -> Dict[str, object]:
    env: Dict[str, object] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_summary(device),
        "device_type": device.type,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "isa_flags": isa_flags(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "blas": blas_info(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    for mod in ("triton", "transformers", "pyattn"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        env["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    return env
