"""Padding helpers: go from a padded batch to packed variable-length sequences and back."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from ._validate import check_tensor


def unpad(x: Tensor, key_padding_mask: Tensor) -> Tuple[Tensor, Tensor, Tensor, int]:
    """Pack the kept tokens of a padded batch.

    Args:
        x: (B, N, ...) padded batch.
        key_padding_mask: (B, N) bool, True = real token.

    Returns:
        packed (total, ...), indices (total,) int64 into the flattened (B * N) tokens,
        cu_seqlens (B + 1,) int32, max_seqlen (int).
    """
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,))
    if x.dim() < 2 or tuple(x.shape[:2]) != tuple(key_padding_mask.shape):
        raise ValueError(f"x must be (B, N, ...) with (B, N) = {tuple(key_padding_mask.shape)}, got {tuple(x.shape)}")
    lengths = key_padding_mask.sum(1, dtype=torch.int32)
    indices = torch.nonzero(key_padding_mask.flatten(), as_tuple=False).flatten()
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
