"""Property tests: attention (masks, bias, ALiBi, windows, dropout), varlen_attention and
block_sparse_attention on drawn shapes, layouts, dtypes and arguments, every available kernel
backend against the fp64 reference, forward and backward (see tests/properties.py)."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyattn
from properties import args, check_backends, property_settings

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
SEQ = st.sampled_from([1, 5, 17, 40])
DIMS = st.sampled_from([1, 8, 16, 40])
WINDOW = st.one_of(st.none(), st.tuples(st.one_of(st.none(), st.integers(0, 20)),
                                        st.one_of(st.none(), st.integers(0, 20))))


def _floors(dtype):
    return dict(fwd_floor=1e-5 if dtype == torch.float32 else 1e-3, bwd_floor=1e-4 if dtype == torch.float32 else 1e-2)


@property_settings(max_examples=10)
@given(data=st.data(), B=st.integers(0, 2), Hkv=st.integers(1, 2), groups=st.integers(1, 2), Nq=SEQ, Nk=SEQ,
       D=DIMS, dtype=DTYPES, causal=st.booleans(), alignment=st.sampled_from(["bottom_right", "top_left"]),
       window=WINDOW, extra=st.sampled_from(["none", "padding", "bias", "bool_mask", "alibi", "dropout"]),
       return_lse=st.booleans())
def test_attention(data, B, Hkv, groups, Nq, Nk, D, dtype, causal, alignment, window, extra, return_lse):
    H = Hkv * groups
    q = data.draw(args((B, H, Nq, D)), label="q")
    k = data.draw(args((B, Hkv, Nk, D)), label="k")
    v = data.draw(args((B, Hkv, Nk, D)), label="v")
    tensors = [q, k, v]
    kw = dict(causal=causal, causal_alignment=alignment, window=window, return_lse=return_lse)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="mask seed"))
    if extra == "padding":
        kw["key_padding_mask"] = torch.rand(B, Nk, generator=g) < 0.7
    elif extra == "bool_mask":
        shape = data.draw(st.sampled_from([(Nq, Nk), (1, H, Nq, Nk), (B, 1, Nq, Nk), (B, H, Nq, Nk)]), label="mask")
        kw["attn_mask"] = torch.rand(shape, generator=g) < 0.7
    elif extra == "alibi":
        kw["alibi_slopes"] = torch.rand(data.draw(st.sampled_from([(H,), (B, H)])), generator=g)
    elif extra == "dropout":
        kw["dropout_p"] = 0.25
    bias_shape = data.draw(st.sampled_from([(Nq, Nk), (1, H, Nq, Nk), (B, 1, 1, Nk), (B, H, Nq, Nk)]), label="bias")
    if extra == "bias":
        tensors.append(data.draw(args(bias_shape), label="bias"))

    def fn(backend, q, k, v, *bias):
        torch.manual_seed(1234)  # the dropout seed: the same mask on every backend
        out = pyattn.attention(q, k, v, bias=bias[0] if bias else None, backend=backend, **kw)
        return out if isinstance(out, tuple) else (out,)

    check_backends("attention", fn, tensors, dtype, **_floors(dtype))


@property_settings(max_examples=5)
@given(data=st.data(), lens=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=3),
       Hkv=st.integers(1, 2), groups=st.integers(1, 2), D=st.sampled_from([8, 16]), dtype=DTYPES,
       causal=st.booleans(), window=WINDOW, alibi=st.booleans())
def test_varlen_attention(data, lens, Hkv, groups, D, dtype, causal, window, alibi):
    H = Hkv * groups
    lq, lk = [a for a, _ in lens], [b for _, b in lens]
    cu_q = torch.tensor([0] + lq, dtype=torch.int32).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lk, dtype=torch.int32).cumsum(0).to(torch.int32)
    q = data.draw(args((sum(lq), H, D)), label="q")
    k = data.draw(args((sum(lk), Hkv, D)), label="k")
    v = data.draw(args((sum(lk), Hkv, D)), label="v")
    slopes = torch.rand(H) if alibi else None

    def fn(backend, q, k, v):
        return pyattn.varlen_attention(q, k, v, cu_q, cu_k, max(lq), max(lk), causal=causal, window=window,
                                       alibi_slopes=slopes, return_lse=True, backend=backend)

    check_backends("attention", fn, [q, k, v], dtype, **_floors(dtype))


@property_settings(max_examples=5)
@given(data=st.data(), B=st.integers(1, 2), H=st.integers(1, 2), N=st.sampled_from([16, 40, 64]),
       block=st.sampled_from([16, 32]), D=st.sampled_from([8, 16]), dtype=DTYPES, causal=st.booleans(),
       per_head=st.booleans(), padding=st.booleans())
def test_block_sparse_attention(data, B, H, N, block, D, dtype, causal, per_head, padding):
    nb = -(-N // block)
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="layout seed"))
    table = torch.rand(B if per_head else 1, H if per_head else 1, nb, nb, generator=g) < 0.6
    layout = pyattn.BlockMask.from_dense(table, block_size=block, seq_lengths=(N, N))
    kpm = torch.rand(B, N, generator=g) < 0.2 if padding else None
    q = data.draw(args((B, H, N, D)), label="q")
    k = data.draw(args((B, H, N, D)), label="k")
    v = data.draw(args((B, H, N, D)), label="v")

    def fn(backend, q, k, v):
        return pyattn.block_sparse_attention(q, k, v, layout, causal=causal, key_padding_mask=kpm, return_lse=True,
                                             backend=backend)

    check_backends("attention", fn, [q, k, v], dtype, **_floors(dtype))
