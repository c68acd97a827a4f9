"""Shared test helpers: the tolerance rule, sweeps and layout helpers."""
from __future__ import annotations

import os

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HAS_GPU = torch.cuda.is_available()
DEVICE = "cuda" if HAS_GPU else "cpu"


def triton_usable() -> bool:
    if HAS_GPU:
        return True
    return os.environ.get("TRITON_INTERPRET") == "1"


def cpu_backends():
    """Backends that run on CPU tensors here (triton through the interpreter)."""
    names = ["cpu", "reference"]
    try:
        import triton  # noqa: F401
        if triton_usable():
            names.append("triton")
    except ImportError:
        pass
    return names


def backends_for_device():
    if HAS_GPU:
        return ["triton", "cuda", "reference"]
    return cpu_backends()


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return (a.double() - b.double()).abs().max().item()


def assert_tolerance(name: str, out: torch.Tensor, ref_lowp: torch.Tensor, ref64: torch.Tensor, *,
                     factor: float = 2.0, floor: float = 1e-5) -> None:
    """The pyattn tolerance rule: error of ``out`` against the fp64 reference must be at most
    ``factor`` x the error of PyTorch in the same low dtype (``ref_lowp``) plus a tiny floor."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    base = max_err(ref_lowp, ref64)
    assert err <= factor * base + floor, f"{name}: max error {err:.3e} > {factor} x PyTorch error {base:.3e} + {floor}"


def strided_like(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous layout (every other element of a 2x wider buffer)."""
    wide = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    view = wide[..., ::2]
    view.copy_(t)
    assert not view.is_contiguous() or t.shape[-1] <= 1
    return view


def skip_unless_backend(backend: str):
    if backend == "triton" and not triton_usable():
        pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
