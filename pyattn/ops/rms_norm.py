"""``pyattn.rms_norm``: RMSNorm with an optional fused residual add, on every backend."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._autocast import autocast_dtype
from .._validate import FLOAT_DTYPES, check_backend_arg, check_positive, check_same_device, check_same_dtype, \
    check_shape, check_tensor
from ._layout import unit_last_stride
from ..reference.rms_norm import rms_norm_backward_reference, rms_norm_reference

_MAX_HIDDEN = 65536


# --------------------------------------------------------------------------------------------
# backend implementations on 2-D views: x (M, N) with unit column stride, weight fp32 (N,) or None
def _forward_impl(backend: str, x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.rms_norm_fwd(x, weight, residual, eps)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.rms_norm_fwd(x, weight, residual, eps)
    if backend == "triton":
        from ..kernels import rms_norm as tk
        return tk.rms_norm_forward(x, weight, residual, eps)
    y, h, rstd = rms_norm_reference(x, weight, eps, residual)
    h = h.clone() if residual is not None else x.new_empty((0,))
    return y, h, rstd


def _backward_impl(backend: str, dy: Tensor, xin: Tensor, weight: Optional[Tensor], rstd: Tensor, dh: Optional[Tensor]):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.rms_norm_bwd(dy, xin, weight, rstd, dh)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.rms_norm_bwd(dy, xin, weight, rstd, dh)
    if backend == "triton":
        from ..kernels import rms_norm as tk
        return tk.rms_norm_backward(dy, xin, weight, rstd, dh)
    dx, dw = rms_norm_backward_reference(dy, xin, weight, rstd, dh)
    return dx, (dw.float() if dw is not None else xin.new_empty((0,), dtype=torch.float32))


# --------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, differentiable through register_autograd
@torch.library.custom_op("pyattn::rms_norm_fwd", mutates_args=())
def rms_norm_fwd(x: Tensor, weight: Optional[Tensor], residual: Optional[Tensor], eps: float,
                 backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(backend, x, weight, residual, eps)


@rms_norm_fwd.register_fake
def _(x, weight, residual, eps, backend):
    M, N = x.shape
    h = x.new_empty((M, N) if residual is not None else (0,))
    return x.new_empty((M, N)), h, x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("pyattn::rms_norm_bwd", mutates_args=())
def rms_norm_bwd(dy: Tensor, xin: Tensor, weight: Optional[Tensor], rstd: Tensor, dh: Optional[Tensor],
                 backend: str) -> Tuple[Tensor, Tensor]:
    return _backward_impl(backend, dy, xin, weight, rstd, dh)


@rms_norm_bwd.register_fake
def _(dy, xin, weight, rstd, dh, backend):
    N = xin.shape[1]
    return xin.new_empty(xin.shape), xin.new_empty((N if weight is not None else 0,), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x, weight, residual, eps, backend = inputs
    _, h, rstd = output
    ctx.has_residual = residual is not None
    ctx.backend = backend
    ctx.save_for_backward(h if residual is not None else x, weight, rstd)


def _backward(ctx, dy, dh, _drstd):
    xin, weight, rstd = ctx.saved_tensors
    dh = dh if ctx.has_residual else None
    dx, dw = rms_norm_bwd(unit_last_stride(dy), xin, weight, rstd, unit_last_stride(dh) if dh is not None else None,
                          ctx.backend)
    return dx, (dw if weight is not None else None), (dx if ctx.has_residual else None), None, None


rms_norm_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------
@_dispatch.register_input_check("rms_norm")
def _input_reason(backend: str, dtype: torch.dtype) -> Optional[str]:
    if backend != "reference" and dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    return None


def _validate(x, weight, eps, residual, backend):
    check_backend_arg(backend)
    check_tensor("x", x, min_ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,))
    N = x.shape[-1]
    if not 1 <= N <= _MAX_HIDDEN:
        raise ValueError(f"x.shape[-1] (the hidden size) must be in [1, {_MAX_HIDDEN}], got {N}")
    if weight is not None:
        check_tensor("weight", weight, ndim=1, dtypes=FLOAT_DTYPES + (torch.float64,))
        check_shape("weight", weight, (N,), "the hidden size of x")
        check_same_device("weight", weight, "x", x)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES + (torch.float64,))
        check_shape("residual", residual, x.shape, "same as x")
        check_same_device("residual", residual, "x", x)
        check_same_dtype("residual", residual, "x", x)
    check_positive("eps", eps)
    return N


def _rows(t: Tensor, N: int) -> Tensor:
    """(..., N) -> (M, N) view with unit column stride, copied only when no such view exists."""
    return unit_last_stride(t.reshape(-1, N))


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: float = 1e-6, *, residual: Optional[Tensor] = None,
             backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Root-mean-square layer norm over the last dimension, statistics in fp32.

    Args:
        x: (..., N) fp32/fp16/bf16, any strides, any number of leading dims (zero rows allowed).
        weight: (N,) scale, or None for no scale.
        eps: added to the mean square, > 0.
        residual: optional (..., N) like x. When given, h = x + residual is computed first
            (the fused residual add of pre-norm blocks) and ``(y, h)`` is returned.
        backend: "triton", "cuda", "cpu", "reference" or None (fastest that fits; env PYATTN_BACKEND).

    Returns:
        y: (..., N) in x's dtype, or ``(y, h)`` with residual.

    Equivalent PyTorch::

        h = x + residual if residual is not None else x
        hf = h.float()
        y = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight).to(x.dtype)
    Under ``torch.autocast`` a residual of another float dtype is accepted: both are promoted to
    the wider dtype first (as ``x + residual`` would be); the norm itself is not cast down.
    """
    if residual is not None and isinstance(x, Tensor) and isinstance(residual, Tensor) \
            and residual.dtype != x.dtype and autocast_dtype(x) is not None:
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    N = _validate(x, weight, eps, residual, backend)
    name = _dispatch.select_backend("rms_norm", "rms_norm", x.device, backend, (x.dtype,))
    x2 = _rows(x, N)
    r2 = _rows(residual, N) if residual is not None else None
    w = None
    if weight is not None:
        # the kernels read the weight with unit stride (an expanded or sliced weight is copied)
        w = weight.to(torch.float64 if x.dtype == torch.float64 else torch.float32).contiguous()
    if _dispatch.direct_call_ok(x2, w, r2):
        y, h, _ = _forward_impl(name, x2, w, r2, float(eps))
    else:
        y, h, _ = rms_norm_fwd(x2, w, r2, float(eps), name)
    y = y.view(x.shape)
    if residual is None:
        return y
    return y, h.view(x.shape)
