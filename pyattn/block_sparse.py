"""``pyattn.block_sparse_attention``: attention restricted to the blocks of a layout."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _dispatch
from ._autocast import autocast_inputs
from ._validate import check_backend_arg, check_same_device, check_tensor
from .attention import _check_dropout, _check_qkv, _check_scale, _dropout_seed, _unit_last_stride
from .block_mask import BlockMask
from .ops.block_sparse import block_sparse_forward


def check_layout(layout, B: int, H: int, Nq: int, Nk: int, q: Tensor) -> BlockMask:
    """The layout must be a BlockMask built for these (Nq, Nk), with B / H (or broadcast 1), on q's device."""
    if not isinstance(layout, BlockMask):
        raise TypeError(f"layout must be a pyattn.BlockMask (see pyattn.layouts), got {type(layout).__name__}")
    if tuple(layout.seq_lengths) != (Nq, Nk):
        raise ValueError(f"layout was built for (Nq, Nk) = {tuple(layout.seq_lengths)}, but the inputs have "
                         f"(Nq, Nk) = {(Nq, Nk)}")
    Bm, Hm = layout.shape[:2]
    if Bm not in (1, B):
        raise ValueError(f"layout has batch size {Bm}; expected 1 (broadcast) or the batch size {B}")
    if Hm not in (1, H):
        raise ValueError(f"layout has {Hm} heads; expected 1 (broadcast) or the number of query heads {H}")
    if layout.device != q.device:
        raise ValueError(f"layout is on {layout.device} but q is on {q.device}; build it with device=q.device")
    return layout


def run_schedule(q: Tensor, k: Tensor, v: Tensor, layout: BlockMask, keep: Optional[Tensor], scale: float,
                 window_left: int, window_right: int, bottom_right: bool, dropout_p: float,
                 seed: Optional[Tensor], backend: str) -> Tuple[Tensor, Tensor]:
    """The engine call of a schedule. keep: (B, Nk) bool, True = visible key."""
    bq, bk = layout.block_size
    return block_sparse_forward(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v),
                                layout.kv_num_blocks, layout.kv_indices, layout.full_kv_num_blocks,
                                layout.full_kv_indices, layout.q_num_blocks, layout.q_indices,
                                layout.full_q_num_blocks, layout.full_q_indices, layout.mask_bits, keep, bq, bk,
                                scale, window_left, window_right, bottom_right, dropout_p, seed, backend)


def block_sparse_attention(q: Tensor, k: Tensor, v: Tensor, layout: BlockMask, *, causal: bool = False,
                           key_padding_mask: Optional[Tensor] = None, scale: Optional[float] = None,
                           dropout_p: float = 0.0, return_lse: bool = False,
                           generator: Optional[torch.Generator] = None,
                           backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention that visits only the blocks of ``layout`` (a :class:`pyattn.BlockMask`, e.g. from
    :mod:`pyattn.layouts`); blocks not in the layout are never read.

    Args:
        q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) as in :func:`pyattn.attention` (GQA, any strides,
            fp32/fp16/bf16, D <= 256).
        layout: schedule built for (Nq, Nk) with batch 1 or B and heads 1 or H (per-head layouts).
        causal: element-wise causal mask inside the visited blocks, bottom-right aligned
            (query i sees keys j <= i + Nk - Nq; j <= i for self-attention).
        key_padding_mask: (B, Nk) bool, **True = padding (ignored key)**, PyTorch's meaning
            (``nn.MultiheadAttention``).
        scale: defaults to 1/sqrt(D). dropout_p: dropout on the probabilities.
        return_lse: also return the fp32 log-sum-exp (B, H, Nq) (-inf for rows with no visible key).
        backend: "triton", "cpu", "reference" or None. (cuda: not implemented for block schedules.)

    Returns:
        out (B, H, Nq, D); rows that see no key are 0 (and get zero gradients).

    Equivalent PyTorch::

        visible = layout.to_dense_mask()                     # (1|B, 1|H, Nq, Nk) bool
        if causal: visible &= torch.ones(Nq, Nk, dtype=torch.bool).tril(Nk - Nq)
        if key_padding_mask is not None: visible &= ~key_padding_mask[:, None, None, :]
        s = (q @ k.transpose(-1, -2) * scale).masked_fill(~visible, -inf)
        out = torch.nan_to_num(torch.softmax(s, -1)) @ v
    """
    check_backend_arg(backend)
    q, k, v = autocast_inputs(q, k, v)
    _check_qkv(q, k, v, packed=False)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    check_layout(layout, B, H, Nq, Nk, q)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    keep = None
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
        check_same_device("key_padding_mask", key_padding_mask, "q", q)
        if tuple(key_padding_mask.shape) != (B, Nk):
            raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}), got {tuple(key_padding_mask.shape)}")
        keep = ~key_padding_mask
    p = _check_dropout(dropout_p)
    sc = _check_scale(scale, D)
    name = _dispatch.select_backend("block_sparse_attention", "attention", q.device, backend, (q.dtype, D, True))
    out, lse = run_schedule(q, k, v, layout, keep, sc, -1, 0 if causal else -1, True, p,
                            _dropout_seed(p, generator, q), name)
    return (out, lse) if return_lse else out
