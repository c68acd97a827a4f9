"""Timing primitives for the benchmark suite.

CPU: ``torch.utils.benchmark.Timer`` (blocked_autorange for fast calls, single-call blocks for
slow ones), GPU: ``triton.testing.do_bench``. Each measurement keeps its spread (interquartile
range) so that a row too noisy to trust can be flagged. Also the physical limits drawn on the
plots, measured in the same run: copy bandwidth and GEMM throughput per dtype.
"""
from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, List

import torch

from .cases import MIN_REPS

NOISY_SPREAD = 0.10  # iqr / median above this: the row is flagged as noisy


@dataclass
class Timing:
    median_ms: float
    q1_ms: float
    q3_ms: float
    reps: int  # timed repetitions (calls) behind the quantiles

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    @property
    def spread(self) -> float:
        """Interquartile range relative to the median."""
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("nan")

    @property
    def noisy(self) -> bool:
        return not (self.spread <= NOISY_SPREAD)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantiles(times_ms: List[float], reps: int) -> Timing:
    if len(times_ms) == 1:
        return Timing(times_ms[0], times_ms[0], times_ms[0], reps)
    q1, med, q3 = statistics.quantiles(times_ms, n=4, method="inclusive")
    return Timing(med, q1, q3, reps)


def measure(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5,
            first_call_s: float = 0.0, max_reps: int = 50) -> Timing:
    """Time ``fn()`` (already warmed up; ``first_call_s`` is how long the warm-up call took)."""
    if device.type == "cuda":
        return _measure_cuda(fn, device, budget_s)
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if first_call_s * 20 < budget_s:  # fast call: let torch pick the block size
        m = timer.blocked_autorange(min_run_time=budget_s)
        times = [t * 1e3 for t in m.times]
        if len(times) < MIN_REPS:
            times += [timer.timeit(m.number_per_run).mean * 1e3 for _ in range(MIN_REPS - len(times))]
        return _quantiles(times, len(times) * m.number_per_run)
    reps = min(max_reps, max(MIN_REPS, math.ceil(budget_s / max(first_call_s, 1e-9))))
    times = [timer.timeit(1).mean * 1e3 for _ in range(reps)]
    return _quantiles(times, reps)


def _measure_cuda(fn, device, budget_s) -> Timing:
    try:
        from triton.testing import do_bench

        q1, med, q3 = do_bench(fn, warmup=max(5, int(budget_s * 100)), rep=int(budget_s * 1000),
                               quantiles=[0.25, 0.5, 0.75])
        return Timing(med, q1, q3, reps=-1)  # do_bench picks the count itself
    except ImportError:
        pass
    times = []
    start_all = time.perf_counter()
    while len(times) < MIN_REPS or (time.perf_counter() - start_all < budget_s and len(times) < 1000):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        fn()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    return _quantiles(times, len(times))


def median_ms(fn: Callable[[], object], device: torch.device, *, budget_s: float = 0.5, **_ignored) -> float:
    """Median milliseconds of ``fn()`` after one warm-up call."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return measure(fn, device, budget_s=budget_s, first_call_s=time.perf_counter() - t0).median_ms


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Measured device-memory bandwidth of a large tensor copy (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, budget_s=0.5)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 0) -> float:
    """Measured throughput of a square matmul in ``dtype``: the compute roof drawn on the plots."""
    n = n or (2048 if device.type == "cpu" else 8192)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = median_ms(lambda: a @ b, device, budget_s=0.5)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


# --- peak memory --------------------------------------------------------------------------

def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes allocated above the starting point while ``fn`` runs.

    GPU: torch.cuda.max_memory_allocated. CPU: the peak resident set size, reset through
    /proc/self/clear_refs (large tensors are mmap'd, so RSS follows them); elsewhere the
    PyTorch profiler's allocation events.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        fn()
        return max(0, _proc_status_kb("VmHWM") - base) * 1024
    except OSError:
        pass
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")
