"""Timing primitives for the benchmark suite: median wall time with warm-up, copy bandwidth."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, min_runs: int = 5,
              max_runs: int = 100, budget_s: float = 1.0) -> float:
    """Median milliseconds of ``fn()`` over repeated runs (at least ``min_runs``, within ``budget_s``)."""
    t0 = time.perf_counter()
    fn()
    _sync(device)
    if time.perf_counter() - t0 > budget_s / 2:  # slow implementation: fewer repetitions
        warmup, min_runs = 0, min(min_runs, 3)
    for _ in range(max(0, warmup - 1)):
        fn()
    _sync(device)
    times = []
    start_all = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start_all < budget_s):
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int = 256 * 2**20) -> float:
    """Measured device-memory bandwidth of a large tensor copy (bytes read + written per second)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, warmup=2, min_runs=5, budget_s=1.0)
    return 2 * nbytes / (ms * 1e-3) / 1e9
