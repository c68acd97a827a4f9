from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.rms_norm import rms_norm


class RMSNorm(nn.Module):
    """RMSNorm over the last dim: x (..., hidden_size) -> (..., hidden_size).

    ``forward(x, residual=None)`` returns y, or ``(y, x + residual)`` when a residual is given.
    The parameter is named ``weight`` like ``torch.nn.RMSNorm`` and Hugging Face's LlamaRMSNorm.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.backend = backend
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        return rms_norm(x, self.weight, self.eps, residual=residual, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, elementwise_affine={self.weight is not None}"
