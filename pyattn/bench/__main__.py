"""``python -m pyattn.bench``: the benchmark suite.

    python -m pyattn.bench [--quick | --full] [--ops rms_norm,attention,...] [--out DIR] [--strict]
    python -m pyattn.bench compare RUN_A RUN_B [...] [--out DIR]
    python -m pyattn.bench report RUN            (re-generate results.md and the plots of a run folder)
    python -m pyattn.bench readme [--check]      (re-generate README's measured tables from their runs)

The default run times the headline rows of every op family (about 5 minutes on 2 CPU cores);
``--full`` the whole grid; ``--quick`` a smoke run. Each run writes results.json and results.csv
(a row per case and implementation, with the pyattn backend that actually ran and the spread),
then results.md and one PNG per figure, generated from those rows.

A pyattn row whose kernel backend is unavailable (a failed build, an unsupported input) is not
timed: the report shows it as "unavailable" under a banner. ``--strict`` (the default when the
environment variable CI is set) makes such a run exit with status 3.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import os
import pkgutil
import sys
import time
from pathlib import Path

import torch

from . import cases as _cases

# suite modules (each registers its families with @suite); any other module of this package that
# registers a suite is picked up too, in name order after these
FAMILY_MODULES = ("rms_norm", "attention", "glu", "integrations", "block_sparse", "lsh", "decode", "models")
_NOT_SUITES = {"__main__", "cases", "timing", "report", "results", "plots", "runner", "environment", "compare",
               "readme"}


def _load_suites():
    here = Path(__file__).parent
    extra = sorted(m.name for m in pkgutil.iter_modules([str(here)])
                   if m.name not in FAMILY_MODULES and m.name not in _NOT_SUITES)
    for mod in list(FAMILY_MODULES) + extra:
        try:
            importlib.import_module(f"pyattn.bench.{mod}")
        except ModuleNotFoundError as exc:
            if exc.name != f"pyattn.bench.{mod}":
                raise


def _env_strict() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def parse_args(argv=None):
    _load_suites()
    p = argparse.ArgumentParser(prog="python -m pyattn.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(_cases.SUITES),
                   help=f"comma-separated op families (default: all of {', '.join(_cases.SUITES)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("--quick", action="store_true", help="smoke run: one small shape per case (< 2 minutes)")
    scope.add_argument("--full", action="store_true", help="the whole grid and every peer (tens of minutes)")
    p.add_argument("--out", default=None, help="output folder (default: ./bench_results/<date>-<device>-<scope>)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timing per implementation and row (default 0.4; 0.1 with --quick)")
    p.add_argument("--peers", default=None, help="comma-separated peers to run (default: all available)")
    p.add_argument("--backends", default="auto",
                   help="pyattn backends to time, e.g. 'triton,cuda' (default 'auto': pyattn's own dispatch)")
    p.add_argument("--strict", dest="strict", action="store_true", default=_env_strict(),
                   help="exit 3 when a pyattn backend it was asked to time is unavailable "
                        "(default when the environment variable CI is set)")
    p.add_argument("--no-strict", dest="strict", action="store_false", help="never exit non-zero for that")
    p.add_argument("--no-progress", action="store_true", help="no progress bar / per-row lines")
    p.add_argument("--plan", action="store_true", help="print the case list and its time estimate, run nothing")
    return p.parse_args(argv)


def scope_of(args) -> str:
    return "quick" if args.quick else "full" if args.full else "default"


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("compare", "report", "readme"):
        return _subcommand(argv[0], argv[1:])
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
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    bad = [b for b in backends if b != "auto" and b not in ("triton", "cuda", "cpu", "reference")]
    if bad:
        print(f"error: unknown --backends {bad}; use auto, triton, cuda, cpu or reference", file=sys.stderr)
        return 2
    scope = scope_of(args)
    budget = args.budget if args.budget is not None else (0.1 if scope == "quick" else 0.4)
    peers = set(args.peers.split(",")) if args.peers else None

    from .environment import environment
    from .report import console_report, summary, write_report
    from .results import Run
    from .runner import run_cases
    from .timing import copy_bandwidth_gbs, gemm_tflops

    t_start = time.perf_counter()
    env = environment(device)
    selected = []
    for fam in families:
        selected += [(fam, c) for c in _cases.build_cases(fam, device, scope)]
    planned = _cases.estimate_cases_s([c for _, c in selected], device, budget)
    print(f"pyattn bench ({scope}) on {env['device']} | torch {env['torch']} | {env['date']} | "
          f"{len(selected)} cases, planned about {planned / 60:.1f} min | load average {env.get('load_average')}",
          flush=True)
    if args.plan:
        for fam, c in selected:
            est = sum(_cases.estimate_impl_s(c, n, device, budget) for n in c.impls)
            print(f"  {fam:<13} {c.key:<70} {len(c.impls)} impls  ~{est:.0f} s")
        return 0
    limits = {"copy_GBs": copy_bandwidth_gbs(device), "gemm_TFLOPs": {}}
    for dt in sorted({c.dtype for _, c in selected if c.unit == "TFLOP/s"}):
        limits["gemm_TFLOPs"][dt] = gemm_tflops(device, getattr(torch, dt))
    rows = run_cases(selected, device, budget, backends=None if backends == ["auto"] else backends,
                     peers=peers, progress=not args.no_progress)
    run = Run(rows, env, limits, scope=scope, wall_s=time.perf_counter() - t_start)
    run.environment["planned_s"] = round(planned)
    if device.type == "cpu":
        from .environment import cpu_attention_tiles
        run.environment["cpu_attention_tiles"] = cpu_attention_tiles()  # chosen during the run
    print(console_report(run))
    out = Path(args.out) if args.out else Path("bench_results") / (
        _dt.datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{device.type}-{scope}")
    written = write_report(run, out)
    print(summary(run, written))
    if any(r["status"] == "error" and _cases.is_pyattn(r["impl"]) for r in rows):
        return 1
    if run.banner and args.strict:
        print("strict: a pyattn backend that was asked for is unavailable (exit 3)", file=sys.stderr)
        return 3
    return 0


def _subcommand(name: str, argv) -> int:
    if name == "compare":
        from .compare import main as compare_main

        return compare_main(argv)
    if name == "readme":
        from .readme import main as readme_main

        return readme_main(argv)
    p = argparse.ArgumentParser(prog="python -m pyattn.bench report",
                                description="re-generate results.md and the plots of a run folder")
    p.add_argument("run", help="folder with results.json (or an older results.csv)")
    p.add_argument("--out", default=None, help="where to write (default: the run folder)")
    args = p.parse_args(argv)
    from .report import summary, write_report
    from .results import load_run

    run = load_run(args.run)
    written = write_report(run, Path(args.out) if args.out else run.path)
    print(summary(run, written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
