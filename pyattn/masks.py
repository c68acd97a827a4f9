"""Padding helpers: go from a padded batch to packed variable-length sequences and back."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._validate import check_tensor


def unpad(x: Tensor, attention_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Pack the kept tokens of a padded batch.

    Args:
        x: (B, N, ...) padded batch.
        attention_mask: (B, N) bool, True = real token (Hugging Face's ``attention_mask``; the
            opposite of PyTorch's ``key_padding_mask``, so pass ``~key_padding_mask`` for one).

    Returns:
        packed (total, ...), indices (total,) int64 into the flattened (B * N) tokens,
        cu_seqlens (B + 1,) int32, max_seqlen (int).
    """
    check_tensor("attention_mask", attention_mask, ndim=2, dtypes=(torch.bool,))
    if x.dim() < 2 or tuple(x.shape[:2]) != tuple(attention_mask.shape):
        raise ValueError(f"x must be (B, N, ...) with (B, N) = {tuple(attention_mask.shape)}, got {tuple(x.shape)}")
    lengths = attention_mask.sum(1, dtype=torch.int32)
    indices = torch.nonzero(attention_mask.flatten(), as_tuple=False).flatten()
    cu = torch.zeros(lengths.numel() + 1, dtype=torch.int32, device=x.device)
    cu[1:] = torch.cumsum(lengths, 0, dtype=torch.int32)
    max_len = int(lengths.max()) if lengths.numel() else 0
    packed = x.reshape(-1, *x.shape[2:]).index_select(0, indices)
    return packed, indices, cu, max_len


def pad(packed: Tensor, indices: Tensor, batch: int, seqlen: int) -> Tensor:
    """Inverse of :func:`unpad`: scatter (total, ...) back into a zero-padded (batch, seqlen, ...)."""
    out = packed.new_zeros(batch * seqlen, *packed.shape[1:])
    out = out.index_copy(0, indices, packed)
    return out.view(batch, seqlen, *packed.shape[1:])
