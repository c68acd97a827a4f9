"""The attention engine's torch ops: ``pyattn::attention_fwd`` / ``pyattn::attention_bwd``.

One forward and one backward op carry every variant (dense, causal, window, key padding,
additive bias, ALiBi, dropout, packed variable length). A variant is a combination of arguments;
each backend turns it into compile-time specialisations of one inner loop. The public functions
(``pyattn.attention``, ``pyattn.varlen_attention``, ``pyattn.sdpa``) live in pyattn/attention.py.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from ..reference.attention import attention_backward_reference, attention_reference, dropout_threshold

MAX_HEAD_DIM = 256


# backends without a block-schedule engine yet (explicit block lists + mask bits)
_NO_BLOCK_SCHEDULE = {"cuda": "block-sparse attention / block schedules have no CUDA kernel yet "
                              "(the triton backend runs them on GPU)"}


@_dispatch.register_input_check("attention")
def _input_reason(backend: str, dtype: torch.dtype, head_dim: int, block_schedule: bool = False) -> Optional[str]:
    if block_schedule and backend in _NO_BLOCK_SCHEDULE:
        return _NO_BLOCK_SCHEDULE[backend]
    if backend == "reference":
        return None
    if dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _empty(q: Tensor, k: Tensor) -> bool:
    """Nothing to compute (a zero-size batch, head, sequence): the kernels are not launched."""
    return q.numel() == 0 or k.numel() == 0


def _full_bias(bias: Optional[Tensor], q: Tensor, k: Tensor) -> Optional[Tensor]:
    """The 4-D bias (size-1 broadcast dims allowed) as the (B, H, Nq, Nk) view the kernels read."""
    if bias is None or q.dim() != 4:
        return bias
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _backend_forward(backend, q, k, v, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed):
    thr = dropout_threshold(p)
    bias = _full_bias(bias, q, k)
    if backend != "reference" and _empty(q, k):  # rows that see no key: out 0, lse -inf
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    if backend == "cpu":
        from . import cpu_tuning
        cpu_tuning.ensure(q.dtype, q.shape[-1])  # tile path + blocks: measured once per (dtype, head-dim class)
        return torch.ops.pyattn_cpu.attention_fwd(q, k, v, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                                  br, p, thr, seed)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.attention_fwd(q, k, v, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                                   br, p, thr, seed)
    if backend == "triton":
        from ..kernels import attention as tk
        return tk.attention_forward(q, k, v, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, thr, seed)
    if backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = attention_reference(q, k, v, bias=bias, alibi_slopes=alibi, key_padding_mask=kpm,
                                       cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, scale=scale, window_left=wl,
                                       window_right=wr, bottom_right=br, dropout_p=p, seed=seed, compute_dtype=compute)
        return out.contiguous(), lse.contiguous()
    raise ValueError(f"unknown backend {backend!r}")


def _backend_backward(backend, dout, q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                      br, p, seed, bias_grad):
    thr = dropout_threshold(p)
    bias = _full_bias(bias, q, k)
    if backend != "reference" and _empty(q, k):
        db = q.new_zeros(bias.shape, dtype=torch.float32) if bias_grad else None
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape), db
    if backend == "cpu":
        dq, dk, dv, db = torch.ops.pyattn_cpu.attention_bwd(dout, q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k,
                                                            max_q, max_k, scale, wl, wr, br, p, thr, seed, bias_grad)
        return dq, dk, dv, (db if bias_grad else None)
    if backend == "cuda":
        dq, dk, dv, db = torch.ops.pyattn_cuda.attention_bwd(dout, q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k,
                                                             max_q, max_k, scale, wl, wr, br, p, thr, seed, bias_grad)
        return dq, dk, dv, (db if bias_grad else None)
    if backend == "triton":
        from ..kernels import attention as tk
        return tk.attention_backward(dout, q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                     br, p, thr, seed, bias_grad)
    if backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        dq, dk, dv, db = attention_backward_reference(
            dout, q, k, v, out, bias=bias, alibi_slopes=alibi, key_padding_mask=kpm, cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k, scale=scale, window_left=wl, window_right=wr, bottom_right=br, dropout_p=p, seed=seed,
            bias_grad=bias_grad, compute_dtype=compute)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), (db.float() if db is not None else None)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("pyattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], alibi_slopes: Optional[Tensor],
                  key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int, window_right: int,
                  bottom_right: bool, dropout_p: float, seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """q (B, H, Nq, D), k/v (B, Hkv, Nk, D) -> (out (B, H, Nq, D), lse fp32 (B, H, Nq)). See the module doc."""
    return _forward(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                    max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, seed, backend)


def _forward(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
             scale, window_left, window_right, bottom_right, dropout_p, seed, backend):
    out, lse = _backend_forward(backend, q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p,
                                _seed_int(seed))
    return out.contiguous(), lse.contiguous()


def attention_forward(*args):
    """:func:`attention_fwd`, run directly when neither autograd nor tracing needs the custom op."""
    if _dispatch.direct_call_ok(*(a for a in args if isinstance(a, Tensor))):
        return _forward(*args)
    return attention_fwd(*args)


@attention_fwd.register_fake
def _(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale,
      window_left, window_right, bottom_right, dropout_p, seed, backend):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("pyattn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, bias: Optional[Tensor],
                  alibi_slopes: Optional[Tensor], key_padding_mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                  cu_seqlens_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int, scale: float,
                  window_left: int, window_right: int, bottom_right: bool, dropout_p: float, seed: Optional[Tensor],
                  bias_requires_grad: bool, backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of :func:`attention_fwd`; dbias is fp32 in bias's own 4-D shape
    (its broadcast dims reduced) or empty."""
    args = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right,
            dropout_p, _seed_int(seed))
    if bias_requires_grad and _batch_chunked(q, bias, dropout_p):
        dq, dk, dv, db = _backward_per_batch(backend, dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask,
                                             args)
    else:
        dq, dk, dv, db = _backend_backward(backend, dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask,
                                           *args, bias_requires_grad)
        if db is not None and bias is not None and tuple(db.shape) != tuple(bias.shape):
            db = _reduce_to(db, bias.shape)
    if db is None:
        db = q.new_empty((0,), dtype=torch.float32)
    # contiguous outputs: the strides the fake implementation promises to torch.compile
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), db.contiguous()


def _reduce_to(g: Tensor, shape) -> Tensor:
    """Sum a (B, H, Nq, Nk) gradient over the dims where ``shape`` is 1."""
    dims = [d for d in range(4) if shape[d] == 1 and g.shape[d] != 1]
    return g.sum(dims, keepdim=True) if dims else g


def _batch_chunked(q: Tensor, bias: Optional[Tensor], dropout_p: float) -> bool:
    """A bias shared by the batch or by the heads gets its gradient one batch element at a time (a
    (1, H, Nq, Nk) buffer instead of (B, H, Nq, Nk)). Not with dropout: its mask hashes the batch index."""
    return (bias is not None and q.dim() == 4 and q.shape[0] > 1 and (bias.shape[0] == 1 or bias.shape[1] == 1)
            and dropout_p == 0.0 and q.numel() > 0)


def _backward_per_batch(backend, dout, q, k, v, out, lse, bias, alibi, kpm, args):
    shared = bias.shape[0] == 1  # else bias is (B, 1, ., .): each element owns its slice of the gradient
    grads, db = [], None if shared else torch.empty(bias.shape, dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        s = slice(b, b + 1)
        dq, dk, dv, db_b = _backend_backward(backend, dout[s], q[s], k[s], v[s], out[s], lse[s],
                                             bias if shared else bias[s], None if alibi is None else alibi[s],
                                             None if kpm is None else kpm[s], *args, True)
        db_b = _reduce_to(db_b, (1,) + tuple(bias.shape[1:]))
        if shared:
            db = db_b if db is None else db.add_(db_b)
        else:
            db[s] = db_b
        grads.append((dq, dk, dv))
    dq, dk, dv = (torch.cat(g) for g in zip(*grads))
    return dq, dk, dv, db


@attention_bwd.register_fake
def _(dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, scale, window_left, window_right, bottom_right, dropout_p, seed, bias_requires_grad, backend):
    db_shape = tuple(bias.shape) if (bias is not None and bias_requires_grad) else (0,)
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(db_shape, dtype=torch.float32))


_N_INPUTS = 17


def _setup_context(ctx, inputs, output):
    (q, k, v, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr, br, p, seed, backend) = inputs
    out, lse = output
    ctx.bias_requires_grad = bias is not None and ctx.needs_input_grad[3]
    ctx.args = (max_q, max_k, scale, wl, wr, br, p)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k, seed)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k, seed = ctx.saved_tensors
    max_q, max_k, scale, wl, wr, br, p = ctx.args
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, db = attention_bwd(dout, q, k, v, out, lse, bias, alibi, kpm, cu_q, cu_k, max_q, max_k, scale, wl, wr,
                                   br, p, seed, ctx.bias_requires_grad, ctx.backend)
    grads = [dq, dk, dv, db.to(bias.dtype) if ctx.bias_requires_grad else None]
    return tuple(grads + [None] * (_N_INPUTS - 4))


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
