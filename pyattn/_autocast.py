"""torch.autocast support for the public ops.

pyattn's kernels take one dtype for q/k/v (or x and the weights). Inside ``torch.autocast`` a model
naturally hands them mixed tensors (fp32 parameters and rotary tables, bf16 Linear outputs), so the
matmul-type ops cast their floating inputs to the autocast dtype first, as ``F.linear`` and
``F.scaled_dot_product_attention`` do under autocast. fp64 tensors are left alone, as autocast does.
The normalisation (RMSNorm) is not cast down: like ``layer_norm`` it keeps its input dtype and
its fused residual add promotes to the wider of the two inputs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


def autocast_dtype(t: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype active for ``t``'s device type, or None outside autocast."""
    kind = t.device.type
    if kind not in ("cpu", "cuda", "xpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def autocast_inputs(*tensors: Optional[Tensor]):
    """The tensors cast to the autocast dtype of the first one's device (None entries kept);
    unchanged outside autocast. Returns a tuple in the same order."""
    first = next((t for t in tensors if isinstance(t, Tensor)), None)
    dt = None if first is None else autocast_dtype(first)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if isinstance(t, Tensor) and t.dtype in _CASTABLE else t for t in tensors)
