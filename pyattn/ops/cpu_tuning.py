"""Tile paths and block sizes of the cpu attention kernels, chosen by measurement on the machine.

The C++ forward and backward have several ways to multiply their tiles (csrc/cpu/attn_tiles.h):
BLAS ``sgemm`` (the BLAS inside libtorch_cpu: MKL or OpenBLAS), oneDNN ``brgemm`` on fp32 tiles
and, on CPUs with AVX512-BF16, ``brgemm`` on bf16 tiles. Which is fastest depends on the CPU and
its BLAS (MKL's sgemm is far stronger on Intel than on AMD), so at the first cpu attention call of
a (dtype, head-dim class) a short measurement (about a second per class, at most a few) times each
available path and a few forward block sizes on a (1, H, 1024, D) forward, and each path on a
(1, H, 512, D) backward. Every
comparison runs the candidates interleaved over several rounds and takes the median of the per-round
time ratios to the built-in default, which stays unless another is at least 10% faster.

Timings taken while other processes load the cores mislead, so the measurement records the load
(runnable threads of other processes per core, from the load average) and the spread of repeated
timings (a machine already busy is not timed at all). A quiet measurement is cached as final in
``cpu_attention_tuning.json`` next to the compiled extensions; a noisy one runs the built-in default
and is cached as provisional, so that the next process measures again (at most MAX_ATTEMPTS times;
then the default is final). The cache key holds
the CPU model, the vector ISA, the dtype, the head-dim class, the thread count and the torch
version, so a different CPU or torch measures again. ``pyattn.cpu_tuning()`` reports the choices
with the load and spread they were measured under.

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
CACHE_VERSION = 3
SWITCH_MARGIN = 0.1  # a candidate replaces the built-in default only when at least 10% faster
ROUNDS = 5  # interleaved timing rounds per comparison
# A measurement is trusted (cached as final) only on a quiet machine: at most LOAD_LIMIT runnable
# threads of other processes per core, and repeated timings of one candidate within SPREAD_LIMIT
# of each other (relative range). Otherwise the built-in default is used and the entry is cached
# as provisional: the next process measures again, at most MAX_ATTEMPTS times in all.
LOAD_LIMIT = 0.25
SPREAD_LIMIT = 0.2
MAX_ATTEMPTS = 3
_TUNE_N = 1024  # forward timing shape (1, H, 1024, D)
_TUNE_N_BWD = 512  # backward timing shape (1, H, 512, D): a quarter of the work of N = 1024
TUNE_BUDGET_S = 2.0  # rounds beyond MIN_ROUNDS stop once a measurement has taken this long
MIN_ROUNDS = 3

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


def _set(dtype: torch.dtype, D: int, path: Optional[str], bq: int, bk: int, bwd_path: Optional[str] = None) -> None:
    _ops().attention_set_tile_policy(dtype, D, -1 if path is None else PATHS.index(path), bq, bk,
                                     -1 if bwd_path is None else PATHS.index(bwd_path))


def _run_forward(dtype: torch.dtype, D: int, path: str, blocks: Tuple[int, int], inputs) -> float:
    q, k, v = inputs[:3]
    _set(dtype, D, path, *blocks)
    t0 = time.perf_counter()
    _ops().attention_fwd(q, k, v, None, None, None, None, None, _TUNE_N, _TUNE_N, D ** -0.5, -1, -1, True, 0.0, 0, 0)
    return time.perf_counter() - t0


def _run_backward(dtype: torch.dtype, D: int, path: str, blocks: Tuple[int, int], inputs) -> float:
    """One backward on the tile path `path` (blocks unused: the backward block sizes are fixed)."""
    q, k, v, dout, out, lse = inputs
    _set(dtype, D, None, 0, 0, path)
    t0 = time.perf_counter()
    _ops().attention_bwd(dout, q, k, v, out, lse, None, None, None, None, None, _TUNE_N_BWD, _TUNE_N_BWD, D ** -0.5,
                         -1, -1,
                         True, 0.0, 0, 0, False)
    return time.perf_counter() - t0


def _backward_inputs(dtype: torch.dtype, D: int, inputs) -> tuple:
    """(q, k, v, dout, out, lse) of the backward timings: one forward on the default path."""
    q, k, v, dout = (t[:, :, :_TUNE_N_BWD].contiguous() for t in inputs)
    _set(dtype, D, None, 0, 0)
    out, lse = _ops().attention_fwd(q, k, v, None, None, None, None, None, _TUNE_N_BWD, _TUNE_N_BWD, D ** -0.5, -1, -1,
                                    True, 0.0, 0, 0)
    return q, k, v, dout, out, lse


def _own_cpu_rate() -> float:
    """CPU seconds per second this process used over its life: its own share of the load average
    (a training process that computed before its first attention call is not "other load")."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        start = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22, starttime
        age = float(Path("/proc/uptime").read_text().split()[0]) - start
    except (OSError, ValueError, IndexError, AttributeError):
        return 1.0
    return time.process_time() / age if age > 1.0 else 1.0


def _machine_load() -> float:
    """Runnable threads of other processes per core: the 1-minute load average less this process's
    own share (at least its running thread); 0 where the platform has no load average."""
    try:
        load1 = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0
    ncpu = max(1, os.cpu_count() or 1)
    own = min(max(1.0, _own_cpu_rate()), float(ncpu))
    return max(0.0, load1 - own) / ncpu


def _median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def _rounds(run, dtype: torch.dtype, D: int, cands, inputs, deadline: float) -> Dict[tuple, list]:
    """Times of every candidate (path, blocks) over `rounds` rounds, interleaved: in each round
    every candidate runs once (order rotated per round), so load from other processes that comes
    and goes hits the candidates of one round alike. One warm-up each (packing buffers, oneDNN
    kernel generation). Past `deadline` (perf_counter) only MIN_ROUNDS rounds run."""
    for c in cands:
        run(dtype, D, c[0], c[1], inputs)
    times: Dict[tuple, list] = {c: [] for c in cands}
    for r in range(ROUNDS):
        if r >= MIN_ROUNDS and time.perf_counter() > deadline:
            break
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for c in order:
            times[c].append(run(dtype, D, c[0], c[1], inputs))
    return times


def _compare(times: Dict[tuple, list], ref) -> Tuple[Dict[tuple, float], float]:
    """(median over rounds of time / time of `ref` in the same round, per candidate; the spread:
    the median over candidates of the relative range (max - min) / median of their repeated times)."""
    ratios = {c: _median([t / r for t, r in zip(ts, times[ref])]) for c, ts in times.items()}
    spread = _median([(max(ts) - min(ts)) / _median(ts) for ts in times.values()])
    return ratios, spread


def _pick(ratios: Dict[tuple, float], default) -> tuple:
    """The built-in default stays unless a candidate is clearly faster (median ratio <= 1 - margin)."""
    best = min(ratios, key=ratios.get)
    return best if ratios[best] <= 1.0 - SWITCH_MARGIN else default


def _default_path(dtype: torch.dtype, paths) -> str:
    """The C++ built-in choice (csrc/cpu/attn_tiles.h default_tile_kind), forward and backward."""
    if dtype == torch.bfloat16 and "brgemm_bf16" in paths:
        return "brgemm_bf16"
    return "brgemm_f32" if "brgemm_f32" in paths else "sgemm"


def _fmt(times: Dict[tuple, list], blocks: bool = True) -> Dict[str, float]:
    return {(f"{p} {b[0]}x{b[1]}" if blocks else p): round(min(ts) * 1e3, 3) for (p, b), ts in times.items()}


def measure(dtype: torch.dtype, D: int) -> dict:
    """Time every available tile path on a (1, H, 1024, D) forward (default blocks), then the block
    sizes of the fastest one, then every path on the backward. Each comparison is the median over
    interleaved rounds of the time ratio to the built-in default. The entry records the load of the
    machine and the spread of the timings; `trusted` is False when either is too high to trust. On
    a machine already busy nothing is timed (the result could not be trusted anyway)."""
    H = max(4, 2 * torch.get_num_threads())
    D = 64 if head_dim_class(D) == 0 else 128
    deadline = time.perf_counter() + TUNE_BUDGET_S
    paths = [p for p in available_paths() if p != "brgemm_bf16" or dtype == torch.bfloat16]
    default = (_default_path(dtype, paths), DEFAULT_BLOCKS)
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    load_before = round(_machine_load(), 3)

    def stopped(why: str, spread, timings) -> dict:  # the default, untrusted: the rest is not timed
        return {"path": default[0], "block_q": default[1][0], "block_k": default[1][1], "bwd_path": default[0],
                "timings_ms": timings, "bwd_timings_ms": {}, "load_per_core": load_before, "spread": spread,
                "trusted": False, "skipped": why, "default": default[0], "measured": stamp}

    if load_before > LOAD_LIMIT:
        return stopped("machine busy", None, {})
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, H, _TUNE_N, D, generator=g).to(dtype) for _ in range(4)]
    cands = [(p, DEFAULT_BLOCKS) for p in paths]
    ftimes = _rounds(_run_forward, dtype, D, cands, inputs, deadline)
    ratios1, spread1 = _compare(ftimes, default)
    if spread1 > SPREAD_LIMIT:  # noisy already: the remaining passes would cost time for nothing
        return stopped("timings spread in the first pass", round(spread1, 3), _fmt(ftimes))
    best_path = min(ratios1, key=ratios1.get)[0]
    # second pass: the blocks of the fastest path, next to the default (ratios are only compared
    # within a pass: the load of other processes changes between passes)
    cands = [(best_path, b) for b in BLOCK_CANDIDATES]
    if default not in cands:
        cands.append(default)
    ftimes = _rounds(_run_forward, dtype, D, cands, inputs, deadline)
    ratios2, spread2 = _compare(ftimes, default)
    path, blocks = _pick(ratios2, default)
    # backward: every path, on the forward's own output
    binputs = _backward_inputs(dtype, D, inputs)
    bdefault = (default[0], (0, 0))
    btimes = _rounds(_run_backward, dtype, D, [(p, (0, 0)) for p in paths], binputs, deadline)
    bratios, spread3 = _compare(btimes, bdefault)
    bwd_path = _pick(bratios, bdefault)[0]
    _set(dtype, D, None, 0, 0)
    load = round(max(load_before, _machine_load()), 3)
    spread = round(max(spread1, spread2, spread3), 3)
    return {"path": path, "block_q": blocks[0], "block_k": blocks[1], "bwd_path": bwd_path,
            "timings_ms": _fmt(ftimes), "bwd_timings_ms": _fmt(btimes, blocks=False),
            "ratios": {f"{p} {b[0]}x{b[1]}": round(r, 3) for (p, b), r in ratios2.items()},
            "bwd_ratios": {p: round(r, 3) for (p, _), r in bratios.items()},
            "load_per_core": load, "spread": spread, "trusted": load <= LOAD_LIMIT and spread <= SPREAD_LIMIT,
            "default": default[0], "shape": [1, H, _TUNE_N, D], "measured": stamp}


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


def _tune(dtype: torch.dtype, D: int, key: str, attempts: int) -> dict:
    """Measure; cache the result as final when trusted, else the built-in default as provisional
    (measured again by the next process) until MAX_ATTEMPTS measurements were all untrusted."""
    t0 = time.perf_counter()
    entry = measure(dtype, D)
    entry["tune_seconds"] = round(time.perf_counter() - t0, 2)
    entry["attempts"] = attempts
    note = ""
    if not entry["trusted"]:
        # the measured winner may be an artefact of the load: run the default, keep the timings
        entry.update(measured_path=entry["path"], measured_blocks=[entry["block_q"], entry["block_k"]],
                     measured_bwd_path=entry["bwd_path"], path=entry["default"], bwd_path=entry["default"],
                     block_q=DEFAULT_BLOCKS[0], block_k=DEFAULT_BLOCKS[1])
        entry["provisional"] = attempts < MAX_ATTEMPTS
        note = (f"; untrusted (load {entry['load_per_core']}/core, spread {entry['spread']}): built-in default "
                + ("kept, measured again next time" if entry["provisional"] else f"kept after {attempts} attempts"))
    else:
        entry["provisional"] = False
    _write_cache(key, entry)
    print(f"pyattn: cpu attention tiles for {str(dtype).replace('torch.', '')}, head dim "
          f"{'<= 64' if head_dim_class(D) == 0 else '> 64'}: forward {entry['path']} {entry['block_q']}x"
          f"{entry['block_k']}, backward {entry['bwd_path']} (measured in {entry['tune_seconds']} s: "
          + (", ".join(f"{k} {v} ms" for k, v in entry["timings_ms"].items()) or "nothing timed")
          + ("; backward " + ", ".join(f"{k} {v} ms" for k, v in entry["bwd_timings_ms"].items())
             if entry["bwd_timings_ms"] else "")
          + (f", {entry['skipped']}" if entry.get("skipped") else "")
          + f"{note}; cached in {cache_path()})", file=sys.stderr, flush=True)
    return dict(entry, source="measured (provisional)" if entry["provisional"] else "measured")


def _choose(dtype: torch.dtype, D: int) -> dict:
    forced = _forced_path()
    if forced == "brgemm_bf16" and dtype != torch.bfloat16:
        forced = None  # bf16 tiles are for bf16 inputs; others keep their own choice
    bq, bk = _env_block("PYATTN_CPU_ATTN_BLOCK_Q"), _env_block("PYATTN_CPU_ATTN_BLOCK_K")
    dclass = head_dim_class(D)
    key = cache_key(dtype, dclass)
    if os.environ.get("PYATTN_CPU_AUTOTUNE", "1") == "0":
        entry = {"path": None, "bwd_path": None, "block_q": 0, "block_k": 0,
                 "source": "default (PYATTN_CPU_AUTOTUNE=0)"}
    else:
        cached = _read_cache().get(key)
        avail = available_paths()
        usable = (cached is not None and cached.get("path") in avail and cached.get("bwd_path") in avail)
        if usable and not cached.get("provisional"):
            entry = dict(cached, source=f"cache {cache_path()}")
        else:
            attempts = int(cached.get("attempts", 0)) + 1 if usable else 1
            entry = _tune(dtype, D, key, attempts)
    if forced is not None:
        entry = dict(entry, path=forced, bwd_path=forced, source=entry["source"] + ", path from PYATTN_CPU_ATTN_PATH")
    if bq is not None or bk is not None:
        entry = dict(entry, block_q=bq or entry["block_q"], block_k=bk or entry["block_k"],
                     source=entry["source"] + ", blocks from PYATTN_CPU_ATTN_BLOCK_Q/K")
    entry["key"] = key
    _set(dtype, D, entry["path"], int(entry["block_q"] or 0), int(entry["block_k"] or 0), entry.get("bwd_path"))
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
            k: entry.get(k) for k in ("path", "block_q", "block_k", "bwd_path", "source", "timings_ms",
                                      "bwd_timings_ms", "load_per_core", "spread", "trusted", "provisional",
                                      "attempts", "skipped", "measured")}
    return out
