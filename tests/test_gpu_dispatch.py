"""Dispatch on CUDA tensors never falls back to the reference backend unless asked (runs without a
GPU: the device is a ``torch.device("cuda")`` object and the environment checks are patched)."""
import pytest
import torch

import pyattn
from pyattn import _build, _dispatch

CUDA = torch.device("cuda")


@pytest.fixture
def no_gpu_backends(monkeypatch):
    """Both GPU backends unavailable, as after a failed CUDA build on a machine without Triton."""
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device, family: "triton: no GPU driver")
    monkeypatch.setattr(_build, "load_cuda_extension", lambda: "build failed: nvcc error (see the build log)")
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)


@pytest.mark.parametrize("family, features", [("attention", (torch.bfloat16, 64)), ("rms_norm", (torch.float16,)),
                                              ("glu", (torch.bfloat16,))])
def test_cuda_tensor_raises_instead_of_reference(no_gpu_backends, family, features):
    with pytest.raises(pyattn.BackendUnavailableError) as info:
        _dispatch.select_backend(family, family, CUDA, None, features)
    reasons = info.value.reasons
    assert reasons["triton"] == "triton: no GPU driver"
    assert reasons["cuda"].startswith("build failed")
    assert "backend='reference'" in reasons["reference"]
    assert "build failed" in str(info.value)


def test_cuda_reference_when_asked(no_gpu_backends, monkeypatch):
    assert _dispatch.select_backend("rms_norm", "rms_norm", CUDA, "reference", (torch.float32,)) == "reference"
    monkeypatch.setenv("PYATTN_BACKEND", "reference")
    assert _dispatch.select_backend("rms_norm", "rms_norm", CUDA, None, (torch.float32,)) == "reference"


def test_cuda_float64_names_the_reference(monkeypatch):
    """float64 runs on the reference backend only: on CUDA tensors that must be asked for."""
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device, family: None)
    monkeypatch.setattr(_build, "load_cuda_extension", lambda: None)
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)
    with pytest.raises(pyattn.BackendUnavailableError, match="float64 is supported by the reference backend only"):
        _dispatch.select_backend("attention", "attention", CUDA, None, (torch.float64, 64))
    assert _dispatch.select_backend("attention", "attention", CUDA, None, (torch.bfloat16, 64)) == "triton"


def test_cuda_picks_cuda_backend_when_triton_is_missing(monkeypatch):
    monkeypatch.setattr(_dispatch, "triton_unavailable_reason", lambda device, family: "triton cannot be imported")
    monkeypatch.setattr(_build, "load_cuda_extension", lambda: None)
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)
    assert _dispatch.select_backend("glu", "glu", CUDA, None, (torch.float16,)) == "cuda"


def test_cpu_keeps_reference_fallback(monkeypatch):
    monkeypatch.setattr(_build, "load_cpu_extension", lambda family: "build failed: no compiler")
    monkeypatch.delenv("PYATTN_BACKEND", raising=False)
    assert _dispatch.select_backend("rms_norm", "rms_norm", torch.device("cpu"), None, (torch.float32,)) == "reference"
