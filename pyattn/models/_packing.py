"""Packed token layout shared by the models: a padded (B, N) batch as (T, ...) real tokens.

Every model in pyattn.models runs its layers on the T real tokens of a batch (T <= B * N), so no
matmul, norm or attention is spent on padding; ``pyattn.varlen_attention`` keeps the sequences
apart through ``cu_seqlens``. A batch without a padding mask is the special case T = B * N.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from ..masks import pad as _pad
from ..masks import unpad as _unpad


@dataclass
class Packing:
    """Where the packed tokens of a (batch, seqlen) batch live.

    indices: (T,) int64 positions in the flattened (batch * seqlen) batch, None when every token
    is real (then packed row t is flattened position t). cu_seqlens: (batch + 1,) int32.
    """

    batch: int
    seqlen: int
    cu_seqlens: Tensor
    max_seqlen: int
    indices: Optional[Tensor] = None

    @staticmethod
    def full(batch: int, seqlen: int, device) -> "Packing":
        cu = torch.arange(0, (batch + 1) * seqlen, seqlen, dtype=torch.int32, device=device)
        return Packing(batch, seqlen, cu, seqlen, None)

    @staticmethod
    def from_mask(keep: Tensor) -> "Packing":
        """keep: (B, N) bool, True = real token."""
        B, N = keep.shape
        _, indices, cu, max_len = _unpad(keep.unsqueeze(-1), keep)
        return Packing(B, N, cu, max_len, indices)

    @property
    def total(self) -> int:
        return self.batch * self.seqlen if self.indices is None else int(self.indices.numel())

    @property
    def first_token(self) -> Tensor:
        """(B,) packed row of each sequence's first real token ([CLS])."""
        return self.cu_seqlens[:-1].long()

    def unpad(self, x: Tensor) -> Tensor:
        """(B, N, ...) -> (T, ...)."""
        flat = x.reshape(self.batch * self.seqlen, *x.shape[2:])
        return flat if self.indices is None else flat.index_select(0, self.indices)

    def pad(self, packed: Tensor) -> Tensor:
        """(T, ...) -> (B, N, ...), zeros at the padding."""
        if self.indices is None:
            return packed.view(self.batch, self.seqlen, *packed.shape[1:])
        return _pad(packed, self.indices, self.batch, self.seqlen)
