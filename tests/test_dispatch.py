import pytest
import torch

import pyattn
from pyattn import _dispatch


def test_unavailable_backend_lists_reasons():
    x = torch.randn(2, 8)
    with pytest.raises(pyattn.BackendUnavailableError) as info:
        pyattn.rms_norm(x, None, backend="cuda")
    assert "cuda" in info.value.reasons
    assert "CUDA tensors only" in str(info.value)


def test_float64_only_on_reference():
    x = torch.randn(2, 8, dtype=torch.float64)
    with pytest.raises(pyattn.BackendUnavailableError, match="float64 is supported by the reference backend only"):
        pyattn.rms_norm(x, None, backend="cpu")
    y = pyattn.rms_norm(x, None)  # default dispatch falls through to the reference
    assert y.dtype == torch.float64


def test_env_override(monkeypatch):
    seen = []
    real = _dispatch.select_backend

    def spy(*args, **kwargs):
        name = real(*args, **kwargs)
        seen.append(name)
        return name

    monkeypatch.setattr(_dispatch, "select_backend", spy)
    monkeypatch.setenv("PYATTN_BACKEND", "reference")
    pyattn.rms_norm(torch.randn(2, 8), None)
    monkeypatch.setenv("PYATTN_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="PYATTN_BACKEND must be one of"):
        pyattn.rms_norm(torch.randn(2, 8), None)
    assert seen == ["reference"]


def test_default_cpu_choice_is_cpu_backend():
    status = pyattn.backend_status("rms_norm", "cpu")
    assert status["reference"] is None
    assert status["cuda"] is not None
    # the C++ backend builds on this machine (a compiler is required by the test setup)
    assert status["cpu"] is None, status["cpu"]
    name = _dispatch.select_backend("rms_norm", "rms_norm", torch.device("cpu"), None, (torch.float32,))
    assert name == "cpu"


def test_missing_compiler_degrades(monkeypatch, tmp_path):
    """A failed C++ build makes the cpu backend unavailable with a reason; nothing breaks."""
    from pyattn import _build

    monkeypatch.setattr(_build, "_loaded", {})
    monkeypatch.setattr(_build, "_warned_errors", set())
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PYATTN_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.warns(RuntimeWarning, match="build failed.*other backends"):
        reason = _build.load_cpu_extension("rms_norm")
    assert reason is not None and "build failed" in reason
    assert "no-such-compiler" in reason, reason  # the compiler's own complaint, not ninja's summary
    y = pyattn.rms_norm(torch.randn(3, 8), None)  # falls back to the reference
    assert y.shape == (3, 8)


def test_direct_call_only_without_autograd_or_tracing():
    from pyattn._dispatch import direct_call_ok
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = torch.randn(2, 3)
    w = torch.nn.Parameter(torch.ones(3))
    assert direct_call_ok(x, None)
    assert not direct_call_ok(x, w)  # the weight needs a gradient
    with torch.no_grad():
        assert direct_call_ok(x, w)  # a module's parameter in inference
    with FakeTensorMode():
        assert not direct_call_ok(x)
