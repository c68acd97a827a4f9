"""Backend selection shared by every op family.

Backends: ``triton`` (GPU; CPU tensors only under the Triton interpreter), ``cuda`` (csrc/cuda),
``cpu`` (csrc/cpu) and ``reference`` (plain PyTorch). The choice is made per call: the caller's
``backend=`` argument, else ``PYATTN_BACKEND``, else the first backend in the device's priority
order that accepts the inputs. When nothing fits, the error says why each backend was rejected.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Optional

import torch

from . import _build

BACKEND_NAMES = ("triton", "cuda", "cpu", "reference")
_DEFAULT_ORDER = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "reference")}
_NO_SILENT_REFERENCE = ("not chosen automatically for CUDA tensors (plain PyTorch, O(N^2) memory); "
                        "pass backend='reference' or set PYATTN_BACKEND=reference to run it")


class BackendUnavailableError(RuntimeError):
    """No backend can run the requested op on these inputs; ``reasons`` maps backend -> why."""

    def __init__(self, op: str, reasons: Dict[str, str]):
        self.reasons = dict(reasons)
        lines = "\n".join(f"  {name}: {why}" for name, why in reasons.items())
        super().__init__(f"pyattn.{op}: no backend can run these inputs:\n{lines}")


def triton_unavailable_reason(device: torch.device, family: str) -> Optional[str]:
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError or a broken install
        return f"triton cannot be imported ({exc.__class__.__name__}: {exc})"
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return "CPU tensors run Triton kernels only under the interpreter (set TRITON_INTERPRET=1 before import)"
    if device.type not in ("cpu", "cuda"):
        return f"device type {device.type!r} is not supported"
    try:
        importlib.import_module(f"pyattn.kernels.{family}")
    except Exception as exc:
        return f"pyattn.kernels.{family} failed to import ({exc.__class__.__name__}: {exc})"
    return None


def environment_reason(name: str, family: str, device: torch.device) -> Optional[str]:
    """Why backend ``name`` cannot run ``family`` on ``device`` at all (None when it can)."""
    if name == "reference":
        return None
    if name == "triton":
        return triton_unavailable_reason(device, family)
    if name == "cpu":
        if device.type != "cpu":
            return f"runs on CPU tensors only, got device {device}"
        return _build.load_cpu_extension(family)
    if name == "cuda":
        if device.type != "cuda":
            return f"runs on CUDA tensors only, got device {device}"
        return _build.load_cuda_extension()
    return f"unknown backend {name!r}"


def requested_backend(backend: Optional[str]) -> Optional[str]:
    requested = backend if backend is not None else (os.environ.get("PYATTN_BACKEND") or None)
    if requested is not None and requested not in BACKEND_NAMES:
        source = "backend" if backend is not None else "PYATTN_BACKEND"
        raise ValueError(f"{source} must be one of {BACKEND_NAMES} or None, got {requested!r}")
    return requested


# family -> fn(backend_name, *features) -> reason or None
_INPUT_CHECKS: Dict[str, Callable[..., Optional[str]]] = {}


def register_input_check(family: str):
    """Register the per-family function telling why a backend cannot take given input features."""

    def deco(fn):
        _INPUT_CHECKS[family] = fn
        return fn

    return deco


def select_backend(op: str, family: str, device: torch.device, backend: Optional[str], features: tuple = ()) -> str:
    """Pick the backend for one call.

    ``features`` is a tuple of plain values (dtype, head dim, flags) describing the inputs; the
    family's registered input check says why a backend cannot take them. It is asked before the
    environment check so that a rejected backend is never compiled for nothing. Under
    ``torch.compile`` the choice is evaluated once at trace time and treated as a constant.
    """
    requested = requested_backend(backend)
    return _select_constant(op, family, device, requested, tuple(features))


@torch.compiler.assume_constant_result
def _select_constant(op: str, family: str, device: torch.device, requested: Optional[str], features: tuple) -> str:
    order = (requested,) if requested else _DEFAULT_ORDER.get(device.type, ("reference",))
    input_check = _INPUT_CHECKS.get(family)
    reasons: Dict[str, str] = {}
    for name in order:
        why = (input_check(name, *features) if input_check else None) or environment_reason(name, family, device)
        if why is None:
            return name
        reasons[name] = why
    if device.type == "cuda" and not requested:
        reasons["reference"] = _NO_SILENT_REFERENCE
    raise BackendUnavailableError(op, reasons)


def backend_status(family: str, device="cpu") -> Dict[str, Optional[str]]:
    """For each backend, None if it can run ``family`` on ``device``, else the reason it cannot."""
    device = torch.device(device)
    return {name: environment_reason(name, family, device) for name in BACKEND_NAMES}


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def direct_call_ok(*tensors: Optional[torch.Tensor]) -> bool:
    """True when an op may run its backend directly instead of through its ``torch.library`` custom op.

    The custom op (autograd wrapper, redispatch) costs about 20 us of Python per call, which
    dominates decode-size inputs. It is only needed for autograd, for tracing (``torch.compile``,
    ``make_fx``, fake tensors) and for tensor subclasses, so the direct call requires plain tensors
    (or parameters, e.g. a module's weight), no gradient to record and no active torch function or
    dispatch mode.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0 \
            or torch._C._is_torch_function_mode_enabled():
        return False
    grad = torch.is_grad_enabled()
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES or (grad and t.requires_grad):
            return False
    return True
