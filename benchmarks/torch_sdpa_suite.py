"""PyTorch's own SDPA tests as an acceptance test for ``pyattn.sdpa``.

Runs the CPU test classes of a copy of PyTorch's ``test/test_transformers.py`` twice, each in a
fresh interpreter:

* control: stock torch;
* pyattn:  ``torch.nn.functional.scaled_dot_product_attention`` (and the name the test module
  imported) routed to ``pyattn.sdpa``. Calls made while only torch's math backend is enabled
  (``sdpa_kernel(SDPBackend.MATH)``, the tests' reference) and direct ``torch.ops.aten`` calls
  stay on torch, so torch's math path remains the reference.

and prints pass/fail per class, then every test that fails only with pyattn, matched against the
accepted differences below (with the reason) or marked UNEXPECTED. Exit status 1 when a failure
is unexpected. nn.MultiheadAttention's and nn.Transformer*'s Python (slow) path calls
F.scaled_dot_product_attention, so TestTransformersCPU covers the MHA route too.

The test file is not shipped with torch or with this repository; fetch the pinned revision:

    mkdir -p /tmp/torch_tests && curl -L -o /tmp/torch_tests/test_transformers.py \\
      https://raw.githubusercontent.com/pytorch/pytorch/00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b/test/test_transformers.py
    python benchmarks/torch_sdpa_suite.py /tmp/torch_tests/test_transformers.py

It imports only ``torch.testing._internal`` (shipped inside torch) plus one helper module of
torch's test folder (``test_cpp_extensions_open_device_registration``, used by the PrivateUse1
class), which is stubbed when absent.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
import unittest
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

PINNED_REVISION = "00030eb8e81f911c48c4d7634fa6b8bb2fae1a1b"
FETCH_URL = f"https://raw.githubusercontent.com/pytorch/pytorch/{PINNED_REVISION}/test/test_transformers.py"
DEFAULT_CLASSES = ("TestTransformersCPU", "TestSDPAFailureModesCPU", "TestSDPACPU", "TestAttnBiasCPU")

# (test-id regex, reason): failures with pyattn that are differences of torch's internals, not of
# SDPA's contract. A test id is "Class.test_name".
ACCEPTED: List[Tuple[str, str]] = [
    (r"dropout_p_0_[1-9]|dropout_0_[1-9]",
     "dropout random stream: pyattn draws its own dropout mask (same distribution, seeded from torch's RNG), "
     "so a test that replays torch's stream with freeze_rng_state sees a different mask"),
    (r"fused_sdp_choice|sdp_choice",
     "backend choice: asks torch._fused_sdp_choice which torch kernel it would pick"),
    (r"test_mask_check_fastpath|test_disable_fastpath|fastpath",
     "fused fast path: patches or compares torch's native MHA / encoder fast-path kernels"),
]

_STUB_MODULE = "test_cpp_extensions_open_device_registration"


def match_accepted(test_id: str, accepted: Sequence[Tuple[str, str]] = ACCEPTED) -> Optional[str]:
    """The reason a pyattn-only failure is accepted, or None when it is not on the list."""
    for pattern, reason in accepted:
        if re.search(pattern, test_id):
            return reason
    return None


def classify(control: Dict[str, dict], routed: Dict[str, dict],
             accepted: Sequence[Tuple[str, str]] = ACCEPTED) -> List[Tuple[str, str, str]]:
    """(test id, kind, detail) for every test that did not pass with pyattn.

    kind: "torch" (fails on stock torch too), "accepted" (detail = reason) or "UNEXPECTED"
    (detail = the failure's last line).
    """
    rows = []
    for tid, res in sorted(routed.items()):
        if res["outcome"] not in ("failed", "error"):
            continue
        if control.get(tid, {}).get("outcome") in ("failed", "error"):
            rows.append((tid, "torch", "fails on stock torch too"))
            continue
        reason = match_accepted(tid, accepted)
        rows.append((tid, "accepted", reason) if reason else (tid, "UNEXPECTED", res.get("message", "")))
    return rows


def summarize(results: Dict[str, dict]) -> Dict[str, Counter]:
    """Per class: Counter of outcomes (passed / failed / error / skipped)."""
    out: Dict[str, Counter] = {}
    for tid, res in results.items():
        out.setdefault(tid.split(".")[0], Counter())[res["outcome"]] += 1
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run PyTorch's CPU SDPA test classes on stock torch and with "
                    "F.scaled_dot_product_attention routed to pyattn.sdpa.",
        epilog=f"Fetch the test file first (pinned revision {PINNED_REVISION}):\n"
               f"  mkdir -p /tmp/torch_tests && curl -L -o /tmp/torch_tests/test_transformers.py {FETCH_URL}\n"
               f"then: python benchmarks/torch_sdpa_suite.py /tmp/torch_tests/test_transformers.py",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("test_file", type=Path, help="path to a copy of PyTorch's test/test_transformers.py")
    p.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES),
                   help=f"instantiated test classes to run (default: {' '.join(DEFAULT_CLASSES)})")
    p.add_argument("-k", dest="keyword", action="append", default=[],
                   help="run only tests whose id contains this substring (repeat: any of them)")
    p.add_argument("--skip", action="append", default=[],
                   help="leave out tests whose id contains this substring (repeat: any of them)")
    p.add_argument("--mode", choices=("both", "control", "pyattn"), default="both")
    p.add_argument("--json", type=Path, default=None, help="also write every test's outcome here")
    p.add_argument("--worker", choices=("control", "pyattn"), help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.test_file.is_file():
        p.error(f"test_file {args.test_file} does not exist; fetch it with:\n  curl -L -o {args.test_file} {FETCH_URL}")
    return args


# ---- worker: runs in its own interpreter ------------------------------------------------------------

class _Recorder(unittest.TestResult):
    def __init__(self):
        super().__init__()
        self.records: Dict[str, dict] = {}
        self._t0 = 0.0

    @staticmethod
    def _id(test) -> str:
        return ".".join(test.id().split(".")[-2:])

    def startTest(self, test):
        super().startTest(test)
        self._t0 = time.perf_counter()
        _CALLS["pyattn"] = 0

    def _put(self, test, outcome, message=""):
        self.records[self._id(test)] = {"outcome": outcome, "message": message[-300:],
                                        "seconds": round(time.perf_counter() - self._t0, 3),
                                        "pyattn_calls": _CALLS["pyattn"]}

    def addSuccess(self, test):
        self._put(test, "passed")

    def addFailure(self, test, err):
        self._put(test, "failed", f"{err[0].__name__}: {str(err[1]).strip().splitlines()[0] if str(err[1]).strip() else ''}")

    def addError(self, test, err):
        self._put(test, "error", f"{err[0].__name__}: {str(err[1]).strip().splitlines()[0] if str(err[1]).strip() else ''}")

    def addSkip(self, test, reason):
        self._put(test, "skipped", str(reason))

    def addExpectedFailure(self, test, err):
        self._put(test, "passed", "expected failure")

    def addUnexpectedSuccess(self, test):
        self._put(test, "failed", "unexpected success")


_CALLS = {"pyattn": 0}  # calls routed to pyattn.sdpa during the current test
_TORCH_SDPA = []  # the stock F.scaled_dot_product_attention, once routing is installed


def routed_sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
                dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
                enable_gqa: bool = False) -> Tensor:
    """What F.scaled_dot_product_attention becomes: SDPA's exact signature, so TorchScript (which
    compiles nn.MultiheadAttention's call to it) and torch.compile both take it."""
    return _route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@torch.jit.ignore
def _route(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
           is_causal: bool, scale: Optional[float], enable_gqa: bool) -> Tensor:
    """pyattn.sdpa, except while only torch's math backend is enabled (``sdpa_kernel(MATH)``: the
    tests' reference), where torch's own SDPA runs."""
    import pyattn
    from torch.nn.attention.bias import CausalBias
    b = torch.backends.cuda
    math_only = b.math_sdp_enabled() and not (b.flash_sdp_enabled() or b.mem_efficient_sdp_enabled()
                                              or b.cudnn_sdp_enabled())
    if not torch.compiler.is_compiling():
        if math_only:
            if isinstance(attn_mask, CausalBias):  # its dispatcher calls back through F (this router)
                return CausalBias._dispatch(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            return _TORCH_SDPA[0](query, key, value, attn_mask, dropout_p, is_causal, scale=scale,
                                  enable_gqa=enable_gqa)
        _CALLS["pyattn"] += 1
    return pyattn.sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


def _worker(args) -> None:
    folder = str(args.test_file.resolve().parent)
    sys.path.insert(0, folder)
    sys.argv = [str(args.test_file)]  # torch's common_utils parses sys.argv when imported
    os.environ.setdefault("PYTORCH_PRINT_REPRO_ON_FAILURE", "0")
    try:
        __import__(_STUB_MODULE)
    except Exception:
        stub = types.ModuleType(_STUB_MODULE)
        stub.remove_build_path = lambda: None
        stub.generate_faked_module = lambda: types.ModuleType("foo")
        sys.modules[_STUB_MODULE] = stub
    import importlib.util

    import torch.nn.functional as F
    router = None
    if args.worker == "pyattn":
        _TORCH_SDPA.append(F.scaled_dot_product_attention)
        router = routed_sdpa
        F.scaled_dot_product_attention = router
    spec = importlib.util.spec_from_file_location("test_transformers", args.test_file)
    module = importlib.util.module_from_spec(spec)
    sys.modules["test_transformers"] = module
    spec.loader.exec_module(module)
    if router is not None and hasattr(module, "scaled_dot_product_attention"):
        module.scaled_dot_product_attention = router  # the test file imports the name directly
    loader = unittest.TestLoader()
    suite = unittest.TestSuite()
    for name in args.classes:
        cls = getattr(module, name, None)
        if cls is None:
            raise SystemExit(f"test class {name} not in {args.test_file}")
        for test in loader.loadTestsFromTestCase(cls):
            tid = ".".join(test.id().split(".")[-2:])
            if (not args.keyword or any(k in tid for k in args.keyword)) and not any(k in tid for k in args.skip):
                suite.addTest(test)
    result = _Recorder()
    suite.run(result)
    info = {"torch": torch.__version__, "mode": args.worker, "results": result.records}
    args.out.write_text(json.dumps(info))


# ---- driver -------------------------------------------------------------------------------------------

def _run_mode(args, mode: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{mode}.json"
        cmd = [sys.executable, os.path.abspath(__file__), str(args.test_file), "--worker", mode, "--out", str(out),
               "--classes", *args.classes] + [a for k in args.keyword for a in ("-k", k)] \
            + [a for k in args.skip for a in ("--skip", k)]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0 or not out.exists():
            raise SystemExit(f"{mode} run failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        info = json.loads(out.read_text())
    info["seconds"] = round(time.perf_counter() - t0, 1)
    return info


def _print_table(runs: Dict[str, dict]) -> None:
    classes = sorted({c for info in runs.values() for c in summarize(info["results"])})
    print(f"{'class':28s} " + " ".join(f"{m + ' pass/fail/skip':>24s}" for m in runs))
    for c in classes:
        cells = []
        for info in runs.values():
            s = summarize(info["results"]).get(c, Counter())
            cells.append(f"{s['passed']:>8d}/{s['failed'] + s['error']:d}/{s['skipped']:d}".rjust(24))
        print(f"{c:28s} " + " ".join(cells))
    if "pyattn" in runs:
        used = sum(1 for r in runs["pyattn"]["results"].values() if r["pyattn_calls"] and r["outcome"] == "passed")
        print(f"pyattn-routed tests that called pyattn.sdpa and passed: {used}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        _worker(args)
        return 0
    modes = ("control", "pyattn") if args.mode == "both" else (args.mode,)
    runs = {m: _run_mode(args, m) for m in modes}
    first = next(iter(runs.values()))
    print(f"torch {first['torch']}; test file {args.test_file} (pinned revision {PINNED_REVISION}); "
          + ", ".join(f"{m} run {info['seconds']} s" for m, info in runs.items()))
    _print_table(runs)
    unexpected = 0
    if "pyattn" in runs:
        control = runs.get("control", {"results": {}})["results"]
        rows = classify(control, runs["pyattn"]["results"])
        print(f"\ntests that fail with pyattn: {len(rows)}")
        for tid, kind, detail in rows:
            print(f"  [{kind}] {tid}: {detail}")
        unexpected = sum(kind == "UNEXPECTED" for _, kind, _ in rows)
        print(f"unexpected: {unexpected}")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    return 1 if unexpected else 0


if __name__ == "__main__":
    sys.exit(main())
