"""``python -m pyattn.bench compare RUN_A RUN_B [...]``: ratios between runs.

Rows are matched by case (op, mode, config, dtype) and implementation. The first run is the
baseline: for every other run X the ratio is ``time(A) / time(X)`` (above 1: X is faster), e.g.
two machines, or before/after a change. Prints a table and a summary per implementation
(geometric mean), writes compare.csv and compare.png into ``--out`` (when given).
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .cases import is_pyattn
from .report import format_table
from .results import Run, load_run


def match(runs: List[Run]) -> List[Tuple[str, str, List[Optional[dict]]]]:
    """(case key, impl, [row of each run or None]) for every pair present in the baseline and at
    least one other run, in the baseline's order."""
    maps = [r.by_key() for r in runs]
    out = []
    for (key, impl) in maps[0]:
        rows = [m.get((key, impl)) for m in maps]
        if any(r is not None for r in rows[1:]):
            out.append((key, impl, rows))
    return out


def ratio(base: Optional[dict], other: Optional[dict]) -> Optional[float]:
    if not base or not other or base.get("status") != "ok" or other.get("status") != "ok":
        return None
    if not base.get("median_ms") or not other.get("median_ms"):
        return None
    return base["median_ms"] / other["median_ms"]


def compare_table(runs: List[Run], matched) -> List[List[str]]:
    header = ["case", "impl", f"{_short(runs[0])} ms"]
    for r in runs[1:]:
        header += [f"{_short(r)} ms", "ratio"]
    table = [header]
    for key, impl, rows in matched:
        line = [key, impl, _ms(rows[0])]
        for r in rows[1:]:
            q = ratio(rows[0], r)
            line += [_ms(r), f"{q:.2f}" if q is not None else "-"]
        table.append(line)
    return table


def geomean_by_impl(matched, run_index: int) -> Dict[str, Tuple[float, int]]:
    vals: Dict[str, List[float]] = {}
    for _, impl, rows in matched:
        q = ratio(rows[0], rows[run_index])
        if q is not None:
            vals.setdefault(impl, []).append(q)
    return {i: (math.exp(sum(map(math.log, v)) / len(v)), len(v)) for i, v in vals.items()}


def _ms(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if r.get("status") != "ok":
        return r.get("status") or "-"
    return f"{r['median_ms']:.3f}" if r["median_ms"] < 100 else f"{r['median_ms']:.1f}"


def _short(run: Run) -> str:
    return run.label[:28]


def write_csv(path: Path, runs: List[Run], matched) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["key", "impl"] + [f"{r.label}_ms" for r in runs] + [f"ratio_{r.label}" for r in runs[1:]])
        for key, impl, rows in matched:
            ms = [r["median_ms"] if r and r.get("status") == "ok" else "" for r in rows]
            qs = [ratio(rows[0], r) for r in rows[1:]]
            w.writerow([key, impl] + ms + ["" if q is None else f"{q:.4f}" for q in qs])


def plot(path: Path, runs: List[Run], matched, max_impls: int = 4) -> Optional[Path]:
    """One panel per implementation (pyattn first): a horizontal bar per case, the ratio of each
    other run to the baseline on a log axis."""
    try:
        from .plots import _plt

        plt = _plt()
    except ImportError:
        return None
    impls: List[str] = []
    for _, impl, _rows in matched:
        if impl not in impls:
            impls.append(impl)
    impls = sorted(impls, key=lambda i: (not is_pyattn(i), impls.index(i)))[:max_impls]
    keys = []
    for key, impl, rows in matched:
        if impl in impls and key not in keys and any(ratio(rows[0], r) for r in rows[1:]):
            keys.append(key)
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(impls), figsize=(3.6 * len(impls) + 3.5, 0.8 + 0.24 * len(keys) * len(runs[1:]) ** 0.5),
                             squeeze=False, sharey=True)
    lookup = {(k, i): rows for k, i, rows in matched}
    colors = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e")
    for ax, impl in zip(axes[0], impls):
        h = 0.8 / len(runs[1:])
        for j, other in enumerate(runs[1:]):
            ys, qs = [], []
            for y, key in enumerate(keys):
                rows = lookup.get((key, impl))
                q = ratio(rows[0], rows[j + 1]) if rows else None
                if q is not None:
                    ys.append(y + (j - (len(runs) - 2) / 2) * h)
                    qs.append(q)
            ax.barh(ys, qs, height=h, color=colors[j % len(colors)], label=_short(other), left=0)
        ax.axvline(1.0, color="k", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_title(impl, fontsize=9)
        ax.set_xlabel(f"time({_short(runs[0])}) / time(run)\n(>1: faster than baseline)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(keys)))
    axes[0][0].set_yticklabels([k.replace(" | ", " ") for k in keys], fontsize=7)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"run ratios against {runs[0].label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyattn.bench compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (results.json, or an older results.csv); the first is the baseline")
    p.add_argument("--out", default=None, help="folder for compare.csv and compare.png")
    p.add_argument("--impl", default=None, help="only these implementations (comma-separated)")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("give at least two runs")
    runs = [load_run(r) for r in args.runs]
    matched = match(runs)
    if args.impl:
        keep = set(args.impl.split(","))
        matched = [m for m in matched if m[1] in keep]
    if not matched:
        print("no rows in common (rows are matched by op, mode, config, dtype and implementation)")
        return 1
    for r in runs:
        env = r.environment
        print(f"{r.label}: {env.get('device', '?')}, torch {env.get('torch', '?')}, {env.get('date', '?')}")
    print()
    print(format_table(compare_table(runs, matched)))
    for j, other in enumerate(runs[1:], start=1):
        print(f"\n{other.label} against {runs[0].label} (geometric mean of time ratios, >1: faster):")
        for impl, (gm, n) in geomean_by_impl(matched, j).items():
            print(f"  {impl:<16} {gm:.2f}x over {n} rows")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        write_csv(out / "compare.csv", runs, matched)
        png = plot(out / "compare.png", runs, matched)
        print(f"\nwrote {out / 'compare.csv'}" + (f", {png}" if png else ""))
    return 0
