"""Tile path and block sizes of the cpu attention kernels, chosen by measurement on the machine.

The C++ forward has several ways to multiply its tiles (csrc/cpu/attn_tiles.h): BLAS ``sgemm``
(the BLAS inside libtorch_cpu: MKL or OpenBLAS), oneDNN ``brgemm`` on fp32 tiles and, on CPUs
with AVX512-BF16, ``brgemm`` on bf16 tiles. Which is fastest depends on the CPU and its BLAS (MKL's
sgemm is far stronger on Intel than on AMD), so at the first cpu attention call of a (dtype,
head-dim class) a short measurement (well under a second per class) times each available path and
a few block sizes on a (1, H, 1024, D) forward, keeps the fastest, prints it once and caches it
in ``cpu_attention_tuning.json`` next to the compiled extensions. The cache key holds the CPU
model, the vector ISA, the dtype, the head-dim class, the thread count and the torch version, so
a different CPU or torch measures again.

Environment:
  ``PYATTN_CPU_ATTN_PATH``     ``sgemm``, ``brgemm_f32``, ``brgemm_bf16`` (bf16 inputs only) or
                               ``auto`` (default): force a tile path; one the CPU lacks is an error.
  ``PYATTN_CPU_ATTN_BLOCK_Q``  forward query block rows (dense calls), overrides the measured one.
  ``PYATTN_CPU_ATTN_BLOCK_K``  forward key block columns.
  ``PYATTN_CPU_AUTOTUNE=0``    no measurement: the built-in default path and blocks.
  ``PYATTN_CPU_TUNING_CACHE``  the cache file (default: in the extension build cache).
"""
from __future__ import annotations

import json
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Dict, Optional, Tuple

import torch

PATHS = ("sgemm", "brgemm_f32", "brgemm_bf16")  # index = the C++ TileKind
DEFAULT_BLOCKS = (256, 512)
BLOCK_CANDIDATES = ((256, 512), (128, 512), (128, 256), (64, 256))
CACHE_VERSION = 2
SWITCH_MARGIN = 0.1  # a candidate replaces the built-in default only when at least 10% faster
_TUNE_N = 1024

_lock = threading.Lock()
_applied: Dict[Tuple[torch.dtype, int], dict] = {}  # (dtype, head-dim class) -> the entry in use


def head_dim_class(D: int) -> int:
    """0: D <= 64, 1: larger (the C++ tile policy table has one slot per class)."""
    return 0 if D <= 64 else 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list:
    """The CPU features that matter to the tile paths."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
              "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in have]
    except OSError:
        pass
    return []


def _ops():
    from .._build import load_cpu_extension
    reason = load_cpu_extension("attention")
    if reason is not None:
        raise RuntimeError(f"pyattn: the cpu attention kernels are unavailable: {reason}")
    return torch.ops.pyattn_cpu


def available_paths() -> list:
    """Tile paths this CPU and build can run (oneDNN switched off leaves sgemm only)."""
    mask = int(_ops().attention_tile_paths())
    return [name for i, name in enumerate(PATHS) if mask >> i & 1]


def blas_vendor() -> str:
    return str(_ops().cpu_blas_vendor())


def cache_path() -> Path:
    """``cpu_attention_tuning.json`` in the build cache (``PYATTN_CPU_TUNING_CACHE`` names another file)."""
    explicit = os.environ.get("PYATTN_CPU_TUNING_CACHE")
    if explicit:
        return Path(explicit)
    from .._build import build_root
    return build_root() / "cpu_attention_tuning.json"


def cache_key(dtype: torch.dtype, dclass: int) -> str:
    from .._build import cpu_tier
    return "|".join([cpu_model(), cpu_tier(), str(dtype).replace("torch.", ""), f"D{'<=64' if dclass == 0 else '>64'}",
                     f"threads{torch.get_num_threads()}", f"torch{torch.__version__}", f"v{CACHE_VERSION}"])


def _read_cache() -> dict:
    try:
        return json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, entry: dict) -> None:
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = _read_cache()
        data[key] = entry
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache only costs a new measurement next time


def _forced_path() -> Optional[str]:
    forced = os.environ.get("PYATTN_CPU_ATTN_PATH", "auto").strip().lower()
    if forced in ("", "auto"):
        return None
    if forced not in PATHS:
        raise ValueError(f"PYATTN_CPU_ATTN_PATH must be one of {', '.join(PATHS)} or auto, got {forced!r}")
    avail = available_paths()
    if forced not in avail:
        raise ValueError(f"PYATTN_CPU_ATTN_PATH={forced}: this CPU / build cannot run that tile path "
                         f"(available here: {', '.join(avail)}; brgemm needs AVX-512 and oneDNN, brgemm_bf16 "
                         "also AVX512-BF16)")
    return forced


def _env_block(name: str) -> Optional[int]:
    val = os.environ.get(name)
    if val is None or val == "":
        return None
    try:
        n = int(val)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{name} must be a positive int, got {val!r}")
    return n


def _set(dtype: torch.dtype, D: int, path: Optional[str], bq: int, bk: int) -> None:
    _ops().attention_set_tile_policy(dtype, D, -1 if path is None else PATHS.index(path), bq, bk)


def _run_forward(dtype: torch.dtype, D: int, path: str, blocks: Tuple[int, int], inputs) -> float:
    q, k, v = inputs
    _set(dtype, D, path, *blocks)
    t0 = time.perf_counter()
    _ops().attention_fwd(q, k, v, None, None, None, None, None, _TUNE_N, _TUNE_N, D ** -0.5, -1, -1, True, 0.0, 0, 0)
    return time.perf_counter() - t0


def _best_of(dtype: torch.dtype, D: int, cands, inputs, rounds: int = 4) -> dict:
    """Minimum time of each candidate (path, blocks), measured round-robin so that load from other
    processes hits all candidates alike; one warm-up each (packing buffers, oneDNN kernel generation)."""
    for path, blocks in cands:
        _run_forward(dtype, D, path, blocks, inputs)
    best = {c: float("inf") for c in cands}
    for _ in range(rounds):
        for c in cands:
            best[c] = min(best[c], _run_forward(dtype, D, c[0], c[1], inputs))
    return best


def _default_path(dtype: torch.dtype, paths) -> str:
    """The C++ built-in choice (csrc/cpu/attn_tiles.h default_tile_kind)."""
    if dtype == torch.bfloat16 and "brgemm_bf16" in paths:
        return "brgemm_bf16"
    return "brgemm_f32" if "brgemm_f32" in paths else "sgemm"


def measure(dtype: torch.dtype, D: int) -> dict:
    """Time every available tile path (default blocks), then block sizes of the fastest one."""
    H = max(4, 2 * torch.get_num_threads())
    D = 64 if head_dim_class(D) == 0 else 128
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, H, _TUNE_N, D, generator=g).to(dtype) for _ in range(3)]
    paths = [p for p in available_paths() if p != "brgemm_bf16" or dtype == torch.bfloat16]
    timings = _best_of(dtype, D, [(p, DEFAULT_BLOCKS) for p in paths], inputs)
    best_path = min(timings, key=timings.get)[0]
    # second pass: the blocks of the fastest path next to the other paths, all measured in the same
    # round-robin (load from other processes changes between passes, so passes are not compared)
    timings = _best_of(dtype, D, [(best_path, b) for b in BLOCK_CANDIDATES]
                       + [(p, DEFAULT_BLOCKS) for p in paths if p != best_path], inputs)
    path, blocks = min(timings, key=timings.get)
    # the built-in default stays unless another candidate is clearly faster: with the cores shared
    # with other processes, a few percent is noise
    default = (_default_path(dtype, paths), DEFAULT_BLOCKS)
    if default in timings and timings[(path, blocks)] > (1.0 - SWITCH_MARGIN) * timings[default]:
        path, blocks = default
    _set(dtype, D, None, 0, 0)
    return {"path": path, "block_q": blocks[0], "block_k": blocks[1],
            "timings_ms": {f"{p} {b[0]}x{b[1]}": round(t * 1e3, 3) for (p, b), t in timings.items()},
            "shape": [1, H, _TUNE_N, D], "measured": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def ensure(dtype: torch.dtype, D: int) -> dict:
    """The tile policy of (dtype, head-dim class), measured or read from the cache at first use."""
    slot = (dtype, head_dim_class(D))
    entry = _applied.get(slot)
    if entry is not None:
        return entry
    with _lock:
        entry = _applied.get(slot)
        if entry is None:
            entry = _choose(dtype, D)
            _applied[slot] = entry
    return entry


def _choose(dtype: torch.dtype, D: int) -> dict:
    forced = _forced_path()
    if forced == "brgemm_bf16" and dtype != torch.bfloat16:
        forced = None  # bf16 tiles are for bf16 inputs; others keep their own choice
    bq, bk = _env_block("PYATTN_CPU_ATTN_BLOCK_Q"), _env_block("PYATTN_CPU_ATTN_BLOCK_K")
    dclass = head_dim_class(D)
    key = cache_key(dtype, dclass)
    if os.environ.get("PYATTN_CPU_AUTOTUNE", "1") == "0":
        entry = {"path": None, "block_q": 0, "block_k": 0, "source": "default (PYATTN_CPU_AUTOTUNE=0)"}
    else:
        cached = _read_cache().get(key)
        if cached is not None and cached.get("path") in available_paths():
            entry = dict(cached, source=f"cache {cache_path()}")
        else:
            t0 = time.perf_counter()
            entry = measure(dtype, D)
            entry["tune_seconds"] = round(time.perf_counter() - t0, 2)
            _write_cache(key, entry)
            entry = dict(entry, source="measured")
            print(f"pyattn: cpu attention tiles for {str(dtype).replace('torch.', '')}, head dim "
                  f"{'<= 64' if dclass == 0 else '> 64'}: {entry['path']} {entry['block_q']}x{entry['block_k']} "
                  f"(measured in {entry['tune_seconds']} s: "
                  + ", ".join(f"{k} {v} ms" for k, v in entry["timings_ms"].items())
                  + f"; cached in {cache_path()})", file=sys.stderr, flush=True)
    if forced is not None:
        entry = dict(entry, path=forced, source=entry["source"] + ", path from PYATTN_CPU_ATTN_PATH")
    if bq is not None or bk is not None:
        entry = dict(entry, block_q=bq or entry["block_q"], block_k=bk or entry["block_k"],
                     source=entry["source"] + ", blocks from PYATTN_CPU_ATTN_BLOCK_Q/K")
    entry["key"] = key
    _set(dtype, D, entry["path"], int(entry["block_q"] or 0), int(entry["block_k"] or 0))
    return entry


def reset() -> None:
    """Forget the policies in use (the next call reads the environment and the cache again)."""
    with _lock:
        for dtype, dclass in list(_applied):
            _set(dtype, 64 if dclass == 0 else 128, None, 0, 0)
        _applied.clear()


def info() -> dict:
    """What the cpu attention kernels run on and the tile policies chosen so far (pyattn.cpu_tuning())."""
    from .._build import cpu_tier, load_cpu_extension
    out = {"cpu": cpu_model(), "isa": cpu_tier(), "flags": cpu_flags(), "threads": torch.get_num_threads(),
           "cache": str(cache_path()), "choices": {}}
    reason = load_cpu_extension("attention")
    if reason is not None:
        out["unavailable"] = reason
        return out
    out["blas"] = blas_vendor()
    out["tile_paths"] = available_paths()
    for (dtype, dclass), entry in sorted(_applied.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        out["choices"][f"{str(dtype).replace('torch.', '')} D{'<=64' if dclass == 0 else '>64'}"] = {
            k: entry.get(k) for k in ("path", "block_q", "block_k", "source", "timings_ms")}
    return out
