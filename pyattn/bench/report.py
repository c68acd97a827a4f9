"""Benchmark report from a :class:`~pyattn.bench.results.Run`: console tables, a one-screen
summary, results.md, and the plots (see plots.py). Nothing here measures anything."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .cases import is_pyattn
from .results import Run, write_run

NOISY_MARK = "*"


def primary_impl(impls: List[str]) -> Optional[str]:
    """The pyattn implementation the others are compared against ("pyattn" when present)."""
    if "pyattn" in impls:
        return "pyattn"
    mine = [i for i in impls if is_pyattn(i)]
    return mine[0] if mine else None


def group_cases(rows: List[dict]) -> Dict[str, Dict[str, Dict[str, dict]]]:
    """figure -> case key -> impl -> row, in first-seen order."""
    out: Dict[str, Dict[str, Dict[str, dict]]] = {}
    for r in rows:
        out.setdefault(r.get("figure") or r["op"], {}).setdefault(r["key"], {})[r["impl"]] = r
    return out


def ms_cell(r: Optional[dict]) -> str:
    if r is None:
        return "-"
    if r["status"] != "ok":
        return r["status"]
    ms = r["median_ms"]
    s = f"{ms:.3f}" if ms < 10 else f"{ms:.2f}" if ms < 100 else f"{ms:.1f}" if ms < 1000 else f"{ms:.0f}"
    return s + (NOISY_MARK if r.get("noisy") else "")


def thru_cell(r: Optional[dict]) -> str:
    if r is None or r["status"] != "ok" or r.get("throughput") is None:
        return "-"
    v = r["throughput"]
    return f"{v:.2f} {r['unit']}" if r["unit"] == "TFLOP/s" else f"{v:.1f} {r['unit']}"


def speedup(mine: Optional[dict], other: Optional[dict]) -> Optional[float]:
    if not mine or not other or mine["status"] != "ok" or other["status"] != "ok":
        return None
    if not mine["median_ms"] or not other["median_ms"]:
        return None
    return other["median_ms"] / mine["median_ms"]


def figure_table(cases: Dict[str, Dict[str, dict]]) -> List[List[str]]:
    """One table for one figure's cases: pyattn's time, spread, throughput, backend, and per peer
    its time and pyattn's speed-up over it."""
    impls: List[str] = []
    for by_impl in cases.values():
        for i in by_impl:
            if i not in impls:
                impls.append(i)
    main = primary_impl(impls)
    others = [i for i in impls if i != main]
    header = ["mode", "config", "dtype", f"{main} ms", "spread", "throughput", "backend"]
    for p in others:
        header += [f"{p} ms", f"x vs {p}"]
    table = [header]
    for by_impl in cases.values():
        first = next(iter(by_impl.values()))
        mine = by_impl.get(main)
        spread = f"{100 * mine['spread']:.0f}%" if mine and mine["status"] == "ok" and mine.get("spread") is not None \
            and not math.isnan(mine["spread"]) else "-"
        line = [first["mode"], first["config"], first["dtype"], ms_cell(mine), spread, thru_cell(mine),
                (mine or {}).get("backend") or "-"]
        for p in others:
            s = speedup(mine, by_impl.get(p))
            line += [ms_cell(by_impl.get(p)), f"{s:.2f}" if s is not None else "-"]
        table.append(line)
    return table


def format_table(table: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(table: List[List[str]]) -> str:
    out = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in table[1:]]
    return "\n".join(out)


def environment_lines(run: Run) -> List[str]:
    env = run.environment
    keys = ("date", "device", "blas", "cpu_attention_tiles", "torch", "triton", "transformers", "pyattn", "python", "threads",
            "load_average")
    lines = []
    for k in keys:
        if k in env:
            v = env[k]
            lines.append(f"{k}: {', '.join(map(str, v)) if isinstance(v, list) else v}")
    lim = run.limits
    if "copy_GBs" in lim:
        lines.append(f"copy bandwidth (measured): {lim['copy_GBs']:.1f} GB/s")
    for dt, v in (lim.get("gemm_TFLOPs") or {}).items():
        lines.append(f"GEMM throughput {dt} (measured): {v:.3f} TFLOP/s")
    if run.scope:
        lines.append(f"scope: {run.scope}" + (f", wall time {run.wall_s:.0f} s" if run.wall_s else ""))
    return lines


def console_report(run: Run) -> str:
    parts = []
    parts += [f"!! {b}" for b in run.banner]
    for fig, cases in group_cases(run.rows).items():
        parts += ["", f"== {fig}", format_table(figure_table(cases))]
    parts += ["", f"{NOISY_MARK}: spread (interquartile range / median) above 10%: do not trust that row's ratios"]
    parts += [f"!! {b}" for b in run.banner]
    return "\n".join(parts)


def speedup_stats(run: Run) -> List[Tuple[str, str, int, float, float, float]]:
    """(figure, peer, rows, geometric mean, min, max) of pyattn's speed-up over each peer."""
    out = []
    for fig, cases in group_cases(run.rows).items():
        per_peer: Dict[str, List[float]] = {}
        for by_impl in cases.values():
            main = primary_impl(list(by_impl))
            for p, r in by_impl.items():
                if p == main or is_pyattn(p):
                    continue
                s = speedup(by_impl.get(main), r)
                if s is not None:
                    per_peer.setdefault(p, []).append(s)
        for p, vals in per_peer.items():
            gm = math.exp(sum(math.log(v) for v in vals) / len(vals))
            out.append((fig, p, len(vals), gm, min(vals), max(vals)))
    return out


def summary(run: Run, written: Optional[List[Path]] = None) -> str:
    """The one-screen summary printed at the end of a run."""
    env = run.environment
    n_ok = sum(r["status"] == "ok" for r in run.rows)
    noisy = sum(bool(r.get("noisy")) for r in run.rows)
    failed = [r for r in run.rows if r["status"] == "error"]
    lines = ["", "=" * 78, f"pyattn bench summary — {env.get('device', '?')}, torch {env.get('torch', '?')}, "
             f"{env.get('date', '?')}"]
    if run.wall_s:
        lines.append(f"{run.scope} scope: {len(run.rows)} timings ({n_ok} ok, {noisy} noisy, {len(failed)} failed) "
                     f"in {run.wall_s:.0f} s; load average at start {env.get('load_average', '?')}")
    lines += [f"!! {b}" for b in run.banner]
    lines.append("speed-up of pyattn (peer time / pyattn time; geometric mean [min–max] over rows):")
    for fig, peer, n, gm, lo, hi in speedup_stats(run):
        lines.append(f"  {fig:<18} vs {peer:<14} {gm:5.2f}x  [{lo:.2f}–{hi:.2f}]  ({n} rows)")
    for r in failed[:5]:
        lines.append(f"  failed: {r['key']} {r['impl']}: {r['reason'][:90]}")
    if written:
        folder = written[0].parent
        lines.append(f"results: {folder}/ ({', '.join(p.name for p in written)})")
    lines.append("=" * 78)
    return "\n".join(lines)


def markdown_report(run: Run) -> str:
    out = ["# pyattn benchmark", ""]
    if run.banner:
        out += [f"> **{b}**" for b in run.banner] + [""]
    out += [f"- {line}" for line in environment_lines(run)] + [""]
    out.append("Times are medians in milliseconds; `spread` is the interquartile range relative to the median "
               f"(rows marked {NOISY_MARK} exceed 10%); `backend` is the pyattn backend that actually ran; "
               "`x vs P` is P's time divided by pyattn's (above 1: pyattn is faster).")
    for fig, cases in group_cases(run.rows).items():
        out += ["", f"## {fig}", "", markdown_table(figure_table(cases))]
        plots = [p for p in (f"{fig}.png", f"{fig}-memory.png") if run.path and (run.path / p).exists()]
        out += [""] + [f"![{p}]({p})" for p in plots] if plots else []
    return "\n".join(out) + "\n"


def write_report(run: Run, out_dir: Path) -> List[Path]:
    """results.json + results.csv, the plots, then results.md (which links the plots)."""
    from . import plots

    out_dir = Path(out_dir)
    written = write_run(run, out_dir)
    run.path = out_dir
    written += plots.write_plots(run, out_dir)
    md = out_dir / "results.md"
    md.write_text(markdown_report(run))
    written.append(md)
    return written
