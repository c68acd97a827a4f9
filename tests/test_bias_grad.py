"""Gradients of a broadcast additive bias: reduced to the bias's own shape on every backend, within
the tolerance rule, and without a (B, H, Nq, Nk) buffer when the bias is shared by the batch."""
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import pyattn
from helpers import assert_tolerance, cpu_backends, skip_unless_backend

B, H, N, D = 3, 2, 24, 16
SHAPES = [(1, H, N, N), (N, N), (B, 1, N, N), (B, H, N, N), (H, 1, N), (1, 1, 1, N)]


def _ref(q, k, v, bias):
    s = q @ k.transpose(-1, -2) * D ** -0.5 + bias
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_broadcast_bias_gradient(backend, shape):
    skip_unless_backend(backend)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    bias = torch.randn(shape)
    g = torch.randn(B, H, N, D)
    grads = {}
    for name, dt, fn in (("pyattn", torch.float32, lambda q, k, v, b: pyattn.attention(q, k, v, bias=b, backend=backend)),
                         ("torch32", torch.float32, _ref), ("torch64", torch.float64, _ref)):
        ins = [t.detach().to(dt).clone().requires_grad_() for t in (q, k, v, bias)]
        fn(*ins).backward(g.to(dt))
        grads[name] = [t.grad for t in ins]
    for i, what in enumerate(("dq", "dk", "dv", "dbias")):
        assert grads["pyattn"][i].shape == grads["torch64"][i].shape
        assert_tolerance(what, grads["pyattn"][i].double(), grads["torch32"][i].double(), grads["torch64"][i], factor=3.0)
    assert bias.grad is None  # the user's tensor is not touched


def _largest_allocation(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_batch_shared_bias_gradient_needs_no_full_buffer():
    Bm, Hm, Nm, Dm = 8, 4, 256, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(Bm, Hm, Nm, Dm, requires_grad=True) for _ in range(3))
    bias = torch.randn(1, Hm, Nm, Nm, requires_grad=True)
    out = pyattn.attention(q, k, v, bias=bias, backend="cpu")
    full = Bm * Hm * Nm * Nm * 4  # an fp32 (B, H, Nq, Nk) gradient: 8 MiB
    largest = _largest_allocation(lambda: out.sum().backward())
    assert bias.grad is not None and bias.grad.shape == bias.shape
    assert largest < full // 2, f"backward allocated {largest} bytes at once (a full bias gradient is {full})"


def test_head_shared_bias_gradient_needs_no_full_buffer():
    Bm, Hm, Nm, Dm = 8, 4, 256, 16
    torch.manual_seed(0)
    q, k, v = (torch.randn(Bm, Hm, Nm, Dm, requires_grad=True) for _ in range(3))
    bias = torch.randn(Bm, 1, Nm, Nm, requires_grad=True)
    out = pyattn.attention(q, k, v, bias=bias, backend="cpu")
    full = Bm * Hm * Nm * Nm * 4
    largest = _largest_allocation(lambda: out.sum().backward())
    assert largest < full // 2, f"backward allocated {largest} bytes at once (a full bias gradient is {full})"
