"""Layout helper shared by the ops' Python layers."""
from __future__ import annotations

from torch import Tensor


def unit_last_stride(t: Tensor) -> Tensor:
    """``t`` itself when its last dim has stride 1, else a tensor of the same values that has.

    The kernels take any other strides (0 for expanded dims, any storage offset) but read the last
    dim contiguously. ``contiguous()`` alone is not enough: it returns an empty tensor, or one whose
    last dim has size 1, unchanged whatever its strides. A size-1 last dim is restrided (its stride
    never multiplies a non-zero index), not copied."""
    if t.stride(-1) == 1:
        return t
    if t.numel() == 0:
        return t.new_empty(t.shape)
    if t.shape[-1] == 1:
        return t.as_strided(t.shape, (*t.stride()[:-1], 1))
    return t.contiguous()
