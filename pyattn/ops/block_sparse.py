"""Torch ops of block-sparse attention: ``pyattn::block_sparse_fwd`` / ``pyattn::block_sparse_bwd``.

The attention engine walking an explicit block schedule (:class:`pyattn.BlockMask`): per query
block, the listed key blocks only (forward, dQ), per key block the listed query blocks only (dK,
dV). Element masks on top: packed mask bits inside partial blocks, the causal / window band and key
padding. The public function is ``pyattn.block_sparse_attention`` (pyattn/block_sparse.py).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _dispatch
from ..reference.attention import (attention_backward_reference, attention_reference, dropout_threshold,
                                   schedule_bias, schedule_visibility)


def _seed_int(seed: Optional[Tensor]) -> int:
    return int(seed.item()) if seed is not None else 0


def _reference_bias(q, k, kvn, kvi, fkvn, fkvi, bits, bq, bk):
    vis = schedule_visibility(kvn, kvi, fkvn, fkvi, bits, bq, bk, q.shape[2], k.shape[2])
    return schedule_bias(q.to(torch.float64 if q.dtype == torch.float64 else torch.float32), vis)


def _forward(q, k, v, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, bits, kpm, bq, bk, scale, wl, wr, br, p, seed, backend):
    seed_i = _seed_int(seed)
    thr = dropout_threshold(p)
    if backend != "reference" and (q.numel() == 0 or k.numel() == 0):  # nothing to compute: no launch
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], float("-inf"), dtype=torch.float32)
    if backend == "cpu":
        out, lse = torch.ops.pyattn_cpu.block_sparse_fwd(q, k, v, kvn, kvi, fkvn, fkvi, bits, kpm, bq, bk, scale,
                                                         wl, wr, br, p, thr, seed_i)
    elif backend == "triton":
        from ..kernels import attention as tk
        out, lse = tk.block_sparse_forward(q, k, v, (kvn, kvi, fkvn, fkvi), bits, kpm, bq, bk, scale, wl, wr, br,
                                           p, thr, seed_i)
    elif backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = _reference_bias(q, k, kvn, kvi, fkvn, fkvi, bits, bq, bk)
        out, lse = attention_reference(q, k, v, bias=bias, key_padding_mask=kpm, scale=scale, window_left=wl,
                                       window_right=wr, bottom_right=br, dropout_p=p, seed=seed_i,
                                       compute_dtype=compute)
    else:
        raise ValueError(f"backend {backend!r} has no block-sparse attention")
    return out.contiguous(), lse.contiguous()


@torch.library.custom_op("pyattn::block_sparse_fwd", mutates_args=())
def block_sparse_fwd(q: Tensor, k: Tensor, v: Tensor, kv_num_blocks: Tensor, kv_indices: Tensor,
                     full_kv_num_blocks: Tensor, full_kv_indices: Tensor, q_num_blocks: Tensor, q_indices: Tensor,
                     full_q_num_blocks: Tensor, full_q_indices: Tensor, mask_bits: Optional[Tensor],
                     key_padding_mask: Optional[Tensor], block_q: int, block_k: int, scale: float, window_left: int,
                     window_right: int, bottom_right: bool, dropout_p: float, seed: Optional[Tensor],
                     backend: str) -> Tuple[Tensor, Tensor]:
    """q (B, H, Nq, D), k/v (B, Hkv, Nk, D), the schedule's lists (pyattn/block_mask.py; the q_*
    lists are carried for the backward), mask_bits uint8 or None, key_padding_mask (B, Nk) bool
    True = keep -> (out (B, H, Nq, D), lse fp32 (B, H, Nq))."""
    return _forward(q, k, v, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, q_num_blocks,
                    q_indices, full_q_num_blocks, full_q_indices, mask_bits, key_padding_mask, block_q, block_k,
                    scale, window_left, window_right, bottom_right, dropout_p, seed, backend)


def block_sparse_forward(*args):
    """:func:`block_sparse_fwd`, run directly when neither autograd nor tracing needs the custom op."""
    if _dispatch.direct_call_ok(*(a for a in args if isinstance(a, Tensor))):
        return _forward(*args)
    return block_sparse_fwd(*args)


@block_sparse_fwd.register_fake
def _(q, k, v, *rest):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


@torch.library.custom_op("pyattn::block_sparse_bwd", mutates_args=())
def block_sparse_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, kv_num_blocks: Tensor,
                     kv_indices: Tensor, full_kv_num_blocks: Tensor, full_kv_indices: Tensor, q_num_blocks: Tensor,
                     q_indices: Tensor, full_q_num_blocks: Tensor, full_q_indices: Tensor,
                     mask_bits: Optional[Tensor], key_padding_mask: Optional[Tensor], block_q: int, block_k: int,
                     scale: float, window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
                     seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`block_sparse_fwd`."""
    seed_i = _seed_int(seed)
    thr = dropout_threshold(dropout_p)
    if backend != "reference" and (q.numel() == 0 or k.numel() == 0):
        return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    if backend == "cpu":
        dq, dk, dv = torch.ops.pyattn_cpu.block_sparse_bwd(
            dout, q, k, v, out, lse, q_num_blocks, q_indices, full_q_num_blocks, full_q_indices, mask_bits,
            key_padding_mask, block_q, block_k, scale, window_left, window_right, bottom_right, dropout_p, thr, seed_i)
    elif backend == "triton":
        from ..kernels import attention as tk
        dq, dk, dv = tk.block_sparse_backward(
            dout, q, k, v, out, lse, (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices),
            (q_num_blocks, q_indices, full_q_num_blocks, full_q_indices), mask_bits, key_padding_mask, block_q,
            block_k, scale, window_left, window_right, bottom_right, dropout_p, thr, seed_i)
    elif backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        bias = _reference_bias(q, k, kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, mask_bits,
                               block_q, block_k)
        dq, dk, dv, _ = attention_backward_reference(
            dout, q, k, v, out, bias=bias, key_padding_mask=key_padding_mask, scale=scale, window_left=window_left,
            window_right=window_right, bottom_right=bottom_right, dropout_p=dropout_p, seed=seed_i,
            compute_dtype=compute)
        dq, dk, dv = dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
    else:
        raise ValueError(f"backend {backend!r} has no block-sparse attention")
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@block_sparse_bwd.register_fake
def _(dout, q, k, v, *rest):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_N_INPUTS = 22


def _setup_context(ctx, inputs, output):
    (q, k, v, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, bits, kpm, bq, bk, scale, wl, wr, br, p, seed, backend) = inputs
    out, lse = output
    ctx.args = (bq, bk, scale, wl, wr, br, p)
    ctx.backend = backend
    ctx.save_for_backward(q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, bits, kpm, seed)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, bits, kpm, seed = ctx.saved_tensors
    bq, bk, scale, wl, wr, br, p = ctx.args
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = block_sparse_bwd(dout, q, k, v, out, lse, kvn, kvi, fkvn, fkvi, qn, qi, fqn, fqi, bits, kpm, bq, bk,
                                  scale, wl, wr, br, p, seed, ctx.backend)
    return (dq, dk, dv) + (None,) * (_N_INPUTS - 3)


block_sparse_fwd.register_autograd(_backward, setup_context=_setup_context)
