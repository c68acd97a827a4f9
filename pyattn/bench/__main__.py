"""``python -m pyattn.bench``: the benchmark suite.

Runs every registered case on the chosen device, prints a table (median ms, throughput,
speed-up against each peer) and writes CSV, markdown and a PNG plot under ``--out``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import sys
import traceback
from pathlib import Path

import torch

from . import cases as _cases
from .report import environment_tag, format_table, rows_to_table, write_outputs
from .timing import copy_bandwidth_gbs, median_ms

FAMILY_MODULES = ("rms_norm", "attention", "masks", "glu", "integrations", "block_sparse")


def _load_suites():
    for mod in FAMILY_MODULES:
        try:
            importlib.import_module(f"pyattn.bench.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyattn.bench.{mod}":
                raise


def parse_args(argv=None):
    _load_suites()
    p = argparse.ArgumentParser(prog="python -m pyattn.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(_cases.SUITES),
                   help=f"comma-separated op families (default: all of {', '.join(_cases.SUITES)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--quick", action="store_true", help="one small shape per case, short timing budget")
    p.add_argument("--out", default=None, help="output folder (default: ./bench_results/<date>-<device>)")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per implementation and row")
    p.add_argument("--peers", default=None, help="comma-separated peers to run (default: all available)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    families = [f.strip() for f in args.ops.split(",") if f.strip()]
    unknown = [f for f in families if f not in _cases.SUITES]
    if unknown:
        print(f"error: unknown --ops {unknown}; available: {sorted(_cases.SUITES)}", file=sys.stderr)
        return 2
    budget = args.budget if args.budget is not None else (0.3 if args.quick else 1.0)
    wanted_peers = set(args.peers.split(",")) if args.peers else None
    tag = environment_tag(device)
    bw = copy_bandwidth_gbs(device)
    print(f"pyattn bench on {tag['device']} | torch {tag['torch']} | {tag['date']} | copy bandwidth {bw:.1f} GB/s",
          flush=True)

    all_cases = []
    for fam in families:
        all_cases += _cases.SUITES[fam](device, args.quick)
    rows, peers = [], []
    total = sum(len(c.impls) for c in all_cases)
    done = 0
    for case in all_cases:
        row = dict(op=case.op, mode=case.mode, config=case.config, dtype=case.dtype, work=case.work, unit=case.unit)
        for name, fn in case.impls.items():
            done += 1
            if wanted_peers is not None and name != "pyattn" and name not in wanted_peers:
                continue
            label = f"[{done}/{total}] {case.op} {case.mode} {case.config} {case.dtype} {name}"
            print(f"{label} ...", end="", flush=True)
            try:
                ms = median_ms(fn, device, budget_s=budget, min_runs=3 if args.quick else 5)
                row[f"{name}_ms"] = ms
                print(f" {ms:.3f} ms", flush=True)
            except Exception as exc:  # a failing peer must not stop the suite
                row[f"{name}_ms"] = f"error: {type(exc).__name__}"
                print(f" failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})", flush=True)
                if name == "pyattn":
                    traceback.print_exc()
            if name != "pyattn" and name not in peers:
                peers.append(name)
        for k, v in case.notes.items():
            row[k] = v
        if case.unit == "GB/s" and isinstance(row.get("pyattn_ms"), float):
            row["pct_of_copy_bw"] = round(100 * case.work / (row["pyattn_ms"] * 1e-3) / 1e9 / bw, 1)
        rows.append(row)

    table = rows_to_table(rows, peers)
    print()
    print(format_table(table))
    out = Path(args.out) if args.out else Path("bench_results") / (
        _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{device.type}")
    written = write_outputs(out, rows, peers, tag, {"copy_bandwidth_GBs": f"{bw:.1f}"})
    print(f"\nwrote {', '.join(str(p) for p in written)}")
    failed = [r for r in rows if not isinstance(r.get("pyattn_ms"), float)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
