"""64-bit offsets in the Triton kernels: small views whose stride * index exceeds 2^31 elements.

The views sit in a large ``torch.empty`` storage of which only the viewed rows are ever touched
(the rest is never paged in), so the tests need little real memory."""
from __future__ import annotations

import pytest
import torch

import pyattn
from helpers import HAS_GPU, skip_unless_backend

ROW = 2**29  # 4 * ROW = 2^31: row 4 of a view with this row stride is past the int32 range


def _huge_rows(n_rows: int, width: int, dtype=torch.float16, n_tensors: int = 1):
    """``n_tensors`` (n_rows, width) views with row stride ROW in one storage, filled with randn."""
    storage = torch.empty(n_rows * ROW + n_tensors * width, dtype=dtype, device="cuda" if HAS_GPU else "cpu")
    g = torch.Generator().manual_seed(0)
    views = []
    for i in range(n_tensors):
        v = storage.as_strided((n_rows, width), (ROW, 1), storage_offset=i * width)
        v.copy_(torch.randn(n_rows, width, generator=g).to(dtype))
        views.append(v)
    return views


def test_attention_row_offsets_past_int32():
    skip_unless_backend("triton")
    N, D = 6, 16
    q, k, v = (t.view(1, 1, N, D) for t in _huge_rows(N, D, n_tensors=3))
    assert (N - 1) * q.stride(2) >= 2**31
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = pyattn.attention(*leaves, backend="triton")
    ref_leaves = [t.detach().contiguous().float().requires_grad_() for t in (q, k, v)]
    ref = pyattn.attention(*ref_leaves, backend="reference")
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    g = torch.randn_like(ref)
    out.backward(g.half())
    ref.backward(g)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad.float(), theirs.grad, atol=1e-2, rtol=1e-2)


def test_glu_row_offsets_past_int32():
    # I = 1: one tile spans 64 rows (1024 on a GPU), so rows * stride passes 2^31 inside a tile
    skip_unless_backend("triton")
    T, row = 64, 2**26
    storage = torch.empty(T * row + 2, dtype=torch.float16, device="cuda" if HAS_GPU else "cpu")
    gate = storage.as_strided((T, 1), (row, 1), storage_offset=0)
    up = storage.as_strided((T, 1), (row, 1), storage_offset=1)
    g = torch.Generator().manual_seed(1)
    gate.copy_(torch.randn(T, 1, generator=g).half())
    up.copy_(torch.randn(T, 1, generator=g).half())
    assert (T - 1) * gate.stride(0) >= 2**31
    leaves = [t.detach().requires_grad_() for t in (gate, up)]
    out = pyattn.glu(*leaves, backend="triton")
    ref_leaves = [t.detach().contiguous().requires_grad_() for t in (gate, up)]
    ref = pyattn.glu(*ref_leaves, backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    dout = torch.randn(T, 1, generator=g).half()
    out.backward(dout)
    ref.backward(dout)
    for mine, theirs in zip(leaves, ref_leaves):
        torch.testing.assert_close(mine.grad, theirs.grad, atol=2e-3, rtol=2e-3)


@pytest.mark.slow
def test_rms_norm_cpu_over_2_31_elements_bf16():
    # about 8.6 GB: x and y of 2^31 + 4096 bf16 elements each
    if pyattn.backend_status("rms_norm")["cpu"] is not None:
        pytest.skip("cpu backend unavailable")
    N = 4096
    M = 2**31 // N + 1
    x = torch.empty(M, N, dtype=torch.bfloat16)
    assert x.numel() > 2**31
    x.normal_()
    w = torch.randn(N, dtype=torch.bfloat16)
    y = pyattn.rms_norm(x, w, backend="cpu")
    for r in (0, 1, M // 2, M - 2, M - 1):
        ref = pyattn.rms_norm(x[r:r + 1], w, backend="reference")
        torch.testing.assert_close(y[r:r + 1], ref, atol=1e-2, rtol=1e-2)
