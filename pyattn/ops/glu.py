"""``pyattn.glu`` and ``pyattn.glu_ffn``: the fused gated linear unit and GLU feed-forward, on every backend.

Activation codes (kernels): 0 silu, 1 gelu (exact erf), 2 gelu_tanh, 3 relu, 4 sigmoid.

``glu_ffn`` saves only x, the (T, 2I) pre-activation and the weights for backward; the backward
recomputes h = act(gate) * up from the pre-activation in the same fused pass that produces
d(gate) and d(up). On the CPU the hidden-size work runs in row chunks so the (T, I) temporaries
(h in the forward, dh / h and d(pre) in the backward) exist only one chunk at a time.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _dispatch
from .._autocast import autocast_inputs
from .._validate import FLOAT_DTYPES, check_backend_arg, check_same_device, check_same_dtype, check_shape, \
    check_tensor
from ._layout import unit_last_stride
from ..reference.glu import ACTIVATIONS, glu_backward_reference, glu_reference

_ALL_DTYPES = FLOAT_DTYPES + (torch.float64,)
_CPU_CHUNK_ROWS = 2048  # row chunk of the CPU feed-forward (fp32); a function of the shape only


def _act_name(code: int) -> str:
    return ACTIVATIONS[code]


# --------------------------------------------------------------------------------------------
# elementwise backends on 2-D (T, I) views with unit column stride
def _glu_fwd_impl(backend: str, gate: Tensor, up: Tensor, code: int) -> Tensor:
    if backend == "cpu":
        return torch.ops.pyattn_cpu.glu_fwd(gate, up, code)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.glu_fwd(gate, up, code)
    if backend == "triton":
        from ..kernels import glu as tk
        return tk.glu_forward(gate, up, code)
    return glu_reference(gate, up, _act_name(code)).contiguous()


def _glu_bwd_impl(backend: str, dout: Tensor, gate: Tensor, up: Tensor, code: int) -> Tuple[Tensor, Tensor]:
    if backend == "cpu":
        return torch.ops.pyattn_cpu.glu_bwd(dout, gate, up, code)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.glu_bwd(dout, gate, up, code)
    if backend == "triton":
        from ..kernels import glu as tk
        return tk.glu_backward(dout, gate, up, code)
    dg, du = glu_backward_reference(dout, gate, up, _act_name(code))
    return dg.contiguous(), du.contiguous()


def _fused_bwd_into(backend: str) -> Callable[[Tensor, Tensor, Tensor, int, Tensor, Tensor], None]:
    """fn(dh, gate, up, code, dgate, dup): writes dgate/dup into the given views and overwrites dh with h."""
    if backend == "cpu":
        return lambda dh, g, u, code, dg, du: torch.ops.pyattn_cpu.glu_bwd_out(dh, g, u, code, dg, du, True)
    if backend == "triton":
        from ..kernels import glu as tk
        return lambda dh, g, u, code, dg, du: tk.glu_backward_into(dh, g, u, code, dg, du, True)

    def unfused(dh, g, u, code, dg, du):
        a, b = _glu_bwd_impl(backend, dh, g, u, code)
        dg.copy_(a)
        du.copy_(b)
        dh.copy_(_glu_fwd_impl(backend, g, u, code))

    return unfused


# --------------------------------------------------------------------------------------------
# feed-forward backends on x2 (T, H)
def _ffn_forward_impl(backend, x, w_gate_up, b_gate_up, w_down, b_down, code):
    T = x.shape[0]
    inter = w_gate_up.shape[0] // 2
    h_out = w_down.shape[0]
    if backend == "triton":
        from ..kernels import glu as tk
        pre, h = tk.glu_matmul(x, w_gate_up, b_gate_up, code)  # GEMM with the GLU in its epilogue
        return F.linear(h, w_down, b_down), pre
    pre = F.linear(x, w_gate_up, b_gate_up)  # (T, 2I): one GEMM for gate and up
    if backend == "reference":
        return F.linear(glu_reference(pre[:, :inter], pre[:, inter:], _act_name(code)), w_down, b_down), pre
    if backend == "cpu" and T > 0:
        out = x.new_empty((T, h_out))
        wd_t = w_down.t()
        chunk = _chunk_rows(T)
        h_buf = x.new_empty((min(chunk, T), inter))
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            h = h_buf[: e - s]
            torch.ops.pyattn_cpu.glu_fwd_out(pre[s:e, :inter], pre[s:e, inter:], code, h)
            if b_down is not None:
                torch.addmm(b_down, h, wd_t, out=out[s:e])
            else:
                torch.mm(h, wd_t, out=out[s:e])
        return out, pre
    h = _glu_fwd_impl(backend, pre[:, :inter], pre[:, inter:], code)
    return F.linear(h, w_down, b_down), pre


def _chunk_rows(T: int) -> int:
    return _CPU_CHUNK_ROWS if T > _CPU_CHUNK_ROWS * 3 // 2 else max(T, 1)


def _ffn_backward_impl(backend, dout, x, pre, w_gate_up, w_down, code, has_bgu, has_bd):
    T, H = x.shape
    inter = w_gate_up.shape[0] // 2
    h_out = w_down.shape[0]
    if backend == "reference":
        dx, dwgu, dbgu, dwd, dbd = _ref_ffn_backward(dout, x, pre, w_gate_up, w_down, code)
    else:
        fused = _fused_bwd_into(backend)
        # row chunks bound the (chunk, I) temporaries; weight gradients accumulate over chunks, which
        # only fp32 does without extra rounding, so 16-bit inputs run as a single chunk
        chunk = _chunk_rows(T) if (backend == "cpu" and x.dtype == torch.float32) else max(T, 1)
        dx = x.new_empty((T, H))
        dwgu = w_gate_up.new_zeros((2 * inter, H)) if T == 0 else w_gate_up.new_empty((2 * inter, H))
        dwd = w_down.new_zeros((h_out, inter)) if T == 0 else w_down.new_empty((h_out, inter))
        dbgu_acc = None
        dh_buf = x.new_empty((min(chunk, T), inter))
        dpre_buf = x.new_empty((min(chunk, T), 2 * inter))
        for s in range(0, T, chunk):
            e = min(T, s + chunk)
            dout_c, x_c = dout[s:e], x[s:e]
            dh = dh_buf[: e - s]
            dpre = dpre_buf[: e - s]
            torch.mm(dout_c, w_down, out=dh)
            fused(dh, pre[s:e, :inter], pre[s:e, inter:], code, dpre[:, :inter], dpre[:, inter:])  # dh := h
            if s == 0:
                torch.mm(dout_c.t(), dh, out=dwd)
                torch.mm(dpre.t(), x_c, out=dwgu)
            else:
                dwd.addmm_(dout_c.t(), dh)
                dwgu.addmm_(dpre.t(), x_c)
            torch.mm(dpre, w_gate_up, out=dx[s:e])
            if has_bgu:
                part = dpre.sum(0, dtype=torch.float32 if x.dtype != torch.float64 else x.dtype)
                dbgu_acc = part if dbgu_acc is None else dbgu_acc.add_(part)
        del dh_buf, dpre_buf
        dbgu = dbgu_acc.to(x.dtype) if dbgu_acc is not None else x.new_zeros((2 * inter,))
        dbd = dout.sum(0) if has_bd else None
    if not has_bgu:
        dbgu = x.new_empty((0,))
    if not has_bd:
        dbd = x.new_empty((0,))
    return dx, dwgu, dbgu, dwd, dbd


def _ref_ffn_backward(dout, x, pre, w_gate_up, w_down, code):
    inter = w_gate_up.shape[0] // 2
    gate, up = pre[:, :inter], pre[:, inter:]
    h = glu_reference(gate, up, _act_name(code))
    dgate, dup = glu_backward_reference(dout @ w_down, gate, up, _act_name(code))
    dpre = torch.cat([dgate, dup], dim=1)
    return dpre @ w_gate_up, dpre.t() @ x, dpre.sum(0), dout.t() @ h, dout.sum(0)


# --------------------------------------------------------------------------------------------
# custom ops: opaque to torch.compile, differentiable through register_autograd
@torch.library.custom_op("pyattn::glu_fwd", mutates_args=())
def glu_fwd(gate: Tensor, up: Tensor, activation: int, backend: str) -> Tensor:
    return _glu_fwd_impl(backend, gate, up, activation)


@glu_fwd.register_fake
def _(gate, up, activation, backend):
    return gate.new_empty(gate.shape)


@torch.library.custom_op("pyattn::glu_bwd", mutates_args=())
def glu_bwd(dout: Tensor, gate: Tensor, up: Tensor, activation: int, backend: str) -> Tuple[Tensor, Tensor]:
    return _glu_bwd_impl(backend, dout, gate, up, activation)


@glu_bwd.register_fake
def _(dout, gate, up, activation, backend):
    return gate.new_empty(gate.shape), gate.new_empty(gate.shape)


def _glu_setup_context(ctx, inputs, output):
    gate, up, activation, backend = inputs
    ctx.activation = activation
    ctx.backend = backend
    ctx.save_for_backward(gate, up)


def _glu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    dgate, dup = glu_bwd(unit_last_stride(dout), gate, up, ctx.activation, ctx.backend)
    return dgate, dup, None, None


glu_fwd.register_autograd(_glu_backward, setup_context=_glu_setup_context)


@torch.library.custom_op("pyattn::glu_ffn_fwd", mutates_args=())
def glu_ffn_fwd(x: Tensor, w_gate_up: Tensor, bias_gate_up: Optional[Tensor], w_down: Tensor,
                bias_down: Optional[Tensor], activation: int, backend: str) -> Tuple[Tensor, Tensor]:
    return _ffn_forward_impl(backend, x, w_gate_up, bias_gate_up, w_down, bias_down, activation)


@glu_ffn_fwd.register_fake
def _(x, w_gate_up, bias_gate_up, w_down, bias_down, activation, backend):
    T = x.shape[0]
    return x.new_empty((T, w_down.shape[0])), x.new_empty((T, w_gate_up.shape[0]))


@torch.library.custom_op("pyattn::glu_ffn_bwd", mutates_args=())
def glu_ffn_bwd(dout: Tensor, x: Tensor, pre: Tensor, w_gate_up: Tensor, w_down: Tensor, activation: int,
                has_bias_gate_up: bool, has_bias_down: bool,
                backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _ffn_backward_impl(backend, dout, x, pre, w_gate_up, w_down, activation, has_bias_gate_up,
                              has_bias_down)


@glu_ffn_bwd.register_fake
def _(dout, x, pre, w_gate_up, w_down, activation, has_bias_gate_up, has_bias_down, backend):
    return (x.new_empty(x.shape), w_gate_up.new_empty(w_gate_up.shape),
            x.new_empty((w_gate_up.shape[0] if has_bias_gate_up else 0,)), w_down.new_empty(w_down.shape),
            x.new_empty((w_down.shape[0] if has_bias_down else 0,)))


def _ffn_setup_context(ctx, inputs, output):
    x, w_gate_up, bias_gate_up, w_down, bias_down, activation, backend = inputs
    _, pre = output
    ctx.activation = activation
    ctx.backend = backend
    ctx.has_bias = (bias_gate_up is not None, bias_down is not None)
    ctx.set_materialize_grads(False)  # pre is internal: never materialise a (T, 2I) zero gradient for it
    # the whole memory story: x, the pre-activation and the weights; h is recomputed
    ctx.save_for_backward(x, pre, w_gate_up, w_down)


def _ffn_backward(ctx, dout, _dpre):
    x, pre, w_gate_up, w_down = ctx.saved_tensors
    if dout is None:  # out was not used
        dout = x.new_zeros((x.shape[0], w_down.shape[0]))
    dx, dwgu, dbgu, dwd, dbd = glu_ffn_bwd(unit_last_stride(dout), x, pre, w_gate_up, w_down, ctx.activation,
                                           ctx.has_bias[0], ctx.has_bias[1], ctx.backend)
    return (dx, dwgu, dbgu if ctx.has_bias[0] else None, dwd, dbd if ctx.has_bias[1] else None, None, None)


glu_ffn_fwd.register_autograd(_ffn_backward, setup_context=_ffn_setup_context)


# --------------------------------------------------------------------------------------------
@_dispatch.register_input_check("glu")
def _input_reason(backend: str, dtype: torch.dtype) -> Optional[str]:
    if backend != "reference" and dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    return None


def _activation_code(activation) -> int:
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a string, one of {ACTIVATIONS}, got {type(activation).__name__}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return ACTIVATIONS.index(activation)


def _rows(t: Tensor, n: int) -> Tensor:
    """(..., n) -> (T, n) view with unit column stride (copied only when no such view exists)."""
    return unit_last_stride(t.reshape(math.prod(t.shape[:-1]), n))


def glu(gate: Tensor, up: Tensor, activation: str = "silu", *, backend: Optional[str] = None) -> Tensor:
    """Gated linear unit ``act(gate) * up``, fused forward and backward (one pass each).

    Args:
        gate, up: tensors of the same shape (..., I), fp32/fp16/bf16, any strides.
        activation: "silu" (SwiGLU), "gelu" (exact erf, GeGLU), "gelu_tanh", "relu" (ReGLU) or
            "sigmoid" (the original GLU).
        backend: "triton", "cuda", "cpu", "reference" or None (fastest that fits; env PYATTN_BACKEND).

    Returns:
        (..., I) in the inputs' dtype, computed in fp32 and rounded once.

    Equivalent PyTorch::

        torch.nn.functional.silu(gate) * up
    """
    check_backend_arg(backend)
    gate, up = autocast_inputs(gate, up)
    code = _activation_code(activation)
    check_tensor("gate", gate, min_ndim=1, dtypes=_ALL_DTYPES)
    check_tensor("up", up, min_ndim=1, dtypes=_ALL_DTYPES)
    check_shape("up", up, gate.shape, "same as gate")
    check_same_dtype("up", up, "gate", gate)
    check_same_device("up", up, "gate", gate)
    name = _dispatch.select_backend("glu", "glu", gate.device, backend, (gate.dtype,))
    n = gate.shape[-1]
    out = glu_fwd(_rows(gate, n), _rows(up, n), code, name)
    return out.view(gate.shape)


def _validate_ffn(x, w_gate_up, w_down, bias_gate_up, bias_down):
    check_tensor("x", x, min_ndim=1, dtypes=_ALL_DTYPES)
    check_tensor("w_gate_up", w_gate_up, ndim=2, dtypes=_ALL_DTYPES)
    check_tensor("w_down", w_down, ndim=2, dtypes=_ALL_DTYPES)
    H = x.shape[-1]
    two_i = w_gate_up.shape[0]
    if two_i % 2 != 0 or two_i == 0:
        raise ValueError(f"w_gate_up must have an even, non-zero first dim (2 * intermediate_size: the gate rows "
                         f"then the up rows), got shape {tuple(w_gate_up.shape)}")
    if w_gate_up.shape[1] != H:
        raise ValueError(f"hidden sizes do not match: w_gate_up has shape {tuple(w_gate_up.shape)}, expected "
                         f"({two_i}, {H}) for x with hidden size x.shape[-1] = {H}")
    inter = two_i // 2
    if w_down.shape[1] != inter:
        raise ValueError(f"w_down must have shape (hidden_out, {inter}) (intermediate size = w_gate_up.shape[0] "
                         f"// 2 = {inter}), got {tuple(w_down.shape)}")
    if H == 0 or w_down.shape[0] == 0:
        raise ValueError(f"hidden sizes must be >= 1, got x.shape[-1] = {H}, w_down.shape[0] = {w_down.shape[0]}")
    for name, t in (("w_gate_up", w_gate_up), ("w_down", w_down)):
        check_same_dtype(name, t, "x", x)
        check_same_device(name, t, "x", x)
    if bias_gate_up is not None:
        check_tensor("bias_gate_up", bias_gate_up, ndim=1, dtypes=_ALL_DTYPES)
        check_shape("bias_gate_up", bias_gate_up, (two_i,), "w_gate_up.shape[0]")
        check_same_dtype("bias_gate_up", bias_gate_up, "x", x)
        check_same_device("bias_gate_up", bias_gate_up, "x", x)
    if bias_down is not None:
        check_tensor("bias_down", bias_down, ndim=1, dtypes=_ALL_DTYPES)
        check_shape("bias_down", bias_down, (w_down.shape[0],), "w_down.shape[0]")
        check_same_dtype("bias_down", bias_down, "x", x)
        check_same_device("bias_down", bias_down, "x", x)
    return H


def glu_ffn(x: Tensor, w_gate_up: Tensor, w_down: Tensor, *, activation: str = "silu",
            bias_gate_up: Optional[Tensor] = None, bias_down: Optional[Tensor] = None,
            backend: Optional[str] = None) -> Tensor:
    """GLU feed-forward (LLaMA MLP): ``(act(x Wg^T) * (x Wu^T)) Wd^T`` with one GEMM for gate and up.

    Args:
        x: (..., H) fp32/fp16/bf16 (any leading dims, zero tokens allowed; any strides).
        w_gate_up: (2I, H) = ``torch.cat([gate_proj.weight, up_proj.weight])``.
        w_down: (H_out, I) = ``down_proj.weight``.
        activation: "silu", "gelu", "gelu_tanh", "relu" or "sigmoid".
        bias_gate_up: optional (2I,); bias_down: optional (H_out,).
        backend: "triton", "cuda", "cpu", "reference" or None.

    Returns:
        (..., H_out) in x's dtype. Gradients flow to x, both weights and both biases. Backward
        saves only x, the (T, 2I) pre-activation and the weights; act(gate) * up is recomputed.

    Equivalent PyTorch::

        I = w_gate_up.shape[0] // 2
        pre = F.linear(x, w_gate_up, bias_gate_up)
        out = F.linear(F.silu(pre[..., :I]) * pre[..., I:], w_down, bias_down)
    """
    check_backend_arg(backend)
    x, w_gate_up, w_down, bias_gate_up, bias_down = autocast_inputs(x, w_gate_up, w_down, bias_gate_up, bias_down)
    code = _activation_code(activation)
    H = _validate_ffn(x, w_gate_up, w_down, bias_gate_up, bias_down)
    name = _dispatch.select_backend("glu_ffn", "glu", x.device, backend, (x.dtype,))
    x2 = _rows(x, H)
    out, _ = glu_ffn_fwd(x2, w_gate_up, bias_gate_up, w_down, bias_down, code, name)
    return out.view(*x.shape[:-1], w_down.shape[0])
