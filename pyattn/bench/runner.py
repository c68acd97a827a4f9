"""Run benchmark cases: time every implementation, record the pyattn backend that actually ran.

A pyattn implementation whose call ends up on the ``reference`` backend (its kernel backend is
unavailable: failed build, unsupported input) is not timed and its row says ``unavailable``
with the reason: a fallback's time is never reported under pyattn's name.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .. import _dispatch
from .cases import Case, estimate_impl_s, is_pyattn
from .timing import measure, peak_memory_bytes

# the backends that count as pyattn's own kernels, per device type (reference is the oracle)
KERNEL_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


@contextlib.contextmanager
def recording_backends():
    """Collect (family, backend) of every pyattn dispatch decision made inside the block."""
    seen: List[Tuple[str, str]] = []
    real = _dispatch.select_backend

    def spy(op, family, device, backend, features=()):
        name = real(op, family, device, backend, features)
        seen.append((family, name))
        return name

    _dispatch.select_backend = spy
    try:
        yield seen
    finally:
        _dispatch.select_backend = real


@contextlib.contextmanager
def forced_backend(name: Optional[str]):
    if name is None:
        yield
        return
    old = os.environ.get("PYATTN_BACKEND")
    os.environ["PYATTN_BACKEND"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PYATTN_BACKEND", None)
        else:
            os.environ["PYATTN_BACKEND"] = old


def _with_backend(fn: Callable[[], object], name: Optional[str]) -> Callable[[], object]:
    if name is None:
        return fn

    def run():
        with forced_backend(name):
            return fn()

    return run


def _fallback_reason(families: Sequence[str], device: torch.device) -> str:
    reasons = []
    for fam in families:
        status = _dispatch.backend_status(fam, device)
        for b in KERNEL_BACKENDS.get(device.type, ()):
            if status.get(b):
                reasons.append(f"{fam}/{b}: {status[b]}")
    return "; ".join(reasons) or "the input is not supported by a kernel backend (reference ran)"


def expand_impls(case: Case, backends: Optional[Sequence[str]]) -> Dict[str, Tuple[Callable, Optional[str]]]:
    """impl name -> (callable, forced backend or None). With explicit ``backends`` every pyattn
    implementation is timed once per backend, as ``pyattn[triton]``, ``pyattn[cuda]``..."""
    out = {}
    for name, fn in case.impls.items():
        if is_pyattn(name) and backends:
            for b in backends:
                out[name if len(backends) == 1 and b == "auto" else f"{name}[{b}]"] = (fn, None if b == "auto" else b)
        else:
            out[name] = (fn, None)
    return out


def base_row(case: Case, family: str, impl: str) -> dict:
    return dict(family=family, op=case.op, mode=case.mode, config=case.config, dtype=case.dtype, impl=impl,
                key=case.key, figure=case.figure_name, x=case.x, x_label=case.x_label, facets=list(case.facets),
                params=dict(case.params), tier=case.tier, work=case.work, unit=case.unit, notes=dict(case.notes),
                backend="", status="", reason="", median_ms=None, q1_ms=None, q3_ms=None, iqr_ms=None,
                spread=None, reps=0, noisy=False, throughput=None, peak_mem_MB=None)


def run_impl(case: Case, family: str, impl: str, fn: Callable, forced: Optional[str], device: torch.device,
             budget_s: float) -> dict:
    row = base_row(case, family, impl)
    fn = _with_backend(fn, forced)
    pyattn_impl = is_pyattn(impl)
    try:
        with recording_backends() as seen:
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            first = time.perf_counter() - t0
    except _dispatch.BackendUnavailableError as exc:
        row.update(status="unavailable", backend=forced or "none",
                   reason="; ".join(f"{b}: {why}" for b, why in exc.reasons.items()))
        return row
    except Exception as exc:  # a failing implementation must not stop the suite
        row.update(status="error", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        if pyattn_impl:
            traceback.print_exc(file=sys.stderr)
        return row
    if pyattn_impl:
        backends = sorted({b for _, b in seen})
        row["backend"] = "+".join(backends) if backends else "none (no pyattn op called)"
        fell_back = "reference" in backends and forced != "reference"
        if fell_back or not backends:
            families = sorted({f for f, b in seen if b == "reference"})
            row.update(status="unavailable",
                       reason=_fallback_reason(families, device) if backends else "no pyattn op was called")
            return row
    else:
        row["backend"] = "peer"
    timing = measure(fn, device, budget_s=budget_s, first_call_s=first)
    row.update(status="ok", median_ms=timing.median_ms, q1_ms=timing.q1_ms, q3_ms=timing.q3_ms,
               iqr_ms=timing.iqr_ms, spread=timing.spread, reps=timing.reps, noisy=timing.noisy,
               throughput=throughput(case.work, case.unit, timing.median_ms))
    if case.measure_memory:
        try:
            row["peak_mem_MB"] = peak_memory_bytes(fn, device) / 2 ** 20
        except Exception as exc:
            row["notes"]["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:120]
    return row


def throughput(work: float, unit: str, ms: float) -> Optional[float]:
    if not ms or ms <= 0:
        return None
    per_s = work / (ms * 1e-3)
    return per_s / 1e12 if unit == "TFLOP/s" else per_s / 1e9 if unit == "GB/s" else per_s


class _Progress:
    """ETA over planned seconds: a tqdm bar on a terminal, else one line per row with the ETA."""

    def __init__(self, total_s: float, enabled: bool):
        self.bar = None
        self.enabled = enabled
        self.total, self.done_s, self.t0 = max(total_s, 1e-9), 0.0, time.perf_counter()
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=round(total_s, 1), unit="s", file=sys.stderr, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} planned s "
                                           "[{elapsed}<{remaining}] {postfix}")
            except ImportError:
                pass

    def start(self, label: str):
        if self.bar is not None:
            self.bar.set_postfix_str(label[:60], refresh=True)

    def done(self, planned_s: float, line: str):
        self.done_s += planned_s
        if self.bar is not None:
            self.bar.update(planned_s)
            self.bar.write(line, file=sys.stderr)
        elif self.enabled:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done_s * (self.total - self.done_s) if self.done_s else float("nan")
            print(f"[{100 * self.done_s / self.total:3.0f}% {elapsed:4.0f}s, ETA {eta:4.0f}s] {line}",
                  file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def run_cases(cases: List[Tuple[str, Case]], device: torch.device, budget_s: float,
              backends: Optional[Sequence[str]] = None, peers: Optional[set] = None,
              progress: bool = True) -> List[dict]:
    """Time every (family, case) pair; one result row per implementation."""
    plan = []
    for family, case in cases:
        for impl, (fn, forced) in expand_impls(case, backends).items():
            base = impl.split("[")[0]
            if peers is not None and not is_pyattn(impl) and base not in peers:
                continue
            plan.append((family, case, impl, fn, forced, estimate_impl_s(case, base, device, budget_s)))
    bar = _Progress(sum(p[-1] for p in plan), progress)
    rows = []
    try:
        for family, case, impl, fn, forced, planned in plan:
            if case.lazy_notes is not None:
                try:
                    case.notes.update(case.lazy_notes())
                except Exception as exc:  # notes are best effort
                    case.notes["notes_error"] = f"{type(exc).__name__}: {exc}"[:120]
                case.lazy_notes = None
            bar.start(f"{case.op} {case.mode} {case.config} {impl}")
            row = run_impl(case, family, impl, fn, forced, device, budget_s)
            rows.append(row)
            bar.done(planned, _row_line(row))
    finally:
        bar.close()
    return rows


def _row_line(r: dict) -> str:
    head = f"{r['op']} {r['mode']} {r['config']} {r['dtype']} {r['impl']}"
    if r["status"] == "ok":
        flag = "  (noisy)" if r["noisy"] else ""
        return f"{head}: {r['median_ms']:.3f} ms ±{100 * r['spread']:.0f}% [{r['backend']}]{flag}"
    return f"{head}: {r['status']} ({r['reason'][:160]})"
