"""pyattn.decode_attention against the fp64 reference: contiguous and paged caches, ragged lengths,
GQA/MQA, windows, ALiBi, every dtype, in-place appends, split counts; custom-op checks; bad input."""
import pytest
import torch

import pyattn
from pyattn.ops import decode as decode_ops
from pyattn.reference.decode import append_kv, decode_attention_reference

from helpers import DTYPES, assert_tolerance, cpu_backends, skip_unless_backend

BACKENDS = [b for b in cpu_backends() if b != "reference"]


def make_case(B, H, Hkv, Nq, D, dtype, lens, capacity, *, page_size=None, seed=0):
    """q, k_cache, v_cache, cache_seqlens, block_table (None when contiguous). Paged pages are
    shuffled, so each sequence's pages are scattered and out of order in the pool."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Nq, D, generator=g).to(dtype)
    lens = torch.tensor(lens, dtype=torch.int32)
    if page_size is None:
        k = torch.randn(B, Hkv, capacity, D, generator=g).to(dtype)
        v = torch.randn(B, Hkv, capacity, D, generator=g).to(dtype)
        return q, k, v, lens, None
    per_seq = -(-capacity // page_size)
    num_pages = B * per_seq + 3  # a few pages belong to nobody
    k = torch.randn(num_pages, Hkv, page_size, D, generator=g).to(dtype)
    v = torch.randn(num_pages, Hkv, page_size, D, generator=g).to(dtype)
    perm = torch.randperm(num_pages, generator=g)[:B * per_seq]
    block_table = perm.view(B, per_seq).to(torch.int32).contiguous()
    return q, k, v, lens, block_table


def references(q, k, v, lens, bt, *, n_appended=0, **kw):
    """(fp64 reference, plain PyTorch in q's dtype) of the decode attention."""
    wl, wr = kw.pop("wl", -1), kw.pop("wr", 0)
    ref64, lse64 = decode_attention_reference(q.double(), k.double(), v.double(), lens, block_table=bt,
                                              window_left=wl, window_right=wr, n_appended=n_appended, **kw)
    low, _ = decode_attention_reference(q, k, v, lens, block_table=bt, window_left=wl, window_right=wr,
                                        n_appended=n_appended, **kw)
    return ref64, low, lse64


def check(name, out, q, k, v, lens, bt, **kw):
    ref64, low, _ = references(q, k, v, lens, bt, **kw)
    assert_tolerance(name, out, low, ref64)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("Nq", [1, 4])
def test_ragged_gqa(backend, dtype, paged, Nq):
    skip_unless_backend(backend)
    cap = 160 if backend == "triton" else 300
    lens = [cap - 37, 0, cap, 5]  # includes an empty and a full cache
    q, k, v, sl, bt = make_case(4, 8, 2, Nq, 64, dtype, lens, cap, page_size=32 if paged else None)
    out, lse = pyattn.decode_attention(q, k, v, sl, block_table=bt, backend=backend, return_lse=True)
    check(f"{backend} {dtype} paged={paged} Nq={Nq}", out, q, k, v, sl, bt)
    _, _, lse64 = references(q, k, v, sl, bt)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "an empty cache must give 0"
    assert torch.isneginf(lse[1]).all()
    fin = torch.isfinite(lse64)
    assert torch.equal(fin, torch.isfinite(lse))
    assert (lse[fin].double() - lse64[fin]).abs().max() < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("H,Hkv,D", [(4, 1, 40), (3, 3, 128), (16, 2, 80)])
def test_head_layouts(backend, H, Hkv, D):
    """MQA, MHA and wide GQA groups (R > 8 rows), head dims that are not a multiple of the vector width."""
    skip_unless_backend(backend)
    q, k, v, sl, bt = make_case(2, H, Hkv, 2, D, torch.float32, [70, 129], 130)
    check(f"{backend} H={H} Hkv={Hkv} D={D}", pyattn.decode_attention(q, k, v, sl, backend=backend),
          q, k, v, sl, bt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
def test_window_alibi(backend, dtype, paged):
    skip_unless_backend(backend)
    q, k, v, sl, bt = make_case(3, 4, 2, 4, 32, dtype, [150, 7, 90], 150, page_size=16 if paged else None)
    slopes = torch.rand(4) * 0.3
    for window, wl in (((20, None), 20), ((0, None), 0)):
        out = pyattn.decode_attention(q, k, v, sl, block_table=bt, window=window, alibi_slopes=slopes,
                                      backend=backend)
        check(f"{backend} window={window}", out, q, k, v, sl, bt, wl=wl, alibi_slopes=slopes.expand(3, 4))
    # per-sequence slopes (B, H), non-causal
    slopes2 = torch.rand(3, 4)
    out = pyattn.decode_attention(q, k, v, sl, block_table=bt, causal=False, alibi_slopes=slopes2, backend=backend)
    check(f"{backend} non-causal alibi (B, H)", out, q, k, v, sl, bt, wr=-1, alibi_slopes=slopes2)


@pytest.mark.parametrize("page_size", [16, 48, 64, 256])
def test_page_sizes_cpu(page_size):
    q, k, v, sl, bt = make_case(3, 8, 2, 1, 64, torch.bfloat16, [700, 1, 513], 700, page_size=page_size)
    out = pyattn.decode_attention(q, k, v, sl, block_table=bt, backend="cpu")
    check(f"page {page_size}", out, q, k, v, sl, bt)
    # same data laid out contiguously gives the same answer
    kc = torch.stack([k[bt[b].long()].transpose(0, 1).reshape(2, -1, 64)[:, :700] for b in range(3)])
    vc = torch.stack([v[bt[b].long()].transpose(0, 1).reshape(2, -1, 64)[:, :700] for b in range(3)])
    ref = pyattn.decode_attention(q, kc, vc, sl, backend="cpu")
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_page_size_256_triton_too(backend):
    skip_unless_backend(backend)
    q, k, v, sl, bt = make_case(2, 4, 2, 1, 32, torch.float16, [300, 257], 512, page_size=256)
    check(f"{backend} page 256", pyattn.decode_attention(q, k, v, sl, block_table=bt, backend=backend),
          q, k, v, sl, bt)


@pytest.mark.parametrize("backend", BACKENDS + ["reference"])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("Nq", [1, 4])
def test_append(backend, paged, Nq):
    skip_unless_backend(backend)
    dtype = torch.bfloat16
    cap = 96
    q, k, v, sl, bt = make_case(3, 4, 2, Nq, 32, dtype, [10, 0, cap - Nq], cap, page_size=16 if paged else None)
    k_new = torch.randn(3, 2, Nq, 32).to(dtype)
    v_new = torch.randn(3, 2, Nq, 32).to(dtype)
    k_exp, v_exp = k.clone(), v.clone()
    append_kv(k_exp, v_exp, k_new, v_new, sl, bt)
    sl_before = sl.clone()
    out = pyattn.decode_attention(q, k, v, sl, k_new=k_new, v_new=v_new, block_table=bt, backend=backend)
    assert torch.equal(k, k_exp) and torch.equal(v, v_exp), "cache contents after the append"
    assert torch.equal(sl, sl_before), "cache_seqlens must not be modified"
    # the appended tokens really sit where expected
    if not paged:
        assert torch.equal(k[0, :, 10:10 + Nq], k_new[0]) and torch.equal(v[2, :, cap - Nq:], v_new[2])
    check(f"{backend} append paged={paged}", out, q, k, v, sl, bt, n_appended=Nq)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("paged", [False, True])
def test_num_splits_agree(backend, paged):
    skip_unless_backend(backend)
    cap = 256 if backend == "triton" else 1100
    q, k, v, sl, bt = make_case(2, 4, 1, 1, 64, torch.float32, [cap, cap // 3], cap,
                                page_size=64 if paged else None)
    one = pyattn.decode_attention(q, k, v, sl, block_table=bt, num_splits=1, backend=backend)
    for splits in (3, 16):
        many, lse = pyattn.decode_attention(q, k, v, sl, block_table=bt, num_splits=splits, backend=backend,
                                            return_lse=True)
        torch.testing.assert_close(many, one, atol=2e-6, rtol=1e-5)
        check(f"{backend} splits={splits}", many, q, k, v, sl, bt)
    assert decode_ops.choose_num_splits(1, 1, 32768, torch.device("cpu")) > 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_q(backend):
    skip_unless_backend(backend)
    q, k, v, sl, bt = make_case(2, 4, 2, 1, 32, torch.float32, [40, 64], 64)
    q_bnhd = q.transpose(1, 2).contiguous().transpose(1, 2)  # (B, N, H, D) memory viewed as (B, H, N, D)
    out = pyattn.decode_attention(q_bnhd, k, v, sl, backend=backend)
    check(f"{backend} strided q", out, q, k, v, sl, bt)


def test_inputs_not_modified_without_append():
    q, k, v, sl, bt = make_case(2, 4, 2, 1, 32, torch.float32, [40, 64], 64, page_size=16)
    copies = [t.clone() for t in (q, k, v, sl, bt)]
    pyattn.decode_attention(q, k, v, sl, block_table=bt, backend="cpu")
    for t, c in zip((q, k, v, sl, bt), copies):
        assert torch.equal(t, c)


# --------------------------------------------------------------------------------------------
# PagedKVCache
def test_paged_kv_cache_lifecycle():
    cache = pyattn.PagedKVCache(num_layers=2, num_pages=12, page_size=16, num_kv_heads=2, head_dim=32,
                                dtype=torch.float32)
    a, b = cache.add_sequence(), cache.add_sequence(length=40)
    assert cache.free_pages == 12 - 3
    ka, va = torch.randn(1, 2, 20, 32), torch.randn(1, 2, 20, 32)
    kb, vb = torch.randn(1, 2, 30, 32), torch.randn(1, 2, 30, 32)
    for layer in range(2):
        cache.append([a], ka * (layer + 1), va, layer=layer)
        cache.append([b], kb, vb * (layer + 1), layer=layer)
    cache.advance([a], 20)
    cache.advance([b], 30)
    assert cache.cache_seqlens([a, b]).tolist() == [20, 30]
    bt = cache.block_table([a, b])
    assert bt.dtype == torch.int32 and bt.shape == (2, 12)
    q = torch.randn(2, 4, 1, 32)
    k1, v1 = torch.randn(2, 2, 1, 32), torch.randn(2, 2, 1, 32)
    cache.reserve([a, b], 1)
    k_pages, v_pages = cache.layer(1)
    out = pyattn.decode_attention(q, k_pages, v_pages, cache.cache_seqlens([a, b]), block_table=cache.block_table([a, b]),
                                  k_new=k1, v_new=v1, backend="cpu")
    cache.advance([a, b], 1)
    # the same computation on contiguous tensors
    kc = torch.zeros(2, 2, 31, 32)
    vc = torch.zeros(2, 2, 31, 32)
    kc[0, :, :20], vc[0, :, :20], kc[0, :, 20:21], vc[0, :, 20:21] = ka[0] * 2, va[0], k1[0], v1[0]
    kc[1, :, :30], vc[1, :, :30], kc[1, :, 30:31], vc[1, :, 30:31] = kb[0], vb[0] * 2, k1[1], v1[1]
    ref = pyattn.decode_attention(q, kc, vc, torch.tensor([21, 31], dtype=torch.int32), backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    used = cache.free_pages
    cache.free(a)
    assert cache.free_pages == used + 2
    with pytest.raises(KeyError):
        cache.length(a)
    with pytest.raises(ValueError, match="reserve"):
        cache.advance([b], 100)
    cache.add_sequence(length=16 * (cache.free_pages - 1))  # leaves one free page
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.reserve([b], 40)  # 71 tokens: 5 pages, 2 more than b holds
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        cache.reserve([b], 16 * 12)


# --------------------------------------------------------------------------------------------
# custom ops: opcheck, torch.compile
def _op_args(paged, backend="cpu"):
    q, k, v, sl, bt = make_case(2, 4, 2, 2, 32, torch.float32, [30, 64], 64, page_size=16 if paged else None)
    return q, k, v, sl, bt


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(paged, backend):
    q, k, v, sl, bt = _op_args(paged)
    torch.library.opcheck(decode_ops.decode_attention_fwd,
                          (q, k, v, sl, bt, torch.rand(2, 4), 0.2, 5, 0, 0, 2, backend))
    sl_small = torch.tensor([3, 10], dtype=torch.int32)
    kn, vn = torch.randn(2, 2, 2, 32), torch.randn(2, 2, 2, 32)
    torch.library.opcheck(decode_ops.decode_kv_append, (k.clone(), v.clone(), kn, vn, sl_small, bt, backend))


@pytest.mark.parametrize("paged", [False, True])
def test_compile_fullgraph(paged):
    torch._dynamo.reset()
    q, k, v, sl, bt = _op_args(paged)
    sl = torch.tensor([30, 40], dtype=torch.int32)
    kn, vn = torch.randn(2, 2, 2, 32), torch.randn(2, 2, 2, 32)

    def step(q, k, v, sl, kn, vn, bt):
        out = pyattn.decode_attention(q, k, v, sl, k_new=kn, v_new=vn, block_table=bt, backend="cpu")
        return out * 2

    k_eager, v_eager = k.clone(), v.clone()
    expected = step(q, k_eager, v_eager, sl, kn, vn, bt)
    compiled = torch.compile(step, fullgraph=True)
    got = compiled(q, k, v, sl, kn, vn, bt)
    torch.testing.assert_close(got, expected)
    assert torch.equal(k, k_eager) and torch.equal(v, v_eager), "the compiled append writes the caches"


# --------------------------------------------------------------------------------------------
# bad input
def test_bad_input():
    q, k, v, sl, bt = make_case(2, 4, 2, 1, 32, torch.float32, [30, 64], 64, page_size=16)
    dec = pyattn.decode_attention
    bad = bt.clone()
    bad[1, 3] = 99
    with pytest.raises(ValueError, match=r"block_table\[1, 3\] = 99 is out of range"):
        dec(q, k, v, sl, block_table=bad)
    with pytest.raises(ValueError, match="cache_seqlens.*exceeds the cache capacity 64"):
        dec(q, k, v, torch.tensor([30, 65], dtype=torch.int32), block_table=bt)
    with pytest.raises(ValueError, match="cache_seqlens.*new tokens exceeds"):
        dec(q, k, v, sl, block_table=bt, k_new=torch.randn(2, 2, 1, 32), v_new=torch.randn(2, 2, 1, 32))
    with pytest.raises(ValueError, match="v_cache.*page size mismatch"):
        dec(q, k, v[:, :, :8], sl, block_table=bt)
    with pytest.raises(TypeError, match="k_cache has dtype bfloat16 but q has float32"):
        dec(q, k.bfloat16(), v.bfloat16(), sl, block_table=bt)
    with pytest.raises(TypeError, match="cache_seqlens must have dtype in \\(int32\\)"):
        dec(q, k, v, sl.long(), block_table=bt)
    with pytest.raises(TypeError, match="block_table must have dtype"):
        dec(q, k, v, sl, block_table=bt.long())
    with pytest.raises(ValueError, match="cache_seqlens must be >= 0"):
        dec(q, k, v, torch.tensor([-1, 3], dtype=torch.int32), block_table=bt)
    with pytest.raises(ValueError, match="multiple of the number of cache heads"):
        dec(torch.randn(2, 3, 1, 32), k, v, sl, block_table=bt)
    with pytest.raises(ValueError, match="k_new must have shape"):
        dec(q, k, v, torch.tensor([3, 3], dtype=torch.int32), block_table=bt, k_new=torch.randn(2, 2, 2, 32),
            v_new=torch.randn(2, 2, 2, 32))
    with pytest.raises(ValueError, match="k_new and v_new"):
        dec(q, k, v, sl, block_table=bt, k_new=torch.randn(2, 2, 1, 32))
    with pytest.raises(ValueError, match="num_splits"):
        dec(q, k, v, sl, block_table=bt, num_splits=0)
    qc, kc, vc, slc, _ = make_case(2, 4, 2, 1, 32, torch.float32, [30, 64], 64)
    with pytest.raises(ValueError, match="k_cache batch size 1 must equal q batch size 2"):
        dec(qc, kc[:1], vc[:1], slc)
    with pytest.raises(ValueError, match="cache_seqlens must have shape"):
        dec(qc, kc, vc, slc[:1])
    with pytest.raises(ValueError, match="inference only.*q requires grad"):
        dec(qc.requires_grad_(), kc, vc, slc)
    with torch.no_grad():  # fine without grad mode
        dec(qc, kc, vc, slc)


# --------------------------------------------------------------------------------------------
# GPU backends (skipped without a CUDA device)
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_backends(backend, dtype, paged):
    q, k, v, sl, bt = make_case(3, 8, 2, 2, 128, dtype, [1000, 0, 513], 1024, page_size=64 if paged else None)
    q, k, v, sl = q.cuda(), k.cuda(), v.cuda(), sl.cuda()
    bt = bt.cuda() if bt is not None else None
    k_new, v_new = torch.randn(3, 2, 2, 128, device="cuda").to(dtype), torch.randn(3, 2, 2, 128, device="cuda").to(dtype)
    k_exp, v_exp = k.clone(), v.clone()
    append_kv(k_exp, v_exp, k_new, v_new, sl, bt)
    slopes = torch.rand(8) * 0.1
    bt_cpu = bt.cpu() if bt is not None else None
    for splits in (1, 7):
        kk, vv = k.clone(), v.clone()
        out = pyattn.decode_attention(q, kk, vv, sl, k_new=k_new, v_new=v_new, block_table=bt, num_splits=splits,
                                      alibi_slopes=slopes.cuda(), window=(300, None), backend=backend)
        assert torch.equal(kk, k_exp) and torch.equal(vv, v_exp), "cache contents after the append"
        ref64, low, _ = references(q.cpu(), kk.cpu(), vv.cpu(), sl.cpu(), bt_cpu, n_appended=2, wl=300,
                                   alibi_slopes=slopes.expand(3, 8))
        assert_tolerance(f"{backend} {dtype} paged={paged} splits={splits}", out.cpu(), low, ref64)


def test_bf16_widening_path(monkeypatch):
    """bf16 caches also through the fp32-widening score path (the one CPUs without AVX512-BF16 take)."""
    monkeypatch.setenv("PYATTN_CPU_DECODE_DPBF16", "0")
    q, k, v, sl, bt = make_case(2, 8, 2, 4, 72, torch.bfloat16, [200, 3], 200, page_size=32)
    check("bf16 widening", pyattn.decode_attention(q, k, v, sl, block_table=bt, backend="cpu"), q, k, v, sl, bt)


@pytest.mark.parametrize("H,Hkv,Nq,D", [(4, 1, 2, 40), (3, 3, 1, 128), (16, 2, 1, 80), (8, 1, 3, 96), (4, 4, 1, 33)])
def test_bf16_dot_path_shapes_cpu(H, Hkv, Nq, D):
    """The AVX512-BF16 path (where the CPU has it): 1-4 query rows per score group and several
    groups (R up to 24), key blocks whose length is not a multiple of four (ragged and paged),
    head dims with a masked tail (40, 80, 33) and multiples of 32 (the even/odd P @ V loads)."""
    skip_unless_backend("cpu")
    for page_size in (None, 16):
        q, k, v, sl, bt = make_case(2, H, Hkv, Nq, D, torch.bfloat16, [70, 129], 130, page_size=page_size)
        for splits in (1, 3):
            out = pyattn.decode_attention(q, k, v, sl, block_table=bt, num_splits=splits, backend="cpu")
            check(f"bf16 H={H} Hkv={Hkv} Nq={Nq} D={D} page={page_size} splits={splits}", out, q, k, v, sl, bt)
