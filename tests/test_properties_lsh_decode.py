"""Property tests: lsh_attention (forward and backward) and decode_attention (inference) on drawn
shapes, layouts, dtypes and arguments, every available kernel backend against the fp64 reference."""
from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

import pyattn
from properties import args, check_backends, property_settings

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def _floors(dtype):
    return dict(fwd_floor=1e-5 if dtype == torch.float32 else 1e-3, bwd_floor=1e-4 if dtype == torch.float32 else 1e-2)


@property_settings(max_examples=5)
@given(data=st.data(), B=st.integers(0, 2), H=st.integers(1, 2), N=st.sampled_from([1, 7, 16, 40]),
       D=st.sampled_from([4, 8]), L=st.sampled_from([4, 8]), n_hashes=st.integers(1, 2), causal=st.booleans(),
       padding=st.booleans(), dtype=DTYPES)
def test_lsh_attention(data, B, H, N, D, L, n_hashes, causal, padding, dtype):
    qk = data.draw(args((B, H, N, D)), label="qk")
    v = data.draw(args((B, H, N, D)), label="v")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="mask seed"))
    kpm = torch.rand(B, N, generator=g) < 0.2 if padding else None

    def fn(backend, qk, v):
        return pyattn.lsh_attention(qk, v, n_hashes=n_hashes, n_buckets=4, chunk_length=L, causal=causal,
                                    key_padding_mask=kpm, seed=3, return_lse=True, backend=backend)

    check_backends("lsh", fn, [qk, v], dtype, **_floors(dtype))


@property_settings(max_examples=5)
@given(data=st.data(), B=st.integers(1, 3), Hkv=st.integers(1, 2), groups=st.integers(1, 2), Nq=st.integers(1, 3),
       capacity=st.sampled_from([8, 21]), D=st.sampled_from([8, 16]), dtype=DTYPES, causal=st.booleans(),
       paged=st.booleans(), num_splits=st.sampled_from([None, 1, 3]))
def test_decode_attention(data, B, Hkv, groups, Nq, capacity, D, dtype, causal, paged, num_splits):
    H = Hkv * groups
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 1000), label="length seed"))
    lens = torch.randint(0, capacity + 1, (B,), generator=g, dtype=torch.int32)
    q = data.draw(args((B, H, Nq, D), grad=False), label="q")
    if paged:
        page = 4
        pages_per_seq = -(-capacity // page)
        cache_shape = (B * pages_per_seq + 1, Hkv, page, D)
        table = torch.randperm(B * pages_per_seq, generator=g).to(torch.int32).view(B, pages_per_seq)
    else:
        cache_shape, table = (B, Hkv, capacity, D), None
    # caches keep a unit last stride (a documented requirement: they are written in place)
    layouts = ("contiguous", "permuted", "offset")
    kc = data.draw(args(cache_shape, grad=False, layouts=layouts), label="k_cache")
    vc = data.draw(args(cache_shape, grad=False, layouts=layouts), label="v_cache")
    if kc.layout == "permuted" and kc.perm[-1] != 3:
        kc.layout = "contiguous"
    if vc.layout == "permuted" and vc.perm[-1] != 3:
        vc.layout = "contiguous"

    def fn(backend, q, kc, vc):
        with torch.no_grad():
            return pyattn.decode_attention(q, kc, vc, lens, block_table=table, causal=causal, num_splits=num_splits,
                                           return_lse=True, backend=backend)

    check_backends("decode", fn, [q, kc, vc], dtype, grad=False, **_floors(dtype))
