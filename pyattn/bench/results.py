"""Machine-readable benchmark results: one ``results.json`` (and the same rows as ``results.csv``)
per run, a row per (case, implementation). Everything else (markdown, plots, README tables,
comparisons) is generated from these files.

``results.json``::

    {"schema": 1, "environment": {...}, "limits": {"copy_GBs": 31.5, "gemm_TFLOPs": {"float32": 0.5}},
     "scope": "default", "wall_s": 290.0, "banner": ["..."], "rows": [{...}, ...]}

Folders written by earlier versions of the suite (a wide ``results.csv`` with one
``<impl>_ms`` column per implementation and ``# key: value`` header lines) load too.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List, Optional, Union

from .cases import case_key, is_pyattn

SCHEMA = 1
CSV_FIELDS = ("family", "op", "mode", "config", "dtype", "impl", "backend", "status", "reason", "median_ms",
              "q1_ms", "q3_ms", "iqr_ms", "spread", "noisy", "reps", "throughput", "unit", "work", "peak_mem_MB",
              "figure", "x", "tier", "params", "notes")


class Run:
    """A benchmark run loaded from (or about to be written to) a folder."""

    def __init__(self, rows: List[dict], environment: Dict[str, object], limits: Optional[dict] = None,
                 scope: str = "", wall_s: Optional[float] = None, banner: Optional[List[str]] = None,
                 path: Optional[Path] = None):
        self.rows = rows
        self.environment = environment
        self.limits = limits or {}
        self.scope = scope
        self.wall_s = wall_s
        self.banner = list(banner) if banner is not None else unavailable_banner(rows)
        self.path = path

    @property
    def label(self) -> str:
        if self.path is not None:
            return self.path.name
        return f"{self.environment.get('date', '?')} {self.environment.get('device', '?')}"

    def to_json(self) -> dict:
        return dict(schema=SCHEMA, environment=self.environment, limits=self.limits, scope=self.scope,
                    wall_s=self.wall_s, banner=self.banner, rows=self.rows)

    def by_key(self) -> Dict[tuple, dict]:
        """(case key, impl) -> row."""
        return {(r["key"], r["impl"]): r for r in self.rows}


def unavailable_banner(rows: List[dict]) -> List[str]:
    """One line per distinct reason a pyattn implementation did not run on its kernels."""
    lines: Dict[str, List[str]] = {}
    for r in rows:
        if r.get("status") == "unavailable" and is_pyattn(r["impl"]):
            lines.setdefault(r.get("reason") or "unknown reason", []).append(r["key"])
    return [f"UNAVAILABLE: pyattn backend not available for {len(keys)} row(s) ({_ops(keys)}): {why}. "
            "These rows are not timed; no fallback time is reported as pyattn."
            for why, keys in lines.items()]


def _ops(keys: List[str]) -> str:
    ops = sorted({k.split(" | ")[0] for k in keys})
    return ", ".join(ops)


def write_run(run: Run, out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "results.json"
    js.write_text(json.dumps(run.to_json(), indent=1, default=str) + "\n")
    path = out_dir / "results.csv"
    with open(path, "w", newline="") as f:
        for line in run.banner:
            f.write(f"# {line}\n")
        env = {k: v for k, v in run.environment.items()}
        for k, v in {**env, **_flat_limits(run.limits), "scope": run.scope}.items():
            f.write(f"# {k}: {', '.join(map(str, v)) if isinstance(v, list) else v}\n")
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in run.rows:
            w.writerow({**r, "params": json.dumps(r.get("params", {})), "notes": json.dumps(r.get("notes", {}))})
    return [js, path]


def _flat_limits(limits: dict) -> dict:
    out = {}
    if "copy_GBs" in limits:
        out["copy_bandwidth_GBs"] = f"{limits['copy_GBs']:.1f}"
    for dt, v in (limits.get("gemm_TFLOPs") or {}).items():
        out[f"gemm_TFLOPs_{dt}"] = f"{v:.3f}"
    return out


def load_run(path: Union[str, Path]) -> Run:
    """Load a run from its folder (or its results.json); older wide-CSV folders are converted."""
    p = Path(path)
    folder = p.parent if p.is_file() else p
    js = folder / "results.json"
    if js.exists():
        data = json.loads(js.read_text())
        return Run(data["rows"], data.get("environment", {}), data.get("limits"), data.get("scope", ""),
                   data.get("wall_s"), data.get("banner"), path=folder)
    if (folder / "results.csv").exists():
        return load_legacy(folder)
    raise FileNotFoundError(f"{path}: no results.json or results.csv (is this a benchmark output folder?)")


def merge_runs(runs: List[Run], environment: Optional[Dict[str, object]] = None) -> Run:
    """One run from several (e.g. one folder per family); the first row of a (case, impl) wins."""
    seen, rows = set(), []
    for run in runs:
        for r in run.rows:
            if (r["key"], r["impl"]) not in seen:
                seen.add((r["key"], r["impl"]))
                rows.append(r)
    env = dict(environment) if environment is not None else dict(runs[0].environment)
    limits = next((r.limits for r in runs if r.limits), {})
    return Run(rows, env, limits, scope=runs[0].scope)


# --- runs written before results.json existed ------------------------------------------------

def load_legacy(folder: Path, family: str = "") -> Run:
    """A folder of the earlier format: wide results.csv (``<impl>_ms`` columns) + environment.json."""
    header: Dict[str, str] = {}
    lines = []
    with open(folder / "results.csv") as f:
        for line in f:
            if line.startswith("#"):
                k, _, v = line[1:].partition(":")
                header[k.strip()] = v.strip()
            else:
                lines.append(line)
    env: Dict[str, object] = dict(header)
    if (folder / "environment.json").exists():
        env.update(json.loads((folder / "environment.json").read_text()))
    limits = {}
    if "copy_bandwidth_GBs" in env:
        limits["copy_GBs"] = float(env.pop("copy_bandwidth_GBs"))
    env.setdefault("device_type", "cpu")
    rows = []
    for wide in csv.DictReader(lines):
        impls = [k[:-3] for k in wide if k.endswith("_ms")]
        note_keys = [k for k in wide if not k.endswith("_ms") and k not in ("op", "mode", "config", "dtype", "work",
                                                                           "unit", "pct_of_copy_bw") + tuple(impls)]
        notes = {k: wide[k] for k in note_keys if wide[k]}
        params, x, x_label, facets, figure = legacy_layout(wide["op"], wide["config"])
        for impl in impls:
            v = wide[f"{impl}_ms"]
            if v == "":
                continue  # the implementation was not part of this row
            r = dict(family=family or folder.name, op=wide["op"], mode=wide["mode"], config=wide["config"],
                     dtype=wide["dtype"], impl=impl, key=case_key(wide["op"], wide["mode"], wide["config"],
                                                                  wide["dtype"]),
                     figure=figure, x=x, x_label=x_label, facets=facets, params=params, tier="",
                     work=float(wide["work"]), unit=wide["unit"], notes=notes,
                     backend="not recorded" if is_pyattn(impl) else "peer", status="ok", reason="",
                     median_ms=None, q1_ms=None, q3_ms=None, iqr_ms=None, spread=None, reps=0, noisy=False,
                     throughput=None, peak_mem_MB=None)
            try:
                r["median_ms"] = float(v)
            except ValueError:
                r.update(status="error", reason=v)
            if r["median_ms"]:
                from .runner import throughput

                r["throughput"] = throughput(r["work"], r["unit"], r["median_ms"])
            mem = notes.get(f"peak_mem_MB_{impl}")
            if mem:
                r["peak_mem_MB"] = float(mem)
            rows.append(r)
    return Run(rows, env, limits, scope="legacy", path=folder, banner=[])


def legacy_layout(op: str, config: str):
    """Plot layout (params, x, x_label, facets, figure) of a row from its op and config string."""
    import re

    if op == "attention":
        m = re.match(r"(?:B(\d+) H(\d+) )?N(\d+) D(\d+)(.*)", config)
        if m:
            rest = m.group(5).strip()
            params = {"N": int(m.group(3)), "D": int(m.group(4))}
            if m.group(1):
                params.update(B=int(m.group(1)), H=int(m.group(2)))
            fig = "attention" if not rest else "attention-" + ("causal" if rest == "causal" else "window")
            return params, "N", "sequence length N (tokens)", ["D"], fig
        return {}, None, None, [], "attention-varlen"
    if op == "rms_norm":
        m = re.match(r"(\d+)x(\d+)$", config)
        if m:
            M, N = int(m.group(1)), int(m.group(2))
            return {"rows": M, "hidden": N, "elements": M * N}, "elements", "tensor size (elements)", [], op
    if op.startswith("hf_"):
        return {"model": op}, None, None, [], "hf_models"
    if op == "glu_ffn":
        m = re.match(r"(\d+)x(\d+)x(\d+)$", config)
        if m:
            T, H, I = map(int, m.groups())
            return {"T": T, "H": H, "I": I}, "T", "tokens T", ["H", "I"], op
    return {}, None, None, [], op
