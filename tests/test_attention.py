import pytest
import torch

import pyattn
from pyattn.reference.attention import attention_reference
from helpers import DEVICE, DTYPES, backends_for_device, skip_unless_backend
from attention_cases import check_attention, make_inputs

BACKENDS = backends_for_device()


@pytest.fixture(params=BACKENDS)
def backend(request):
    skip_unless_backend(request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [
    dict(Nq=17), dict(Nq=1), dict(Nq=97, Nk=33), dict(Nq=13, Nk=70), dict(Nq=64, D=16),
], ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()))
def test_dense(backend, dtype, shape):
    check_attention(backend, *make_inputs(dtype=dtype, **shape))


@pytest.mark.parametrize("D", [1, 40, 80, 96, 111, 128, 256])
def test_head_dims(backend, D):
    check_attention(backend, *make_inputs(B=1, H=2, Nq=33, Nk=20, D=D, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Hkv", [2, 1])
def test_gqa_mqa(backend, dtype, Hkv):
    check_attention(backend, *make_inputs(H=4, Hkv=Hkv, Nq=19, Nk=23, dtype=dtype), causal=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("Nq,Nk,align", [(37, 37, "bottom_right"), (13, 29, "bottom_right"), (29, 13, "bottom_right"),
                                         (29, 13, "top_left"), (13, 29, "top_left"), (129, 129, "bottom_right")])
def test_causal(backend, dtype, Nq, Nk, align):
    check_attention(backend, *make_inputs(Nq=Nq, Nk=Nk, dtype=dtype), causal=True, causal_alignment=align)


def test_causal_rows_without_keys_are_zero(backend):
    q, k, v = make_inputs(Nq=20, Nk=5)  # bottom-right: the first 15 queries see nothing
    out = check_attention(backend, q, k, v, causal=True)
    assert torch.all(out[:, :, :15] == 0)


@pytest.mark.parametrize("window", [(5, 3), (0, 0), (None, 2), (4, None), (40, 40)])
def test_window(backend, window):
    check_attention(backend, *make_inputs(Nq=97, Nk=97, dtype=torch.float32), window=window)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_key_padding_with_fully_masked_row(backend, dtype):
    q, k, v = make_inputs(B=3, Nq=21, Nk=30, dtype=dtype)
    kpm = torch.rand(3, 30, generator=torch.Generator().manual_seed(3)) <= 0.4  # True = padding
    kpm[1] = True  # batch 1 sees no key
    kpm = kpm.to(DEVICE)
    out = check_attention(backend, q, k, v, key_padding_mask=kpm)
    assert torch.all(out[1] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias_shape", [(1, 2, 21, 30), (2, 1, 1, 30), (21, 30)], ids=str)
def test_bias_with_grad(backend, dtype, bias_shape):
    q, k, v = make_inputs(Nq=21, Nk=30, dtype=dtype)
    bias = torch.randn(bias_shape, device=DEVICE, dtype=dtype)
    check_attention(backend, q, k, v, bias=bias)


def test_bool_and_float_attn_mask(backend):
    q, k, v = make_inputs(Nq=21, Nk=30)
    m = torch.rand(2, 1, 21, 30, generator=torch.Generator().manual_seed(4)).to(DEVICE) > 0.3
    m[0, 0, 3] = False  # a fully masked row
    out = check_attention(backend, q, k, v, attn_mask=m)
    assert torch.all(out[0, :, 3] == 0)
    check_attention(backend, q, k, v, attn_mask=torch.randn(21, 30, device=DEVICE))


@pytest.mark.parametrize("slopes_shape", [(2,), (2, 2)])
def test_alibi(backend, slopes_shape):
    q, k, v = make_inputs(Nq=25, Nk=31)
    check_attention(backend, q, k, v, alibi_slopes=torch.rand(slopes_shape, device=DEVICE), causal=True)


def test_masks_combined(backend):
    q, k, v = make_inputs(B=2, H=4, Hkv=2, Nq=45, Nk=60, dtype=torch.bfloat16)
    kpm = (torch.rand(2, 60, generator=torch.Generator().manual_seed(5)) <= 0.2).to(DEVICE)  # True = padding
    bias = torch.randn(1, 4, 45, 60, device=DEVICE, dtype=torch.bfloat16)
    check_attention(backend, q, k, v, causal=True, window=(16, None), key_padding_mask=kpm, bias=bias)


@pytest.mark.parametrize("tiles", ["default", "sgemm", "brgemm"])
@pytest.mark.parametrize("D", [1, 64, 111, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_forward_tile_paths(monkeypatch, tiles, D, dtype):
    # the cpu forward's tile products: brgemm (bf16 tiles where the CPU has AVX512-BF16) or sgemm
    skip_unless_backend("cpu")
    if tiles != "default":
        monkeypatch.setenv("PYATTN_CPU_ATTN_BRGEMM", "0" if tiles == "sgemm" else "1")
    q, k, v = make_inputs(B=2, H=4, Hkv=2, Nq=301, Nk=333, D=D, dtype=dtype)
    kpm = (torch.rand(2, 333, generator=torch.Generator().manual_seed(3)) <= 0.25).to(DEVICE)  # True = padding
    check_attention("cpu", q, k, v, causal=True, window=(97, None), key_padding_mask=kpm, dropout_p=0.2)
    check_attention("cpu", q, k, v)
    q, k, v = make_inputs(B=2, H=4, Hkv=2, Nq=7, Nk=19, D=D, dtype=dtype)  # decode-size: few query rows
    check_attention("cpu", q, k, v, causal=True, key_padding_mask=kpm[:, :19])


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")
def test_cpu_bf16_without_onednn():
    skip_unless_backend("cpu")
    q, k, v = make_inputs(B=1, H=2, Nq=70, Nk=90, D=64, dtype=torch.bfloat16)
    with torch.backends.mkldnn.flags(enabled=False):
        check_attention("cpu", q, k, v, causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_bnhd_layout(backend, dtype):
    q, k, v = make_inputs(B=2, H=3, Nq=33, Nk=40, dtype=dtype, layout="bnhd")
    assert not q.is_contiguous()
    check_attention(backend, q, k, v, causal=True)


def test_dropout_matches_reference_mask(backend):
    q, k, v = make_inputs(Nq=33, Nk=47)
    check_attention(backend, q, k, v, dropout_p=0.3, causal=True)


def test_dropout_seeded_and_unbiased(backend):
    q, k, v = make_inputs(B=1, H=1, Nq=16, Nk=16, D=16)
    torch.manual_seed(7)
    a = pyattn.attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(7)
    b = pyattn.attention(q, k, v, dropout_p=0.5, backend=backend)
    assert torch.equal(a, b)
    c = pyattn.attention(q, k, v, dropout_p=0.5, backend=backend)
    assert not torch.equal(a, c)
    n = 200 if backend != "triton" or DEVICE == "cuda" else 60
    mean = sum(pyattn.attention(q, k, v, dropout_p=0.5, backend=backend) for _ in range(n)) / n
    exact = pyattn.attention(q, k, v, backend=backend)
    # the dropout estimate is unbiased: its mean converges to the dropout-free output
    assert (mean - exact).abs().mean() < 0.6 / n ** 0.5 * exact.abs().mean() + 0.05


def test_return_lse(backend):
    q, k, v = make_inputs(Nq=19, Nk=23)
    kpm = torch.zeros(2, 23, dtype=torch.bool, device=DEVICE)
    kpm[0] = True  # batch 0 is all padding
    out, lse = pyattn.attention(q, k, v, key_padding_mask=kpm, return_lse=True, backend=backend)
    ref = torch.logsumexp((q @ k.transpose(-1, -2)).double() * 32 ** -0.5, -1)
    assert lse.dtype == torch.float32 and lse.shape == (2, 2, 19)
    assert torch.isneginf(lse[0]).all()
    torch.testing.assert_close(lse[1].double(), ref[1], rtol=1e-5, atol=1e-5)


def test_opcheck(backend):
    from pyattn.ops.attention import attention_bwd, attention_fwd

    q, k, v = (t.requires_grad_() for t in make_inputs(B=1, H=2, Nq=9, Nk=12, D=16))
    bias = torch.randn(1, 2, 9, 12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(attention_fwd, (q, k, v, None, None, None, None, None, 9, 12, 0.25, -1, 0, True, 0.0, None,
                                          backend))
    torch.library.opcheck(attention_fwd, (q, k, v, bias, None, None, None, None, 9, 12, 0.25, 4, -1, True, 0.0, None,
                                          backend))
    out, lse = attention_fwd(q, k, v, None, None, None, None, None, 9, 12, 0.25, -1, -1, True, 0.0, None, backend)
    torch.library.opcheck(attention_bwd, (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(),
                                          lse.detach(), None, None, None, None, None, 9, 12, 0.25, -1, -1, True, 0.0,
                                          None, False, backend))


def test_torch_compile_fullgraph():
    mha = pyattn.nn.GroupedQueryAttention(32, 4, causal=True).to(DEVICE)

    def f(x):
        return mha(x).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 10, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    ref = f(x2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(x.grad, x2.grad)


def test_inputs_not_modified(backend):
    q, k, v = make_inputs(Nq=17, Nk=17)
    copies = [t.clone() for t in (q, k, v)]
    pyattn.attention(q, k, v, causal=True, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), copies))


def _bad(**over):
    q, k, v = make_inputs(Nq=5, Nk=6, D=8)
    args = dict(q=q, k=k, v=v)
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    return pyattn.attention(q, k, v, **args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=torch.randn(2, 5, 8)), ValueError, "q must be 4-D"),
    (dict(k=torch.randn(2, 2, 6, 7)), ValueError, "k head dim 7 must equal q head dim 8"),
    (dict(k=torch.randn(2, 3, 6, 8), v=torch.randn(2, 3, 6, 8)), ValueError, "multiple of the number of key/value"),
    (dict(k=torch.randn(2, 2, 6, 8, dtype=torch.float16)), TypeError, "k has dtype float16 but q has float32"),
    (dict(k=torch.randn(2, 2, 6, 8, device="meta")), ValueError, "k is on meta but q is on cpu"),
    (dict(q=torch.randn(1, 1, 2, 300), k=torch.randn(1, 1, 2, 300), v=torch.randn(1, 1, 2, 300)), ValueError,
     "head dim must be in"),
    (dict(q=torch.ones(2, 2, 5, 8, dtype=torch.int64)), TypeError, "q must have dtype"),
    (dict(key_padding_mask=torch.ones(2, 5, dtype=torch.bool)), ValueError, "key_padding_mask must have shape"),
    (dict(key_padding_mask=torch.ones(2, 6, dtype=torch.int32)), TypeError, "key_padding_mask must have dtype"),
    (dict(attn_mask=torch.ones(3, 5, 6, 1, dtype=torch.bool)), ValueError, "attn_mask must be broadcastable"),
    (dict(attn_mask=torch.ones(5, 6, dtype=torch.int32)), TypeError, "attn_mask must be bool"),
    (dict(bias=torch.ones(4, 6)), ValueError, "bias must be broadcastable"),
    (dict(window=(-1, 2)), ValueError, "window left size must be >= 0"),
    (dict(window=3), TypeError, "window must be a"),
    (dict(dropout_p=1.0), ValueError, "dropout_p must be in"),
    (dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes must have shape"),
    (dict(causal_alignment="left"), ValueError, "causal_alignment"),
    (dict(backend="tpu"), ValueError, "backend must be one of"),
])
def test_bad_input(over, exc, match):
    with pytest.raises(exc, match=match):
        _bad(**over)


def test_no_backend_error_lists_reasons():
    q, k, v = make_inputs(Nq=5, Nk=5, D=8)
    with pytest.raises(pyattn.BackendUnavailableError, match="cuda"):
        pyattn.attention(q.cpu(), k.cpu(), v.cpu(), backend="cuda")
