"""Block schedules (pyattn.BlockMask), the classic layouts and block-sparse attention."""
import pytest
import torch

import pyattn
from pyattn import BlockMask, layouts
from pyattn.block_mask import pack_bits, unpack_bits
from pyattn.reference.attention import attention_reference, schedule_bias
from helpers import DEVICE, assert_tolerance, skip_unless_backend, strided_like

LOW_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def table(layout: BlockMask) -> torch.Tensor:
    full, partial = layout.block_table()
    return (full | partial)[0].cpu()


def rows(t):
    """Block table (nb, nb) -> per row the list of visited columns."""
    return [torch.nonzero(r).flatten().tolist() for r in t]


# ------------------------------------------------------------------ builders vs hand-made tables
def test_fixed_bidirectional_by_hand():
    lay = layouts.fixed(2, 8 * 16, 16, num_local_blocks=4, num_global_blocks=1)
    assert rows(table(lay)[0]) == [[0, 1, 2, 3, 7]] * 4 + [[3, 4, 5, 6, 7]] * 4


def test_fixed_unidirectional_by_hand():
    lay = layouts.fixed(2, 8 * 16, 16, num_local_blocks=4, num_global_blocks=1, attention="unidirectional")
    assert rows(table(lay)[0]) == [[0], [0, 1], [0, 1, 2], [0, 1, 2, 3], [3, 4], [3, 4, 5], [3, 4, 5, 6],
                                   [3, 4, 5, 6, 7]]


def test_fixed_different_global_patterns_per_head():
    lay = layouts.fixed(2, 8 * 16, 16, different_layout_per_head=True, num_local_blocks=4, num_global_blocks=1,
                        num_different_global_patterns=2)
    t = table(lay)
    assert t.shape == (2, 8, 8)
    assert rows(t[1])[0] == [0, 1, 2, 3, 6]  # head 1: global column shifted by one block


def test_sliding_window_by_hand():
    lay = layouts.sliding_window(1, 5 * 16, 16, num_sliding_window_blocks=3)
    assert rows(table(lay)[0]) == [[0], [0, 1], [1, 2], [2, 3], [3, 4]]
    bi = layouts.sliding_window(1, 5 * 16, 16, num_sliding_window_blocks=3, attention="bidirectional")
    assert rows(table(bi)[0]) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4]]


def test_bigbird_without_random_by_hand():
    lay = layouts.bigbird(1, 5 * 16, 16, num_random_blocks=0, num_sliding_window_blocks=3, num_global_blocks=1)
    assert rows(table(lay)[0]) == [[0, 1, 2, 3, 4], [0, 1, 2], [0, 1, 2, 3], [0, 2, 3, 4], [0, 3, 4]]


def test_bigbird_random_blocks_follow_the_seed():
    a = layouts.bigbird(4, 32 * 16, 16, different_layout_per_head=True, num_random_blocks=2, seed=7)
    b = layouts.bigbird(4, 32 * 16, 16, different_layout_per_head=True, num_random_blocks=2, seed=7)
    c = layouts.bigbird(4, 32 * 16, 16, different_layout_per_head=True, num_random_blocks=2, seed=8)
    ta, tb, tc = (table(x) for x in (a, b, c))
    assert torch.equal(ta, tb) and not torch.equal(ta, tc)
    base = table(layouts.bigbird(1, 32 * 16, 16, num_random_blocks=0))
    extra = (ta & ~base).sum(-1)  # random blocks outside window + global: at most 2 per row
    assert int(extra.max()) <= 2 and int(extra.sum()) > 0
    assert not torch.equal(ta[0], ta[1])  # per-head random layouts differ


def test_longformer_and_strided_by_hand():
    lay = layouts.longformer(1, 4 * 16, 16, num_sliding_window_blocks=1, global_block_indices=[2])
    assert rows(table(lay)[0]) == [[0, 2], [1, 2], [0, 1, 2, 3], [2, 3]]
    st = layouts.strided(1, 5 * 16, 16, num_local_blocks=2)
    assert rows(table(st)[0]) == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [0, 2, 3, 4]]


def test_variable_by_hand():
    lay = layouts.variable(1, 6 * 16, 16, local_window_blocks=[1, 2], global_block_indices=[0])
    assert rows(table(lay)[0]) == [[0], [0, 1, 2], [0, 1, 2], [0, 3, 4], [0, 3, 4], [0, 5]]


def test_dense_from_dense_and_deepspeed_config():
    assert bool(table(layouts.dense(2, 100, 32)).all())
    t = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    lay = layouts.from_dense(t, 90, 32)
    assert torch.equal(table(lay)[0], t.bool()) and lay.seq_lengths == (90, 90)
    cfg = {"mode": "fixed", "block": 16, "different_layout_per_head": True, "num_local_blocks": 4,
           "num_global_blocks": 1, "attention": "unidirectional", "horizontal_global_attention": False,
           "num_different_global_patterns": 1, "num_random_blocks": 5}  # other modes' keys are ignored
    ds = layouts.from_deepspeed(cfg, num_heads=2, seq_len=128)
    ref = layouts.fixed(2, 128, 16, different_layout_per_head=True, num_local_blocks=4, attention="unidirectional")
    assert torch.equal(table(ds), table(ref))
    with pytest.raises(ValueError, match="mode"):
        layouts.from_deepspeed({"mode": "nope"}, 2, 128)


def test_lists_are_sorted_and_transposed():
    t = torch.tensor([[[[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 1]]]], dtype=torch.bool)
    lay = BlockMask.from_dense(t, block_size=16)
    assert lay.full_kv_num_blocks.tolist() == [[[3, 0, 2]]]
    assert lay.full_kv_indices[0, 0, 0, :3].tolist() == [0, 2, 3]
    assert lay.full_kv_indices[0, 0, 2, :2].tolist() == [1, 3]
    assert lay.full_q_num_blocks.tolist() == [[[1, 1, 1, 2]]]
    assert lay.full_q_indices[0, 0, 3, :2].tolist() == [0, 2]
    assert int(lay.kv_num_blocks.sum()) == 0 and lay.mask_bits is None


def test_from_mask_fn_partial_blocks_and_dense_mask():
    N = 70
    lay = layouts.from_mask_fn(lambda b, h, q, k: q >= k, None, None, N, N, 16)
    nb = 5
    assert lay.kv_num_blocks[0, 0].tolist() == [1] * nb  # the diagonal blocks are partial
    assert lay.full_kv_num_blocks[0, 0].tolist() == list(range(nb))
    assert torch.equal(lay.to_dense_mask()[0, 0], torch.ones(N, N, dtype=torch.bool).tril())
    assert abs(lay.density - (nb * (nb + 1) / 2 * 16 * 16 - (nb * 16 - N) * 16 * nb) / N**2) < 1e-9 or lay.density > 0.5
    assert "density" in repr(lay) and "Nq=70" in repr(lay)


def test_pack_bits_roundtrip():
    m = torch.rand(2, 3, 5, 29) > 0.5
    assert torch.equal(unpack_bits(pack_bits(m), 29), m)


def test_density_and_plot(tmp_path):
    lay = layouts.sliding_window(2, 4 * 32, 32, num_sliding_window_blocks=1, attention="bidirectional")
    assert abs(lay.density - 0.25) < 1e-12
    path = tmp_path / "layout.png"
    layouts.bigbird(3, 256, 32, different_layout_per_head=True).plot(path)
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ attention vs the reference
def _reference(q, k, v, lay, causal, kpm, dtype):
    vis = lay.to_dense_mask().to(q.device)
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    leaves = [t.detach().clone().to(dtype).requires_grad_() for t in (q, k, v)]
    bias = schedule_bias(leaves[0].detach(), vis)
    out, _ = attention_reference(*leaves, bias=bias, key_padding_mask=None if kpm is None else ~kpm,
                                 window_left=-1, window_right=0 if causal else -1, compute_dtype=dtype)
    return out, leaves


def check_block_sparse(backend, q, k, v, lay, *, causal=False, kpm=None, grad=True, factor=2.0):
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out = pyattn.block_sparse_attention(*leaves, lay, causal=causal, key_padding_mask=kpm, backend=backend)
    o64, l64 = _reference(q, k, v, lay, causal, kpm, torch.float64)
    olo, llo = _reference(q, k, v, lay, causal, kpm, dtype)
    assert out.dtype == dtype and out.shape == q.shape
    assert_tolerance("out", out, olo, o64, floor=LOW_FLOOR[dtype])
    if grad:
        g = torch.randn_like(out)
        out.backward(g)
        o64.backward(g.double())
        olo.backward(g)
        for name, a, lo, hi in zip(("dq", "dk", "dv"), leaves, llo, l64):
            assert_tolerance(name, a.grad, lo.grad, hi.grad, factor=3.0, floor=LOW_FLOOR[dtype])
    return out, leaves


def _inputs(B=2, H=4, Hkv=2, N=150, D=40, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h: torch.randn(B, h, N, D, generator=g).to(DEVICE, dtype)  # noqa: E731
    return mk(H), mk(Hkv), mk(Hkv)


BUILDERS = {
    "fixed": lambda H, N, b: layouts.fixed(H, N, b, num_local_blocks=2),
    "fixed_uni_heads": lambda H, N, b: layouts.fixed(H, N, b, True, num_local_blocks=2, attention="unidirectional",
                                                      num_different_global_patterns=2),
    "strided": lambda H, N, b: layouts.strided(H, N, b, num_local_blocks=2),
    "longformer": lambda H, N, b: layouts.longformer(H, N, b, num_sliding_window_blocks=1),
    "bigbird": lambda H, N, b: layouts.bigbird(H, N, b, True, num_sliding_window_blocks=1, seed=3),
    "sliding_window": lambda H, N, b: layouts.sliding_window(H, N, b),
    "variable": lambda H, N, b: layouts.variable(H, N, b, True, num_random_blocks=1, local_window_blocks=[1, 2]),
    "dense": lambda H, N, b: layouts.dense(H, N, b),
    "mask_fn": lambda H, N, b: layouts.from_mask_fn(lambda bb, h, q, k: ((q - k).abs() < 40) | (k % 37 == h), None,
                                                    H, N, N, b),
    "from_dense": lambda H, N, b: layouts.from_dense(torch.rand(H, -(-N // b), -(-N // b),
                                                                generator=torch.Generator().manual_seed(1)) > 0.6,
                                                     N, b),
}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_every_builder_on_cpu(builder):
    q, k, v = _inputs()
    lay = BUILDERS[builder](4, 150, 32)
    kpm = torch.zeros(2, 150, dtype=torch.bool)
    kpm[1, 120:] = True
    check_block_sparse("cpu", q, k, v, lay, causal=True, kpm=kpm)
    check_block_sparse("cpu", q, k, v, lay, grad=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_strided_cpu(dtype):
    q, k, v = _inputs(dtype=dtype, N=130, D=64)
    lay = layouts.bigbird(4, 130, 16, True, num_sliding_window_blocks=3, seed=1)
    check_block_sparse("cpu", strided_like(q), strided_like(k), v, lay, causal=True)


def test_rows_without_visible_key_are_zero_cpu():
    q, k, v = _inputs(B=1, H=2, Hkv=2, N=64, D=16)
    t = torch.tensor([[1, 0], [0, 0]], dtype=torch.bool)  # query block 1 visits nothing
    lay = BlockMask.from_dense(t, block_size=32, seq_lengths=(64, 64))
    out, leaves = check_block_sparse("cpu", q, k, v, lay)
    assert out[:, :, 32:].abs().max() == 0
    assert leaves[0].grad[:, :, 32:].abs().max() == 0
    assert leaves[1].grad[:, :, 32:].abs().max() == 0  # key block 1 is visited by nobody


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_multi_block(backend):
    N = 1024
    q, k, v = _inputs(B=1, H=2, Hkv=1, N=N, D=32)
    lay = layouts.bigbird(2, N, 64, True, num_random_blocks=2, num_sliding_window_blocks=3, seed=0)
    assert int(lay.full_kv_num_blocks.min()) >= 4  # several key blocks per query block
    check_block_sparse(backend, q, k, v, lay, causal=backend == "cpu")


@pytest.mark.parametrize("block", [16, 32, 64, 128])
def test_uneven_schedule_per_batch_and_head_cpu(block):
    """Query blocks with very different key counts (a global row and column, random blocks per
    (batch, head)), N not a multiple of the block: the forward takes the query blocks by work, most
    first, and the backward spreads the key blocks over several classes; both must stay exact."""
    N = 3 * block + block // 2 + 3
    nb = -(-N // block)
    q, k, v = _inputs(B=2, H=2, Hkv=1, N=N, D=32, seed=block)
    t = torch.rand(2, 2, nb, nb, generator=torch.Generator().manual_seed(block)) > 0.6
    t[:, :, 0, :] = True  # global row: the largest task
    t[:, :, :, 0] = True  # global column: the key block every query block visits
    t[1, 0, 2, :] = False  # a query block with no key
    lay = layouts.from_dense(t, N, block)
    assert tuple(lay.shape[:2]) == (2, 2)
    out, leaves = check_block_sparse("cpu", q, k, v, lay)
    assert out[1, 0, 2 * block:3 * block].abs().max() == 0
    check_block_sparse("cpu", q, k, v, lay, causal=True)


def test_triton_multi_block_and_bits():
    skip_unless_backend("triton")
    N = 1030  # > 1024, not a multiple of the block; the interpreter is slow: few blocks per row
    q, k, v = _inputs(B=1, H=1, Hkv=1, N=N, D=16)
    nb = -(-N // 128)
    t = torch.eye(nb, dtype=torch.bool)
    t[:, 0] = True
    t[5, 2] = True
    lay = layouts.from_dense(t, N, 128)
    kpm = torch.zeros(1, N, dtype=torch.bool)
    kpm[0, 1000:] = True
    check_block_sparse("triton", q, k, v, lay, kpm=kpm)


def test_triton_per_head_gqa_causal():
    skip_unless_backend("triton")
    q, k, v = _inputs(B=1, H=2, Hkv=1, N=70, D=16)
    lay = layouts.bigbird(2, 70, 16, True, num_sliding_window_blocks=1, seed=2)
    check_block_sparse("triton", q, k, v, lay, causal=True)


def test_cuda_backend_reports_block_sparse_unavailable():
    from pyattn._dispatch import BackendUnavailableError

    q, k, v = _inputs(B=1, H=1, Hkv=1, N=32, D=16)
    with pytest.raises(BackendUnavailableError, match="no CUDA kernel"):
        pyattn.block_sparse_attention(q, k, v, layouts.dense(1, 32, 16), backend="cuda")


# ------------------------------------------------------------------ op plumbing
def _op_args(q, k, v, lay, backend):
    bq, bk = lay.block_size
    return (q, k, v, lay.kv_num_blocks, lay.kv_indices, lay.full_kv_num_blocks, lay.full_kv_indices,
            lay.q_num_blocks, lay.q_indices, lay.full_q_num_blocks, lay.full_q_indices, lay.mask_bits, None, bq, bk,
            0.25, -1, 0, True, 0.0, None, backend)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    from pyattn.ops.block_sparse import block_sparse_fwd

    q, k, v = (t.requires_grad_() for t in _inputs(B=1, H=2, Hkv=1, N=40, D=16))
    lay = layouts.from_mask_fn(lambda b, h, qi, ki: (qi - ki).abs() < 20, None, None, 40, 40, 16)
    torch.library.opcheck(block_sparse_fwd, _op_args(q, k, v, lay, backend))


def test_compile_fullgraph():
    lay = layouts.bigbird(2, 48, 16, True, num_sliding_window_blocks=1)
    mod = pyattn.nn.BlockSparseSelfAttention(32, 2, lay, causal=True)

    def f(x):
        return mod(x).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 48, 32, requires_grad=True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)
    assert "num_heads=2" in repr(mod)


# ------------------------------------------------------------------ bad input
def test_bad_input():
    q, k, v = _inputs(B=1, H=2, Hkv=2, N=64, D=16)
    with pytest.raises(ValueError, match="layout was built for"):
        pyattn.block_sparse_attention(q, k, v, layouts.dense(2, 96, 16))
    with pytest.raises(ValueError, match="heads"):
        pyattn.block_sparse_attention(q, k, v, layouts.bigbird(3, 64, 16, True))
    with pytest.raises(TypeError, match="layout"):
        pyattn.block_sparse_attention(q, k, v, torch.ones(4, 4))
    with pytest.raises(ValueError, match="block_size"):
        layouts.dense(2, 64, 48)
    with pytest.raises(ValueError, match="block_size"):
        layouts.dense(2, 64, 256)
    good = layouts.dense(2, 64, 16)
    bad_idx = good.full_kv_indices.clone()
    bad_idx[0, 0, 0, 0] = 9
    fields = {f: getattr(good, f) for f in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "q_num_blocks",
                                            "q_indices", "full_q_num_blocks", "full_q_indices")}
    with pytest.raises(ValueError, match="full_kv_indices.*out of range"):
        BlockMask(full_kv_indices=bad_idx, block_size=(16, 16), seq_lengths=(64, 64), **fields)
    with pytest.raises(TypeError, match="mask_fn"):
        layouts.from_mask_fn(lambda b, h, qi, ki: (qi - ki).float(), None, None, 64, 64, 16)
    with pytest.raises(ValueError, match="key_padding_mask"):
        pyattn.block_sparse_attention(q, k, v, good, key_padding_mask=torch.zeros(1, 63, dtype=torch.bool))
    with pytest.raises(ValueError, match="num_local_blocks"):
        layouts.fixed(2, 64, 16, num_local_blocks=3, num_global_blocks=2)


# ------------------------------------------------------------------ boolean masks cost bits
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_bool_attn_mask_through_the_schedule(backend):
    skip_unless_backend(backend)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 70, 16, generator=g)
    k, v = (torch.randn(1, 2, 90, 16, generator=g) for _ in range(2))
    m = torch.rand(1, 1, 70, 90, generator=g) > 0.4
    m[..., :, 64:] = False  # a fully masked key block
    m[..., 3, :] = False  # a fully masked row
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pyattn.attention(*leaves, attn_mask=m, backend=backend)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = pyattn.attention(*ref_leaves, attn_mask=m, backend="reference")
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert out[0, :, 3].abs().max() == 0
    gout = torch.randn_like(out)
    out.backward(gout)
    ref.backward(gout.double())
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=1e-5, rtol=1e-5)


def test_bool_attn_mask_allocates_bits_not_floats():
    from torch.profiler import ProfilerActivity, profile

    N = 8192
    q, k, v = (torch.randn(1, 1, N, 16) for _ in range(3))
    mask = torch.ones(N, N, dtype=torch.bool).tril()
    for fn in (lambda: pyattn.attention(q, k, v, attn_mask=mask, backend="cpu"),
               lambda: pyattn.sdpa(q, k, v, attn_mask=mask)):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        biggest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
        # an (N, N) fp32 bias would be 256 MiB and the bool mask itself is 64 MiB: bits are 8 MiB
        assert biggest <= N * N // 8 + 2**20, f"largest allocation {biggest / 2**20:.1f} MiB"
