"""``python -m pyattn.bench readme``: regenerate README's measured tables from committed runs.

A generated table sits between two marker comments that name its run folder and what to show::

    <!-- bench-table run=benchmarks/results/2026-11-25-cpu figure=attention -->
    ...generated...
    <!-- /bench-table -->

Options in the opening marker: ``run=`` (folder, relative to the README), ``figure=`` (the
rows' figure, e.g. attention, attention-causal, rms_norm, glu_ffn, hf_models), optional
``mode=`` and ``dtype=`` filters (comma-separated), ``peers=`` (comma-separated columns; default
every peer with a time in those rows) and ``columns=`` (extra params to show, e.g. ``N,D``).
Each table ends with a line naming its run (device, torch, date), so every number in the
README has its run beside it. ``--check`` exits 1 when the README is not up to date.
"""
from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path
from typing import Dict, List

from .cases import is_pyattn
from .report import group_cases, ms_cell, primary_impl, speedup, thru_cell
from .results import load_run

MARKER = re.compile(r"<!-- bench-table (?P<opts>[^>]*?) -->\n(?P<body>.*?)<!-- /bench-table -->", re.S)


def _opts(text: str) -> Dict[str, str]:
    out = {}
    for tok in shlex.split(text):
        k, _, v = tok.partition("=")
        out[k] = v
    return out


def render(opts: Dict[str, str], base: Path) -> str:
    run = load_run(base / opts["run"])
    rows = [r for r in run.rows if (r.get("figure") or r["op"]) == opts.get("figure", r.get("figure"))]
    for key in ("mode", "dtype"):
        if key in opts:
            allowed = set(opts[key].split(","))
            rows = [r for r in rows if r[key] in allowed]
    if not rows:
        raise ValueError(f"bench-table {opts}: no rows in {opts['run']}")
    cases = {k: v for c in group_cases(rows).values() for k, v in c.items()}
    impls: List[str] = []
    for by_impl in cases.values():
        impls += [i for i in by_impl if i not in impls]
    main = primary_impl(impls)
    peers = opts["peers"].split(",") if "peers" in opts else [
        i for i in impls if i != main and any(by.get(i, {}).get("status") == "ok" for by in cases.values())]
    extra = [c for c in opts.get("columns", "").split(",") if c]
    header = (extra or ["config"]) + ["mode", "dtype", f"{main} ms", "throughput", "backend"] + [f"× {p}" for p in peers]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    ranges: Dict[str, List[float]] = {}
    for by_impl in cases.values():
        first = next(iter(by_impl.values()))
        mine = by_impl.get(main)
        cells = [str(first["params"].get(c, "")) for c in extra] if extra else [first["config"]]
        cells += [first["mode"], _dt(first["dtype"]), ms_cell(mine), thru_cell(mine), (mine or {}).get("backend", "-")]
        for p in peers:
            s = speedup(mine, by_impl.get(p))
            cells.append(f"{s:.2f}" if s is not None else "–")
            if s is not None:
                ranges.setdefault(p, []).append(s)
        lines.append("| " + " | ".join(cells) + " |")
    env = run.environment
    lines.append("")
    if ranges:
        lines.append("Speed-up range over these rows: " + "; ".join(
            f"× {p} {min(v):.2f}–{max(v):.2f}" for p, v in ranges.items()) + ".")
    noisy = sum(bool((by.get(main) or {}).get("noisy")) for by in cases.values())
    lim = run.limits
    limits = []
    if lim.get("copy_GBs"):
        limits.append(f"copy bandwidth {lim['copy_GBs']:.1f} GB/s")
    for dt, v in (lim.get("gemm_TFLOPs") or {}).items():
        limits.append(f"GEMM {_dt(dt)} {v:.2f} TFLOP/s")
    lines.append(f"Run: [`{opts['run']}`]({opts['run']}/results.md) — {env.get('device', '?')}, torch "
                 f"{env.get('torch', '?')}, {env.get('date', '?')}"
                 + (f"; measured limits: {', '.join(limits)}" if limits else "")
                 + (f"; {noisy} row(s) marked * had a spread above 10%" if noisy else "") + ".")
    if run.banner:
        lines.append("")
        lines += [f"**{b}**" for b in run.banner]
    return "\n".join(lines) + "\n"


def _dt(dtype: str) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)


def regenerate(text: str, base: Path) -> str:
    def sub(m):
        return f"<!-- bench-table {m.group('opts')} -->\n{render(_opts(m.group('opts')), base)}<!-- /bench-table -->"

    return MARKER.sub(sub, text)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m pyattn.bench readme", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--readme", default="README.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the README's tables are out of date")
    args = p.parse_args(argv)
    path = Path(args.readme)
    old = path.read_text()
    new = regenerate(old, path.parent)
    n = len(MARKER.findall(old))
    if args.check:
        if new != old:
            print(f"{path}: generated tables are out of date (run python -m pyattn.bench readme)")
            return 1
        print(f"{path}: {n} generated tables up to date")
        return 0
    path.write_text(new)
    print(f"{path}: regenerated {n} tables")
    return 0
