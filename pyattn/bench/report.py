"""Benchmark output: console table, CSV, markdown and PNG, each tagged with device, versions, date."""
from __future__ import annotations

import csv
import datetime as _dt
import json
import os
import platform
from pathlib import Path
from typing import Dict, List

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    return f"{model}, {os.cpu_count()} cores, {isa}"


def environment_tag(device: torch.device) -> Dict[str, str]:
    tag = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        tag["triton"] = triton.__version__
    except Exception:
        pass
    try:
        import pyattn

        tag["pyattn"] = pyattn.__version__
    except Exception:
        pass
    return tag


def rows_to_table(rows: List[dict], peers: List[str]) -> List[List[str]]:
    header = ["op", "mode", "config", "dtype", "pyattn ms", "pyattn thru"]
    for p in peers:
        header += [f"{p} ms", f"x vs {p}"]
    table = [header]
    for r in rows:
        line = [r["op"], r["mode"], r["config"], r["dtype"], _fmt(r.get("pyattn_ms")), _thru(r)]
        for p in peers:
            ms = r.get(f"{p}_ms")
            line += [_fmt(ms), _speedup(r.get("pyattn_ms"), ms)]
        table.append(line)
    return table


def _fmt(ms) -> str:
    if ms is None:
        return "-"
    if isinstance(ms, str):
        return ms
    return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def _speedup(mine, other) -> str:
    if not isinstance(mine, float) or not isinstance(other, float):
        return "-"
    return f"{other / mine:.2f}"


def _thru(r) -> str:
    ms = r.get("pyattn_ms")
    if not isinstance(ms, float):
        return "-"
    value = r["work"] / (ms * 1e-3)
    if r["unit"] == "TFLOP/s":
        return f"{value / 1e12:.2f} TFLOP/s"
    return f"{value / 1e9:.1f} GB/s"


def format_table(table: List[List[str]]) -> str:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(table: List[List[str]]) -> str:
    out = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    out += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(out)


def write_outputs(out_dir: Path, rows: List[dict], peers: List[str], tag: Dict[str, str], extra: Dict[str, str]) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    csv_path = out_dir / "results.csv"
    fields = sorted({k for r in rows for k in r})
    with open(csv_path, "w", newline="") as f:
        f.write("".join(f"# {k}: {v}\n" for k, v in {**tag, **extra}.items()))
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    written.append(csv_path)
    table = rows_to_table(rows, peers)
    md_path = out_dir / "results.md"
    header = "\n".join(f"- {k}: {v}" for k, v in {**tag, **extra}.items())
    md_path.write_text(f"# pyattn benchmark\n\n{header}\n\n"
                       "Times are medians in milliseconds; `x vs P` is P's time divided by pyattn's "
                       "(above 1 means pyattn is faster).\n\n" + markdown_table(table) + "\n")
    written.append(md_path)
    (out_dir / "environment.json").write_text(json.dumps({**tag, **extra}, indent=2))
    written.append(out_dir / "environment.json")
    png = _plot(out_dir / "speedup.png", rows, peers, tag)
    if png:
        written.append(png)
    return written


def _plot(path: Path, rows: List[dict], peers: List[str], tag: Dict[str, str]):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    labels = [f"{r['op']} {r['mode']}\n{r['config']} {r['dtype']}" for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(rows) + 2), 4.5))
    width = 0.8 / max(1, len(peers))
    for i, p in enumerate(peers):
        vals = []
        for r in rows:
            mine, other = r.get("pyattn_ms"), r.get(f"{p}_ms")
            vals.append(other / mine if isinstance(mine, float) and isinstance(other, float) else 0.0)
        ax.bar([x + i * width for x in range(len(rows))], vals, width, label=f"vs {p}")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(rows))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speed-up of pyattn (peer time / pyattn time)")
    ax.set_title(f"pyattn on {tag['device']} — {tag['date']}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
