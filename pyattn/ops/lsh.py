"""The LSH attention family's torch ops: ``pyattn::lsh_attention_fwd`` / ``pyattn::lsh_attention_bwd``.

The fused part of Reformer attention, after hashing and sorting (which run in torch): gather the
bucket-sorted rows, banded chunk attention over the sorted sequence (each chunk against itself
and its ``chunks_before`` / ``chunks_after`` neighbours, cyclic) with the causal / self /
key-padding masks taken from the rows' original positions, and write each round's output and
log-sum-exp back to the original positions. The backward recomputes the scores. Semantics:
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
from ..reference.lsh import lse_dtype, lsh_chunks_backward_reference, lsh_chunks_reference

MAX_HEAD_DIM = 256
MAX_CHUNK_LENGTH = 1024
CUDA_UNAVAILABLE = None  # set to a reason string while the CUDA binding lacks the LSH ops


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
        return lsh_chunks_reference(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed,
                                    compute_dtype=_compute_dtype(q))
    raise ValueError(f"unknown backend {backend!r}")


def _backend_backward(backend, dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal, mv, smv, p, seed):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.lsh_attention_bwd(dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal,
                                                      mv, smv, p, dropout_threshold(p), seed)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.lsh_attention_bwd(dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal,
                                                       mv, smv, p, dropout_threshold(p), seed)
    if backend == "triton":
        from ..kernels import lsh as tk
        return tk.lsh_backward(dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal, mv, smv, p,
                               dropout_threshold(p), seed)
    if backend == "reference":
        dq, dk, dv = lsh_chunks_backward_reference(dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal,
                                                   mv, smv, p, seed, compute_dtype=_compute_dtype(q))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("pyattn::lsh_attention_fwd", mutates_args=())
def lsh_attention_fwd(q: Tensor, k: Tensor, v: Tensor, perm: Tensor, key_padding_mask: Optional[Tensor],
                      chunk_length: int, chunks_before: int, chunks_after: int, causal: bool, mask_value: float,
                      self_mask_value: float, dropout_p: float, seed: Optional[Tensor],
                      backend: str) -> Tuple[Tensor, Tensor]:
    """q, k, v (B, H, N, D), perm int64 (B, H, R * N) -> out (B, H, R, N, D), lse fp32 (B, H, R, N)."""
    out, lse = _backend_forward(backend, q, k, v, perm, key_padding_mask, chunk_length, chunks_before, chunks_after,
                                causal, mask_value, self_mask_value, dropout_p, _seed_int(seed))
    return out.contiguous(), lse.contiguous()


@lsh_attention_fwd.register_fake
def _(q, k, v, perm, key_padding_mask, chunk_length, chunks_before, chunks_after, causal, mask_value,
      self_mask_value, dropout_p, seed, backend):
    B, H, N, D = q.shape
    R = perm.shape[-1] // N
    return q.new_empty((B, H, R, N, D)), q.new_empty((B, H, R, N), dtype=lse_dtype(q.dtype))


@torch.library.custom_op("pyattn::lsh_attention_bwd", mutates_args=())
def lsh_attention_bwd(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      perm: Tensor, key_padding_mask: Optional[Tensor], chunk_length: int, chunks_before: int,
                      chunks_after: int, causal: bool, mask_value: float, self_mask_value: float, dropout_p: float,
                      seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`lsh_attention_fwd` given dout and dlse."""
    dq, dk, dv = _backend_backward(backend, dout, dlse, q, k, v, out, lse, perm, key_padding_mask, chunk_length,
                                   chunks_before, chunks_after, causal, mask_value, self_mask_value, dropout_p,
                                   _seed_int(seed))
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@lsh_attention_bwd.register_fake
def _(dout, dlse, q, k, v, out, lse, perm, key_padding_mask, chunk_length, chunks_before, chunks_after, causal,
      mask_value, self_mask_value, dropout_p, seed, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed, backend = inputs
    out, lse = output
    ctx.args = (L, nb, na, causal, mv, smv, p)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, out, lse, perm, kpm, seed)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, perm, kpm, seed = ctx.saved_tensors
    L, nb, na, causal, mv, smv, p = ctx.args
    dout = dout.contiguous()
    dlse = dlse.contiguous() if dlse is not None else torch.zeros_like(lse)
    dq, dk, dv = lsh_attention_bwd(dout, dlse, q, k, v, out, lse, perm, kpm, L, nb, na, causal, mv, smv, p, seed,
                                   ctx.backend)
    return (dq, dk, dv) + (None,) * 11


lsh_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def lsh_forward(*args):
    """:func:`lsh_attention_fwd`, run directly when neither autograd nor tracing needs the custom op."""
    if _dispatch.direct_call_ok(*(a for a in args if isinstance(a, Tensor))):
        return _direct_forward(*args)
    return lsh_attention_fwd(*args)


def _direct_forward(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, seed, backend):
    out, lse = _backend_forward(backend, q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, _seed_int(seed))
    return out.contiguous(), lse.contiguous()
