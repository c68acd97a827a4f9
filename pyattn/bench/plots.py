"""Plots generated from a run's rows, without per-family code.

One PNG per figure (a case's ``figure``, default its op): throughput against the case's x axis
(``x`` in its params), one line per implementation, a panel per (mode, dtype, facet values), and
the physical limit measured in the same run as a dashed line (GEMM throughput of that dtype for
TFLOP/s rows, copy bandwidth for GB/s rows). Cases without an x axis get horizontal bars per
config. Figures whose rows recorded peak memory get a second PNG, ``<figure>-memory.png``.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .cases import is_pyattn
from .results import Run

PANEL_W, PANEL_H, MAX_COLS, MIN_W, DPI = 4.2, 3.1, 4, 8.5, 100
_PALETTE = ("#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def impl_order(rows: List[dict]) -> List[str]:
    names = []
    for r in rows:
        if r["impl"] not in names:
            names.append(r["impl"])
    return sorted(names, key=lambda n: (not is_pyattn(n), names.index(n)))


def _colors(impls: List[str]) -> Dict[str, str]:
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(impls)}


def panel_key(r: dict) -> Tuple:
    params = r.get("params") or {}
    return (r["mode"], r["dtype"]) + tuple((f, params.get(f)) for f in (r.get("facets") or []))


def _panel_title(key: Tuple) -> str:
    mode, dtype, *facets = key
    return ", ".join([mode, dtype] + [f"{k}={v}" for k, v in facets])


def layout(rows: List[dict]) -> Tuple[List[str], List[Tuple]]:
    """(modes as grid rows, (dtype, facets...) as grid columns) of a figure."""
    modes, cols = [], []
    for r in rows:
        k = panel_key(r)
        if k[0] not in modes:
            modes.append(k[0])
        if k[1:] not in cols:
            cols.append(k[1:])
    return modes, cols


def uses_bars(rows: List[dict]) -> bool:
    xs = {(r.get("params") or {}).get(r.get("x")) for r in rows if r.get("x")}
    return not xs or None in xs or len(xs) <= 1


def _limit(run: Run, unit: str, dtype: str) -> Optional[Tuple[float, str]]:
    if unit == "TFLOP/s":
        v = (run.limits.get("gemm_TFLOPs") or {}).get(dtype)
        return (v, f"GEMM {dtype} (measured)") if v else None
    if unit == "GB/s":
        v = run.limits.get("copy_GBs")
        return (v, "copy bandwidth (measured)") if v else None
    return None


def figure_for(run: Run, figure: str, metric: str = "throughput"):
    """The matplotlib Figure of one figure name; ``metric`` is "throughput" or "peak_mem_MB"."""
    plt = _plt()
    rows = [r for r in run.rows if (r.get("figure") or r["op"]) == figure]
    modes, cols = layout(rows)
    # each (mode, column) that has rows is a panel; grid wraps columns beyond MAX_COLS
    panels = [(m, c) for m in modes for c in cols if any(panel_key(r) == (m,) + c for r in rows)]
    ncols = min(MAX_COLS, len(cols)) if len(modes) > 1 and len(cols) > 1 else min(MAX_COLS, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    bars = uses_bars(rows)
    n_configs = len({r["config"] for r in rows})
    height = PANEL_H if not bars else max(PANEL_H, 0.9 + 0.32 * n_configs * max(1, len(impl_order(rows))) ** 0.5)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(MIN_W, PANEL_W * ncols + 0.4), height * nrows + 1.2),
                             squeeze=False)
    impls = impl_order(rows)
    colors = _colors(impl_order(run.rows))  # one colour per implementation across all figures
    handles: Dict[str, object] = {}
    for idx, (mode, col) in enumerate(panels):
        ax = axes[idx // ncols][idx % ncols]
        prow = [r for r in rows if panel_key(r) == (mode,) + col]
        _draw_panel(ax, run, prow, impls, colors, handles, metric, bars)
        ax.set_title(_panel_title((mode,) + col), fontsize=9)
    for idx in range(len(panels), nrows * ncols):
        fig.delaxes(axes[idx // ncols][idx % ncols])
    env = run.environment
    title = f"{figure}: {'throughput' if metric == 'throughput' else 'peak memory'}\n{env.get('device', '?')}, " \
            f"torch {env.get('torch', '?')}, {env.get('date', '?')}"
    fig.suptitle(title, fontsize=10)
    if run.banner:
        import textwrap

        width_chars = int(fig.get_figwidth() * 15)
        text = textwrap.shorten("pyattn backend unavailable for some rows (not plotted): " + run.banner[0],
                                width=2 * width_chars)
        fig.text(0.5, 0.005, textwrap.fill(text, width_chars), ha="center", va="bottom", fontsize=7,
                 color="#b00000")
    if handles:
        fig.legend(list(handles.values()), list(handles.keys()), loc="upper center", ncol=min(6, len(handles)),
                   fontsize=8, frameon=False, bbox_to_anchor=(0.5, 1 - 0.5 / (height * nrows + 1.2)))
    fig.tight_layout(rect=(0, 0.06 if run.banner else 0.0, 1, 1 - 0.75 / (height * nrows + 1.2)))
    return fig


def _value(r: dict, metric: str) -> Optional[float]:
    if r["status"] != "ok":
        return None
    return r.get(metric)


def _draw_panel(ax, run, rows, impls, colors, handles, metric, bars):
    unit = rows[0]["unit"]
    ylabel = f"throughput ({unit})" if metric == "throughput" else "peak memory (MB)"
    present = [i for i in impls if any(r["impl"] == i for r in rows)]
    missing = [r for r in rows if is_pyattn(r["impl"]) and r["status"] == "unavailable"]
    if bars:
        configs = []
        for r in rows:
            if r["config"] not in configs:
                configs.append(r["config"])
        h = 0.8 / max(1, len(present))
        for j, impl in enumerate(present):
            ys, vals = [], []
            for i, cfg in enumerate(configs):
                r = next((r for r in rows if r["config"] == cfg and r["impl"] == impl), None)
                v = _value(r, metric) if r else None
                if v is not None:
                    ys.append(i + (j - (len(present) - 1) / 2) * h)
                    vals.append(v)
            if vals:
                handles.setdefault(impl, ax.barh(ys, vals, height=h, color=colors[impl], label=impl))
        ax.set_yticks(range(len(configs)))
        ax.set_yticklabels([_wrap(c) for c in configs], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel(ylabel, fontsize=8)
        lim = _limit(run, unit, rows[0]["dtype"]) if metric == "throughput" else None
        if lim:
            line = ax.axvline(lim[0], color="k", linestyle="--", linewidth=1)
            handles.setdefault(lim[1] if len(run.limits) else "limit", line)
    else:
        xkey = rows[0]["x"]
        xs_all = sorted({r["params"][xkey] for r in rows})
        for impl in present:
            pts = sorted(((r["params"][xkey], _value(r, metric), r.get("noisy")) for r in rows
                          if r["impl"] == impl and _value(r, metric) is not None), key=lambda p: p[0])
            if not pts:
                continue
            xs, ys, noisy = zip(*pts)
            lw = 2.2 if is_pyattn(impl) else 1.4
            (line,) = ax.plot(xs, ys, marker="o", markersize=4, linewidth=lw, color=colors[impl], label=impl)
            handles.setdefault(impl, line)
            nx = [x for x, _, n in pts if n]
            if nx:  # noisy measurements: hollow markers
                ax.plot(nx, [y for _, y, n in pts if n], linestyle="none", marker="o", markersize=6,
                        markerfacecolor="white", color=colors[impl])
        if min(xs_all) > 0 and max(xs_all) / min(xs_all) >= 4:
            ax.set_xscale("log", base=2)
        ax.set_xticks(xs_all)
        ax.set_xticklabels([_short(x) for x in xs_all], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(rows[0].get("x_label") or xkey, fontsize=8)
        ax.set_ylabel(ylabel, fontsize=8)
        lim = _limit(run, unit, rows[0]["dtype"]) if metric == "throughput" else None
        if lim:
            line = ax.axhline(lim[0], color="k", linestyle="--", linewidth=1)
            handles.setdefault("measured limit (GEMM / copy)", line)
        ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=7)
    ax.grid(True, alpha=0.3)
    if missing:
        ax.text(0.02, 0.98, "pyattn unavailable", transform=ax.transAxes, va="top", fontsize=7, color="#b00000")


def _short(x) -> str:
    if isinstance(x, (int, float)) and x >= 10000 and float(x).is_integer():
        x = int(x)
        for div, suf in ((2 ** 20, "M"), (2 ** 10, "k")):
            if x % div == 0:
                return f"{x // div}{suf}"
        return f"{x:.2g}"
    return str(x)


def _wrap(text: str, width: int = 22) -> str:
    words, lines, cur = text.split(), [], ""
    for w in words:
        if cur and len(cur) + len(w) + 1 > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    lines.append(cur)
    return "\n".join(lines)


def figure_names(run: Run) -> List[str]:
    names = []
    for r in run.rows:
        f = r.get("figure") or r["op"]
        if f not in names:
            names.append(f)
    return names


def write_plots(run: Run, out_dir: Path) -> List[Path]:
    """Every figure's PNG (and memory PNG where rows recorded peak memory); [] without matplotlib."""
    try:
        plt = _plt()
    except ImportError:
        print("plots skipped: matplotlib is not installed (pip install matplotlib)")
        return []
    written = []
    for name in figure_names(run):
        rows = [r for r in run.rows if (r.get("figure") or r["op"]) == name]
        metrics = ["throughput"] + (["peak_mem_MB"] if any(r.get("peak_mem_MB") for r in rows) else [])
        for metric in metrics:
            if not any(_value(r, metric) is not None for r in rows):
                continue
            fig = figure_for(run, name, metric)
            path = Path(out_dir) / (f"{name}.png" if metric == "throughput" else f"{name}-memory.png")
            fig.savefig(path, dpi=DPI)
            plt.close(fig)
            written.append(path)
    return written
