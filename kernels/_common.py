"""Helpers shared by the Triton kernels."""
import os

import triton
import triton.language as tl

# The Triton interpreter (CPU testing) converts fp32 -> bf16 by truncation; compiled GPU code
# rounds to nearest even. Kernels cast through ``to_dtype`` so both give PyTorch's rounding.
INTERPRET: tl.constexpr = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def to_dtype(x, dtype: tl.constexpr):
    """Cast fp32 ``x`` to ``dtype`` with round-to-nearest-even (finite values)."""
    if INTERPRET and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
