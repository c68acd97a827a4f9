"""Benchmark case registry: each op family contributes cases with its peers.

A family registers a builder with ``@suite(name)``; the builder takes ``(device, quick)`` and
returns a list of :class:`Case`. The CLI picks a scope from that list:

* ``--quick``: the builder is called with ``quick=True`` (a smoke run, every case it returns);
* default: ``quick=False``, only the cases with ``tier="default"`` (the headline rows), without
  the implementations listed in ``full_impls``;
* ``--full``: ``quick=False``, every case and every implementation.

Plots are generic: a case says which of its ``params`` is the x axis (``x``), which split the
panels (``facets``; dtype and mode always do) and which figure it belongs to (``figure``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

SCOPES = ("quick", "default", "full")


@dataclass
class Case:
    """One benchmark row: several implementations (``impls``) of the same computation.

    ``impls`` maps a name to a zero-argument callable; names starting with "pyattn" are the
    library (the backend that actually ran is recorded per row), the others peers. ``work`` is
    the amount counted for the throughput column: FLOPs (unit "TFLOP/s") or bytes moved (unit
    "GB/s").
    """

    op: str
    mode: str  # "fwd", "fwd+bwd", "train step", ...
    config: str
    dtype: str
    impls: Dict[str, Callable[[], object]]
    work: float
    unit: str
    notes: Dict[str, str] = field(default_factory=dict)
    peak_memory: Optional[Callable[[str], float]] = None  # kept for builders that use it; see measure_memory
    params: Dict[str, object] = field(default_factory=dict)  # e.g. {"N": 1024, "D": 64}
    x: Optional[str] = None  # key of ``params`` used as the plot's x axis (None: a bar per config)
    x_label: Optional[str] = None  # axis label with unit, e.g. "sequence length N (tokens)"
    facets: Tuple[str, ...] = ()  # keys of ``params`` that split plot panels, besides dtype and mode
    figure: Optional[str] = None  # plot (and README table) grouping; default: ``op``
    tier: str = "default"  # "default": headline row of the default run; "full": only with --full
    full_impls: Tuple[str, ...] = ()  # implementations timed only with --full (e.g. slow compiles)
    measure_memory: bool = False  # also record each implementation's peak memory (MB)
    est_s: Optional[Dict[str, float]] = None  # optional planning estimate: seconds per call, per impl
    lazy_notes: Optional[Callable[[], Dict[str, str]]] = None  # extra notes computed once, when the case runs

    @property
    def key(self) -> str:
        return case_key(self.op, self.mode, self.config, self.dtype)

    @property
    def figure_name(self) -> str:
        return self.figure or self.op


def case_key(op: str, mode: str, config: str, dtype: str) -> str:
    return f"{op} | {mode} | {config} | {dtype}"


def is_pyattn(impl: str) -> bool:
    return impl == "pyattn" or impl.startswith("pyattn-") or impl.startswith("pyattn[")


# family name -> builder(device, quick) -> list of Case
SUITES: Dict[str, Callable[[torch.device, bool], List[Case]]] = {}


def suite(name: str):
    def deco(fn):
        SUITES[name] = fn
        return fn

    return deco


def build_cases(family: str, device: torch.device, scope: str) -> List[Case]:
    """The cases of ``family`` that run in ``scope`` ("quick", "default" or "full")."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    cases = select_scope(SUITES[family](device, scope == "quick"), scope)
    return default_headlines(family, cases) if scope == "default" else cases


def default_headlines(family: str, cases: List[Case]) -> List[Case]:
    """The default run's rows of ``family`` (see DEFAULT_HEADLINES)."""
    limit = DEFAULT_HEADLINES.get(family)
    return cases if limit is None else cases[:limit]


# Families whose builders do not tier their rows yet: the default run keeps their first rows
# (the rest run with --full or --ops FAMILY --full), so the default run stays near 5 minutes.
DEFAULT_HEADLINES = {"decode": 2, "models": 0, "lsh": 1, "block_sparse": 1}


def select_scope(cases: List[Case], scope: str) -> List[Case]:
    """Of the cases a builder returned (with ``quick=False`` unless scope is "quick"), those that
    run in ``scope``, without their ``full_impls`` unless the scope is "full"."""
    if scope == "default":
        cases = [c for c in cases if c.tier == "default"]
    if scope != "full":
        for c in cases:
            if c.full_impls:
                c.impls = {n: f for n, f in c.impls.items() if n not in c.full_impls}
    return cases


# --- planning: how long a scope takes, estimated without running it -------------------------

# Conservative per-call rates on a 2-core CPU (measured 2026-11-25 on the AMD EPYC: the slowest
# common peers reach about 0.05 TFLOP/s and 2 GB/s); on GPU a generous 10 TFLOP/s and 300 GB/s.
_RATES = {("cpu", "TFLOP/s"): 0.05e12, ("cpu", "GB/s"): 2e9,
          ("cuda", "TFLOP/s"): 10e12, ("cuda", "GB/s"): 300e9}
_SLOW_PEERS = {"flex": 3.0}  # eager FlexAttention materialises scores through many small ops
# first-call compile cost (seconds) of peers that compile per shape
_COMPILE_S = {"flex-compiled": 25.0, "compile": 8.0}
MIN_REPS = 3  # timed repetitions at least (a spread needs several)


def estimate_call_s(case: Case, impl: str, device: torch.device) -> float:
    if case.est_s and impl in case.est_s:
        return case.est_s[impl]
    rate = _RATES.get((device.type, case.unit), _RATES[("cpu", "TFLOP/s")])
    return case.work / rate * _SLOW_PEERS.get(impl, 1.0)


def estimate_impl_s(case: Case, impl: str, device: torch.device, budget_s: float) -> float:
    """Planned seconds for one (case, impl): warm-up call, timed repetitions, memory call, compile."""
    t = estimate_call_s(case, impl, device)
    timed = max(budget_s, MIN_REPS * t)
    extra = t if case.measure_memory else 0.0
    return t + timed + extra + _COMPILE_S.get(impl, 0.0)


def estimate_cases_s(cases: List[Case], device: torch.device, budget_s: float) -> float:
    return sum(estimate_impl_s(c, name, device, budget_s) for c in cases for name in c.impls)
