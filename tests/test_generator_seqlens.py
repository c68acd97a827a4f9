"""``generator`` draws the dropout seed on its own device; ``max_seqlen_*`` are checked against cu_seqlens."""
from __future__ import annotations

import pytest
import torch

import pyattn
from helpers import HAS_GPU


def _qkv(device="cpu", B=1, H=2, N=16, D=8):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, H, N, D, generator=g).to(device) for _ in range(3)]


def test_generator_drives_dropout_and_leaves_global_rng():
    q, k, v = _qkv()
    state = torch.get_rng_state()
    outs = [pyattn.attention(q, k, v, dropout_p=0.5, generator=torch.Generator().manual_seed(s), backend="reference")
            for s in (7, 7, 8)]
    assert torch.equal(torch.get_rng_state(), state), "a given generator must not draw from the global RNG"
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], outs[2])


def test_generator_varlen_and_block_sparse():
    q, k, v = (t[0].transpose(0, 1) for t in _qkv())  # (16, 2, 8)
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    a, b = (pyattn.varlen_attention(q, k, v, cu, cu, 9, 9, dropout_p=0.5, generator=torch.Generator().manual_seed(3),
                                    backend="reference") for _ in range(2))
    assert torch.equal(a, b)
    q4, k4, v4 = _qkv()
    layout = pyattn.layouts.dense(2, 16, block=16)
    a, b = (pyattn.block_sparse_attention(q4, k4, v4, layout, dropout_p=0.5,
                                          generator=torch.Generator().manual_seed(3), backend="reference")
            for _ in range(2))
    assert torch.equal(a, b)


def test_generator_on_another_device_is_a_value_error():
    q, k, v = _qkv("meta")
    with pytest.raises(ValueError, match="generator is on cpu but q is on meta"):
        pyattn.attention(q, k, v, dropout_p=0.1, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        pyattn.attention(*_qkv(), dropout_p=0.1, generator=1234)


@pytest.mark.gpu
def test_cuda_generator():
    q, k, v = _qkv("cuda")
    gens = [torch.Generator(device="cuda").manual_seed(5) for _ in range(2)]
    a, b = (pyattn.attention(q, k, v, dropout_p=0.5, generator=g) for g in gens)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="generator is on cpu"):
        pyattn.attention(q, k, v, dropout_p=0.5, generator=torch.Generator())


def test_max_seqlen_checked_against_cu_seqlens():
    q = k = v = torch.randn(16, 2, 8)
    cu_q = torch.tensor([0, 9, 16], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 16], dtype=torch.int32)  # longest key sequence: 12
    ok = pyattn.varlen_attention(q, k, v, cu_q, cu_k, 9, 12, backend="reference")
    assert ok.shape == q.shape
    assert torch.equal(pyattn.varlen_attention(q, k, v, cu_q, cu_k, 20, 30, backend="reference"), ok)
    with pytest.raises(ValueError, match=r"max_seqlen_q must be >= the longest sequence in cu_seqlens_q \(9\), got 8"):
        pyattn.varlen_attention(q, k, v, cu_q, cu_k, 8, 12)
    with pytest.raises(ValueError, match=r"max_seqlen_k must be >= the longest sequence in cu_seqlens_k \(12\), got 9"):
        pyattn.varlen_attention(q, k, v, cu_q, cu_k, 9, 9)
    with pytest.raises(TypeError, match="max_seqlen_k must be an int"):
        pyattn.varlen_attention(q, k, v, cu_q, cu_k, 9, 12.0)
