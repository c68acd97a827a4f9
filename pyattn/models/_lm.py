"""Pieces shared by the language models: token-id checks, the causal-LM output and its loss."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


def check_token_ids(name: str, ids, limit: int, shape=None) -> None:
    """``ids`` must be a 2-D (B, N) integer tensor with values in [0, limit) (and the given shape).
    The value check reads the ids on the host; it is skipped while torch.compile traces."""
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"{name} must be an integer tensor, got {ids.dtype}")
    if shape is not None and tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of input_ids {tuple(shape)}, got {tuple(ids.shape)}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D (B, N), got shape {tuple(ids.shape)}")
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= limit:
            raise ValueError(f"{name} must be in [0, {limit}), got values in [{lo}, {hi}]")


@dataclass
class CausalLMOutput:
    logits: Tensor  # (B, N, vocab)
    loss: Optional[Tensor] = None


def causal_lm_output(logits: Tensor, labels: Optional[Tensor], input_ids: Tensor) -> CausalLMOutput:
    """logits (B, N, V); labels (B, N) or None (-100 = ignored): the next-token loss in fp32."""
    loss = None
    if labels is not None:
        if labels.shape != input_ids.shape:
            raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                             f"got {tuple(labels.shape)}")
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=-100)
    return CausalLMOutput(logits=logits, loss=loss)
