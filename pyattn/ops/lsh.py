"""The LSH attention family's torch ops: ``pyattn::lsh_attention_fwd`` / ``pyattn::lsh_attention_bwd``.

The fused part of Reformer attention, after hashing and sorting (which run in torch): gather the
bucket-sorted rows, banded chunk attention over the sorted sequence (each chunk against itself
and its ``chunks_before`` / ``chunks_after`` neighbours, cyclic) with the causal / self /
key-padding masks taken from the rows' original positions, and write each round's output and
log-sum-exp back to the original positions, then combine the rounds (weights exp(lse_r - lse)).
The backward recomputes the scores and needs only the combined output, lse and the rounds' lse. Semantics:
pyattn/reference/lsh.py (:func:`lsh_chunks_reference`).

In the terms of the shared block-schedule engine this is a banded schedule on the sorted
sequence: query block c visits key blocks (c - chunks_before .. c + chunks_after) mod C, all
partial, with explicit query/key positions; the kernels here are written around exactly that
loop so that they can become one schedule of that engine.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from ..reference.attention import dropout_threshold
from ..reference.lsh import combine_rounds, lse_dtype, lsh_chunks_backward_reference, lsh_chunks_reference

MAX_HEAD_DIM = 256
MAX_CHUNK_LENGTH = 1024
# The CUDA binding has no LSH ops yet: dispatch rejects the cuda backend with this reason.
CUDA_UNAVAILABLE = "LSH attention has no CUDA kernels yet (csrc/cuda/lsh.cu is not written); use triton on GPU"


@_dispatch.register_input_check("lsh")
def _input_reason(backend: str, dtype: torch.dtype, head_dim: int, chunk_length: int) -> Optional[str]:
    if backend == "reference":
        return None
    if dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    if chunk_length > MAX_CHUNK_LENGTH:
        return f"chunk_length {chunk_length} > {MAX_CHUNK_LENGTH}"
    if backend == "cuda" and CUDA_UNAVAILABLE:
        return CUDA_UNAVAILABLE
    return None


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _backend_forward(backend, q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.lsh_attention_fwd(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p,
                                                      dropout_threshold(p), seed)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.lsh_attention_fwd(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p,
                                                       dropout_threshold(p), seed)
    if backend == "triton":
        from ..kernels import lsh as tk
        return tk.lsh_forward(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, dropout_threshold(p), seed)
    if backend == "reference":
        out_r, lse_r = lsh_chunks_reference(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed,
                                            compute_dtype=_compute_dtype(q))
        out, lse = combine_rounds(out_r, lse_r)
        return out, lse, lse_r
    raise ValueError(f"unknown backend {backend!r}")


def _reference_backward(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv, smv, p, seed):
    """Backward through combine_rounds (closed form) and then the chunk attention."""
    dtype = _compute_dtype(q)
    out_r, _ = lsh_chunks_reference(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed, compute_dtype=dtype)
    g, o, dl = dout.to(dtype), out.to(dtype), dlse.to(dtype)
    w = torch.exp(lse_r.to(dtype) - lse.to(dtype).unsqueeze(2))  # (B, H, R, N)
    dout_r = w.unsqueeze(-1) * g.unsqueeze(2)
    dlse_r = w * ((g.unsqueeze(2) * out_r.to(dtype)).sum(-1) - (g * o).sum(-1).unsqueeze(2) + dl.unsqueeze(2))
    return lsh_chunks_backward_reference(dout_r, dlse_r, q, k, v, out_r, lse_r, perm, kpm, L, nb, na, causal, mv,
                                         smv, p, seed, compute_dtype=dtype)


def _backend_backward(backend, dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv, smv, p,
                      seed):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.lsh_attention_bwd(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na,
                                                      causal, mv, smv, p, dropout_threshold(p), seed)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.lsh_attention_bwd(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na,
                                                       causal, mv, smv, p, dropout_threshold(p), seed)
    if backend == "triton":
        from ..kernels import lsh as tk
        return tk.lsh_backward(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv, smv, p,
                               dropout_threshold(p), seed)
    if backend == "reference":
        dq, dk, dv = _reference_backward(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv,
                                         smv, p, seed)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("pyattn::lsh_attention_fwd", mutates_args=())
def lsh_attention_fwd(q: Tensor, k: Tensor, v: Tensor, perm: Tensor, key_padding_mask: Optional[Tensor],
                      chunk_length: int, chunks_before: int, chunks_after: int, causal: bool, mask_value: float,
                      self_mask_value: float, dropout_p: float, seed: Optional[Tensor],
                      backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """q, k, v (B, H, N, D), perm int64 (B, H, R * N) -> out (B, H, N, D), lse fp32 (B, H, N), and the
    rounds' lse_r fp32 (B, H, R, N); out = sum_r exp(lse_r - lse) o_r."""
    out, lse, lse_r = _backend_forward(backend, q, k, v, perm, key_padding_mask, chunk_length, chunks_before,
                                       chunks_after, causal, mask_value, self_mask_value, dropout_p, _seed_int(seed))
    return out.contiguous(), lse.contiguous(), lse_r.contiguous()


@lsh_attention_fwd.register_fake
def _(q, k, v, perm, key_padding_mask, chunk_length, chunks_before, chunks_after, causal, mask_value,
      self_mask_value, dropout_p, seed, backend):
    B, H, N, D = q.shape
    R = perm.shape[-1] // N
    ld = lse_dtype(q.dtype)
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=ld), q.new_empty((B, H, R, N), dtype=ld)


@torch.library.custom_op("pyattn::lsh_attention_bwd", mutates_args=())
def lsh_attention_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      lse_r: Tensor, perm: Tensor, key_padding_mask: Optional[Tensor], chunk_length: int, chunks_before: int,
                      chunks_after: int, causal: bool, mask_value: float, self_mask_value: float, dropout_p: float,
                      seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`lsh_attention_fwd` given dout and dlse."""
    dq, dk, dv = _backend_backward(backend, dout, dlse, q, k, v, out, lse, lse_r, perm, key_padding_mask, chunk_length,
                                   chunks_before, chunks_after, causal, mask_value, self_mask_value, dropout_p,
                                   _seed_int(seed))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@lsh_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, lse_r, perm, key_padding_mask, chunk_length, chunks_before, chunks_after, causal,
      mask_value, self_mask_value, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed, backend = inputs
    out, lse, lse_r = output
    ctx.args = (L, nb, na, causal, mv, smv, p)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, out, lse, lse_r, perm, kpm, seed)


def _backward(ctx, dout, dlse, _dlse_r):
    q, k, v, out, lse, lse_r, perm, kpm, seed = ctx.saved_tensors
    L, nb, na, causal, mv, smv, p = ctx.args
    dout = dout.contiguous()
    dlse = dlse.contiguous() if dlse is not None else torch.zeros_like(lse)
    dq, dk, dv = lsh_attention_bwd(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv, smv, p,
                                   seed, ctx.backend)
    return (dq, dk, dv) + (None,) * 11


lsh_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def lsh_forward(*args):
    """:func:`lsh_attention_fwd`, run directly when neither autograd nor tracing needs the custom op."""
    if _dispatch.direct_call_ok(*(a for a in args if isinstance(a, Tensor))):
        return _direct_forward(*args)
    return lsh_attention_fwd(*args)


def _direct_forward(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed, backend):
    return _backend_forward(backend, q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, _seed_int(seed))
