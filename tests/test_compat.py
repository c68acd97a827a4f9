"""Smoke test of every op family on every CPU-runnable backend (cpu, triton under the interpreter).

Small shapes, forward and backward against the reference backend. It is the suite that
``.ci/run``'s compatibility job runs on the newest torch and triton pip resolves, next to
tests/test_build.py; the full suite covers the same ops in depth on the pinned versions.
"""
from __future__ import annotations

import pytest
import torch

import pyattn
from helpers import cpu_backends

BACKENDS = [b for b in cpu_backends() if b != "reference"]


def _grads(fn, inputs, backend):
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves, backend=backend)
    out = out[0] if isinstance(out, tuple) else out
    torch.manual_seed(1)
    dout = torch.randn_like(out)
    diff = [t for t in leaves if t.requires_grad]
    return out.detach(), torch.autograd.grad(out, diff, dout)


def _compare(fn, inputs, backend, atol=2e-4):
    out, grads = _grads(fn, inputs, backend)
    ref, ref_grads = _grads(fn, inputs, "reference")
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-3)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=atol * 5, rtol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm(backend):
    x, w = torch.randn(5, 48), torch.randn(48)
    _compare(lambda x, w, backend: pyattn.rms_norm(x, w, backend=backend), (x, w), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_and_glu_ffn(backend):
    g, u = torch.randn(6, 32), torch.randn(6, 32)
    _compare(lambda g, u, backend: pyattn.glu(g, u, "silu", backend=backend), (g, u), backend)
    x, wgu, wd = torch.randn(6, 32) * 0.5, torch.randn(48, 32) * 0.2, torch.randn(32, 24) * 0.2
    _compare(lambda x, a, b, backend: pyattn.glu_ffn(x, a, b, activation="silu", backend=backend), (x, wgu, wd),
             backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["dense", "causal", "window", "bias"])
def test_attention(backend, case):
    q, k, v = torch.randn(1, 4, 37, 32), torch.randn(1, 2, 45, 32), torch.randn(1, 2, 45, 32)
    kwargs = {"dense": {}, "causal": {"causal": True}, "window": {"window": (8, 0)}}.get(case, {})
    if case == "bias":
        bias = torch.randn(1, 4, 37, 45)
        _compare(lambda q, k, v, b, backend: pyattn.attention(q, k, v, bias=b, backend=backend), (q, k, v, bias),
                 backend)
        return
    _compare(lambda q, k, v, backend: pyattn.attention(q, k, v, backend=backend, **kwargs), (q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(backend):
    cu = torch.tensor([0, 5, 17, 30], dtype=torch.int32)
    q, k, v = torch.randn(30, 4, 16), torch.randn(30, 2, 16), torch.randn(30, 2, 16)
    _compare(lambda q, k, v, backend: pyattn.varlen_attention(q, k, v, cu, cu, 13, 13, causal=True, backend=backend),
             (q, k, v), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sdpa_with_bool_mask(backend, monkeypatch):
    monkeypatch.setenv("PYATTN_BACKEND", backend)
    q, k, v = torch.randn(2, 3, 9, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 16)
    mask = torch.rand(9, 11) > 0.3
    mask[:, 0] = True
    out = pyattn.sdpa(q, k, v, attn_mask=mask)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-3)
