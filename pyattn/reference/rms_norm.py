"""Reference RMSNorm in plain PyTorch."""
from __future__ import annotations

from typing import Optional, Tuple

import torch


def rms_norm_reference(x: torch.Tensor, weight: Optional[torch.Tensor], eps: float = 1e-6,
                       residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim with statistics in fp32 (fp64 when ``x`` is fp64).

    x, residual: (..., N); weight: (N,) or None. Returns ``(y, h, rstd)`` where h = x + residual
    rounded to x's dtype (h is x when residual is None), y = h * rstd * weight in x's dtype and
    rstd = 1 / sqrt(mean(h**2, -1) + eps) with shape x.shape[:-1].
    """
    h = x + residual if residual is not None else x
    stat = torch.float64 if x.dtype == torch.float64 else torch.float32
    hf = h.to(stat)
    rstd = torch.rsqrt(hf.pow(2).mean(-1) + eps)
    y = hf * rstd.unsqueeze(-1)
    if weight is not None:
        y = y * weight.to(stat)
    return y.to(x.dtype), h, rstd


def rms_norm_backward_reference(dy: torch.Tensor, xin: torch.Tensor, weight: Optional[torch.Tensor],
                                rstd: torch.Tensor, dh: Optional[torch.Tensor] = None):
    """Closed-form gradient of RMSNorm. Returns (dx in xin's dtype, dweight in the stats dtype or None)."""
    stat = torch.float64 if xin.dtype == torch.float64 else torch.float32
    xhat = xin.to(stat) * rstd.unsqueeze(-1)
    g = dy.to(stat)
    wg = g * weight.to(stat) if weight is not None else g
    c = (xhat * wg).mean(-1, keepdim=True)
    dx = (wg - xhat * c) * rstd.unsqueeze(-1)
    if dh is not None:
        dx = dx + dh.to(stat)
    dw = (g * xhat).reshape(-1, xin.shape[-1]).sum(0) if weight is not None else None
    return dx.to(xin.dtype), dw
