"""Property tests: rms_norm, glu and glu_ffn on drawn shapes, layouts, dtypes and arguments,
every available kernel backend against the fp64 reference (see tests/properties.py)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import pyattn
from properties import args, check_backends, property_settings

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
LEADING = st.lists(st.integers(0, 3), min_size=0, max_size=2)  # few rows: the Triton interpreter is slow


@property_settings(max_examples=15)
@given(data=st.data(), lead=LEADING, n=st.sampled_from([1, 2, 7, 33, 64, 130]), dtype=DTYPES,
       with_weight=st.booleans(), with_residual=st.booleans(), eps=st.sampled_from([1e-6, 1e-2]))
def test_rms_norm(data, lead, n, dtype, with_weight, with_residual, eps):
    shape = (*lead, n)
    x = data.draw(args(shape), label="x")
    tensors = [x]
    if with_weight:
        tensors.append(data.draw(args((n,), scale=0.5, offset=1.0), label="weight"))
    if with_residual:
        tensors.append(data.draw(args(shape), label="residual"))

    def fn(backend, x, *rest):
        w = rest[0] if with_weight else None
        r = rest[-1] if with_residual else None
        out = pyattn.rms_norm(x, w, eps, residual=r, backend=backend)
        return out if isinstance(out, tuple) else (out,)

    check_backends("rms_norm", fn, tensors, dtype, n_grad_outputs=2 if with_residual else 1)


def test_rms_norm_zero_rows_strided_last_dim():
    # the finding: zero rows and a strided last dim raised a C++ RuntimeError on the cpu backend
    w = torch.ones(64)
    for backend in ["reference"] + [b for b in ("cpu", "triton") if pyattn.backend_status("rms_norm")[b] is None]:
        y = pyattn.rms_norm(torch.randn(0, 128)[:, ::2], w, backend=backend)
        assert y.shape == (0, 64)
        x = torch.randn(0, 128)[:, ::2].requires_grad_()
        y, h = pyattn.rms_norm(x, w, residual=torch.randn(0, 64), backend=backend)
        assert h.shape == (0, 64)


@property_settings(max_examples=12)
@given(data=st.data(), lead=LEADING, n=st.sampled_from([1, 3, 16, 40]), dtype=DTYPES,
       activation=st.sampled_from(["silu", "gelu", "gelu_tanh", "relu", "sigmoid"]))
def test_glu(data, lead, n, dtype, activation):
    shape = (*lead, n)
    gate = data.draw(args(shape), label="gate")
    up = data.draw(args(shape), label="up")
    check_backends("glu", lambda b, g, u: pyattn.glu(g, u, activation, backend=b), [gate, up], dtype)


@property_settings(max_examples=15)
@given(data=st.data(), lead=st.lists(st.integers(0, 4), min_size=1, max_size=2), hidden=st.sampled_from([1, 8, 24]),
       inter=st.sampled_from([1, 4, 20]), h_out=st.sampled_from([1, 8, 24]), dtype=DTYPES,
       activation=st.sampled_from(["silu", "gelu", "relu"]), bias_gate_up=st.booleans(), bias_down=st.booleans())
def test_glu_ffn(data, lead, hidden, inter, h_out, dtype, activation, bias_gate_up, bias_down):
    x = data.draw(args((*lead, hidden)), label="x")
    wgu = data.draw(args((2 * inter, hidden), scale=hidden ** -0.5), label="w_gate_up")
    wd = data.draw(args((h_out, inter), scale=inter ** -0.5), label="w_down")
    tensors = [x, wgu, wd]
    if bias_gate_up:
        tensors.append(data.draw(args((2 * inter,), scale=0.1), label="bias_gate_up"))
    if bias_down:
        tensors.append(data.draw(args((h_out,), scale=0.1), label="bias_down"))

    def fn(backend, x, wgu, wd, *biases):
        it = iter(biases)
        bgu = next(it) if bias_gate_up else None
        bd = next(it) if bias_down else None
        return pyattn.glu_ffn(x, wgu, wd, activation=activation, bias_gate_up=bgu, bias_down=bd, backend=backend)

    # matmuls in low precision: the reduction order of the GEMMs differs between backends
    check_backends("glu", fn, tensors, dtype, fwd_floor=1e-4 if dtype == torch.float32 else 1e-2,
                   bwd_floor=1e-3 if dtype == torch.float32 else 5e-2)
