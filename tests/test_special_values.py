"""NaN and +-inf in the inputs: one behaviour on every backend.

The rule (documented in ``pyattn.attention``): non-finite values propagate as in the materialised
formula ``softmax(scale * q k^T + bias) v`` — a NaN or inf in a query row, a bias entry or a key
reaches every output row whose softmax sees it — except rows that see no key at all (causal or
window band, key padding, boolean masks), which are 0 whatever their query holds.
"""
import pytest
import torch

import pyattn
from helpers import DEVICE, backends_for_device, skip_unless_backend

NAN, INF = float("nan"), float("inf")
BACKENDS = backends_for_device()


@pytest.fixture(params=BACKENDS)
def backend(request):
    skip_unless_backend(request.param)
    return request.param


def inputs(B=2, H=2, Nq=8, Nk=None, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    Nk = Nq if Nk is None else Nk
    return [torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype) for n in (Nq, Nk, Nk)]


def row_kinds(out):
    """Per query row of out (..., N, D): 'N' (some NaN), 'I' (some inf), '0' (all zero) or 'f'."""
    kinds = []
    for row in out.reshape(-1, out.shape[-1]).float():
        kinds.append("N" if row.isnan().any() else "I" if row.isinf().any() else "0" if (row == 0).all() else "f")
    return "".join(kinds)


def check(out, expect_kinds, clean_ref=None):
    """Row kinds of out[0, 0] are expect_kinds; the finite rows of every head match clean_ref."""
    assert row_kinds(out[0, 0]) == expect_kinds
    if clean_ref is not None:
        finite = torch.isfinite(out).all(-1)
        torch.testing.assert_close(out[finite].float(), clean_ref[finite].float(), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("causal", [False, True])
def test_non_finite_query_row(backend, dtype, value, causal):
    q, k, v = inputs(dtype=dtype)
    ref = pyattn.attention(q, k, v, causal=causal, backend="reference")
    q[0, 0, 3, 0] = value  # +-inf in one channel: scores of both signs, inf - inf = NaN in the softmax
    out = pyattn.attention(q, k, v, causal=causal, backend=backend)
    check(out, "fffNffff", ref)
    _, lse = pyattn.attention(q, k, v, causal=causal, backend=backend, return_lse=True)
    assert not torch.isfinite(lse[0, 0, 3]) and torch.isfinite(lse[0, 0, :3]).all()


def test_nan_query_row_over_many_key_tiles(backend):
    # several key tiles per query tile (the online-softmax path with rescaling)
    q, k, v = inputs(B=1, H=2, Nq=70, Nk=600, D=16)
    ref = pyattn.attention(q, k, v, backend="reference")
    q[0, 0, 7] = NAN
    out = pyattn.attention(q, k, v, backend=backend)
    assert out[0, 0, 7].isnan().all()
    keep = torch.ones(70, dtype=torch.bool)
    keep[7] = False
    torch.testing.assert_close(out[0, 0, keep], ref[0, 0, keep], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[0, 1], ref[0, 1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("causal", [False, True])
def test_nan_key_reaches_the_rows_that_see_it(backend, causal):
    q, k, v = inputs()
    ref = pyattn.attention(q, k, v, causal=causal, backend="reference")
    k[0, 0, 5, 1] = NAN
    out = pyattn.attention(q, k, v, causal=causal, backend=backend)
    check(out, "fffffNNN" if causal else "NNNNNNNN", ref)


def test_inf_value_gives_inf_in_its_channel(backend):
    q, k, v = inputs()
    v[0, 0, 5, 2] = INF
    out = pyattn.attention(q, k, v, backend=backend)
    assert torch.isposinf(out[0, 0, :, 2]).all()
    assert torch.isfinite(out[0, 0, :, :2]).all() and torch.isfinite(out[0, 1]).all()


@pytest.mark.parametrize("value,kinds", [(NAN, "fffNffff"), (INF, "fffNffff")], ids=["nan", "inf"])
def test_non_finite_bias_entry(backend, value, kinds):
    q, k, v = inputs()
    ref = pyattn.attention(q, k, v, backend="reference")
    bias = torch.zeros(2, 2, 8, 8, device=DEVICE)
    bias[0, 0, 3, 5] = value
    check(pyattn.attention(q, k, v, bias=bias, backend=backend), kinds, ref)


def test_bias_of_minus_inf_hides_a_whole_row(backend):
    q, k, v = inputs()
    bias = torch.zeros(2, 2, 8, 8, device=DEVICE)
    bias[0, 0, 3] = -INF
    out = pyattn.attention(q, k, v, bias=bias, backend=backend)
    check(out, "fff0ffff")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_without_keys_are_zero_even_for_nan_queries(backend, dtype):
    q, k, v = inputs(Nq=12, Nk=8, dtype=dtype)
    q[0, 0, 1] = NAN  # bottom-right causal: queries 0..3 see no key
    check(pyattn.attention(q, k, v, causal=True, backend=backend), "0000ffffffff")
    q, k, v = inputs(dtype=dtype)
    q[0, 0, 3] = NAN
    kpm = torch.zeros(2, 8, dtype=torch.bool, device=DEVICE)  # True = padding (PyTorch's meaning)
    kpm[0] = True  # batch 0 sees no key
    out = pyattn.attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert (out[0] == 0).all() and torch.isfinite(out[1]).all()
    kpm[0] = False
    kpm[0, 5] = True  # a NaN at a padded key is never seen
    k[0, :, 5] = NAN
    q[0, 0, 3] = 0.5
    out = pyattn.attention(q, k, v, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("backend_name", [b for b in BACKENDS if b != "reference"])
def test_rows_hidden_by_a_boolean_mask_are_zero_even_for_nan_queries(backend_name):
    # the kernel backends take a boolean attn_mask as a block schedule with mask bits
    skip_unless_backend(backend_name)
    q, k, v = inputs()
    q[0, 0, 3] = NAN
    mask = torch.ones(8, 8, dtype=torch.bool, device=DEVICE)
    mask[3] = False
    mask[5, 2] = False
    out = pyattn.attention(q, k, v, attn_mask=mask, backend=backend_name)
    check(out, "fff0ffff")


def test_decode_nan_query_and_key(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 1, 16, generator=g).to(DEVICE)
    kc, vc = (torch.randn(2, 2, 40, 16, generator=g).to(DEVICE) for _ in range(2))
    lens = torch.tensor([30, 40], dtype=torch.int32, device=DEVICE)
    q[0, 1, 0] = NAN
    kc[1, 0, 10] = NAN   # seen by the query heads 0, 1 of sequence 1
    kc[0, 0, 35] = NAN   # past sequence 0's length: never seen
    for splits in (1, 3):
        out = pyattn.decode_attention(q, kc, vc, lens, num_splits=splits, backend=backend)
        assert row_kinds(out[0]) == "fNff" and row_kinds(out[1]) == "NNff"


def test_lsh_nan_query_key_row(backend):
    g = torch.Generator().manual_seed(0)
    qk, v = (torch.randn(1, 2, 64, 16, generator=g).to(DEVICE) for _ in range(2))
    ref_kinds = None
    qk[0, 0, 3] = NAN
    out = pyattn.lsh_attention(qk, v, n_hashes=1, n_buckets=4, chunk_length=8, seed=0, backend=backend)
    ref = pyattn.lsh_attention(qk, v, n_hashes=1, n_buckets=4, chunk_length=8, seed=0, backend="reference")
    ref_kinds = row_kinds(ref[0, 0])
    assert "N" in ref_kinds and "f" in ref_kinds
    assert row_kinds(out[0, 0]) == ref_kinds
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], atol=1e-4, rtol=1e-4)
