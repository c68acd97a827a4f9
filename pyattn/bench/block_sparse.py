"""Block-sparse attention benchmark rows: time and peak memory against layout density.

Each row is one BigBird-style layout (sliding window + global + seeded random blocks, block 64)
at a measured density, forward and forward+backward, against dense SDPA on the same inputs, SDPA
with the equivalent dense boolean mask, and compiled FlexAttention with the equivalent BlockMask
(forward only on CPU: FlexAttention has no CPU backward). "build" rows time building the schedule
(pyattn.layouts.bigbird vs FlexAttention's create_block_mask of the same pattern).

Besides the suite's table, ``--ops block_sparse`` writes the layout PNG and a time-vs-density
plot (fwd and fwd+bwd) into ``$PYATTN_BENCH_PLOTS`` (default ``bench_results/block_sparse``)
when the process exits.
"""
from __future__ import annotations

import atexit
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .attention import fwd_bwd_runs
from .cases import Case, suite
from .timing import peak_memory_bytes as _peak_bytes

BLOCK = 64
_timings: Dict[tuple, List[float]] = {}  # (N, mode, impl) -> [(density, seconds per call)]
_densities: Dict[tuple, float] = {}


def _plot_dir() -> Path:
    return Path(os.environ.get("PYATTN_BENCH_PLOTS", "bench_results/block_sparse"))


def _recorded(key, fn: Callable) -> Callable:
    """fn, recording each call's wall time under ``key`` for the density plot."""
    def run():
        t0 = time.perf_counter()
        out = fn()
        _timings.setdefault(key, []).append(time.perf_counter() - t0)
        return out
    return run


def _write_density_plot() -> None:
    if not _timings:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    out = _plot_dir()
    out.mkdir(parents=True, exist_ok=True)
    Ns = sorted({k[0] for k in _timings})
    fig, axes = plt.subplots(len(Ns), 2, figsize=(10, 3.5 * len(Ns)), squeeze=False)
    for row, N in enumerate(Ns):
        for col, mode in enumerate(("fwd", "fwd+bwd")):
            ax = axes[row][col]
            impls = sorted({k[3] for k in _timings if k[0] == N and k[1] == mode})
            for impl in impls:
                pts = sorted((_densities[k[:3]], statistics.median(v)) for k, v in _timings.items()
                             if k[0] == N and k[1] == mode and k[3] == impl)
                if pts:
                    ax.plot([100 * d for d, _ in pts], [1e3 * t for _, t in pts], marker="o", label=impl)
            ax.set_title(f"N={N} {mode}", fontsize=10)
            ax.set_xlabel("layout density (%)")
            ax.set_ylabel("median ms")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "block_sparse_time_vs_density.png", dpi=100)
    plt.close(fig)


atexit.register(_write_density_plot)


def _layout(N: int, H: int, density: float, device):
    from pyattn import layouts

    nb = -(-N // BLOCK)
    random_blocks = max(0, round(density * nb) - 4)
    return layouts.bigbird(H, N, BLOCK, different_layout_per_head=True, num_random_blocks=random_blocks,
                           num_sliding_window_blocks=3, num_global_blocks=1, seed=0, device=device)


def _flex_peer(layout, N: int, H: int, device):
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None, None
    table = (layout.block_table()[0] | layout.block_table()[1])[0]  # (H, nb, nb)

    def mask_mod(b, h, qi, ki):
        return table[h, qi // BLOCK, ki // BLOCK]

    def build():
        return create_block_mask(mask_mod, None, H, N, N, device=str(device), BLOCK_SIZE=BLOCK)

    compiled = torch.compile(flex_attention, dynamic=False)
    return build, compiled


def _cases_for(device, N: int, H: int, D: int, density: float, dtype) -> List[Case]:
    import pyattn

    lay = _layout(N, H, density, device)
    d = lay.density
    cfg = f"N{N} H{H} D{D} bigbird density {d:.1%}"
    q, k, v = (torch.randn(1, H, N, D, device=device, dtype=dtype) for _ in range(3))
    dense_mask = lay.to_dense_mask()  # (1, H, N, N) bool, for the SDPA-with-mask peer
    build_flex, flex = _flex_peer(lay, N, H, device)
    impls = {
        "pyattn": lambda q, k, v: pyattn.block_sparse_attention(q, k, v, lay),
        "sdpa-dense": lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
        "sdpa-bool-mask": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask),
    }
    if flex is not None:
        bm = build_flex()
        impls["flex-compiled"] = lambda q, k, v: flex(q, k, v, block_mask=bm)
    flops = 4 * H * N * N * D * d
    dt = str(dtype).replace("torch.", "")
    for mode in ("fwd", "fwd+bwd"):
        _densities[(N, mode, d)] = d
    fwd, bwd = fwd_bwd_runs(device, impls, q, k, v, wrap=lambda mode, name, run: _recorded((N, mode, d, name), run))
    mb = 2 ** 20
    notes_f = {f"peak_MB_{n}": f"{_peak_bytes(fn, device) / mb:.0f}" for n, fn in
               (("pyattn", fwd["pyattn"]), ("sdpa-bool-mask", fwd["sdpa-bool-mask"]))}
    notes_b = {f"peak_MB_{n}": f"{_peak_bytes(fn, device) / mb:.0f}" for n, fn in
               (("pyattn", bwd["pyattn"]), ("sdpa-bool-mask", bwd["sdpa-bool-mask"]))}
    for key in list(_timings):  # the peak-memory probes are not timings
        if key[0] == N and key[2] == d:
            del _timings[key]
    cases = [Case("block_sparse", "fwd", cfg, dt, fwd, work=flops, unit="TFLOP/s", notes=notes_f),
             Case("block_sparse", "fwd+bwd", cfg, dt, bwd, work=3.5 * flops, unit="TFLOP/s", notes=notes_b)]
    build = {"pyattn": lambda: _layout(N, H, density, device)}
    if build_flex is not None:
        build["flex-create_block_mask"] = build_flex
    cases.append(Case("block_sparse", "build", f"N{N} H{H} schedule build", dt, build, work=0.0, unit="TFLOP/s"))
    return cases


@suite("block_sparse")
def block_sparse_cases(device: torch.device, quick: bool) -> List[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if quick:
        plan = [(1024, 2, [0.1])]
    elif device.type == "cuda":
        plan = [(4096, 16, [0.05, 0.1, 0.25, 0.5]), (16384, 16, [0.05, 0.1, 0.25, 0.5])]
    else:  # 2-core CPUs: one head, and one density at 16k (dense SDPA fwd+bwd takes seconds there)
        plan = [(4096, 2, [0.05, 0.1, 0.25, 0.5]), (16384, 1, [0.1])]
    cases = []
    for N, H, densities in plan:
        for density in densities:
            cases += _cases_for(device, N, H, 64, density, dtype)
    out = _plot_dir()
    out.mkdir(parents=True, exist_ok=True)
    _layout(plan[0][0], min(plan[0][1], 4), 0.1, device).plot(out / "block_sparse_layout.png")
    return cases
