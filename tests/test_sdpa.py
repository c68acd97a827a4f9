"""pyattn.sdpa against torch.nn.functional.scaled_dot_product_attention, argument by argument.

The oracle is SDPA itself run in fp64; pyattn must be within 2x (3x for gradients) of SDPA's own
error in the same low dtype (the tolerance rule of tests/helpers.py).
"""
import inspect

import pytest
import torch
import torch.nn.functional as F

import pyattn
from helpers import DEVICE, assert_tolerance, max_err

SDPA = F.scaled_dot_product_attention
LOW_DTYPES = [torch.float32, torch.bfloat16]


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=torch.float64).to(dtype)


def _sdpa64(q, k, v, attn_mask=None, **kw):
    m = attn_mask
    if m is not None and m.is_floating_point():
        m = m.double()
    return SDPA(q.double(), k.double(), v.double(), attn_mask=m, **kw)


def _check(q, k, v, attn_mask=None, grad=False, **kw):
    """Forward (and backward) of pyattn.sdpa vs SDPA under the tolerance rule."""
    ins = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    ref_ins = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    ins64 = [t.detach().double().requires_grad_(grad) for t in (q, k, v)]
    out = pyattn.sdpa(*ins, attn_mask=attn_mask, **kw)
    ref = SDPA(*ref_ins, attn_mask=attn_mask, **kw)
    ref64 = _sdpa64(*ins64, attn_mask=attn_mask, **kw)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert_tolerance("out", out, ref, ref64, floor=1e-5 if q.dtype == torch.float32 else 1e-2)
    if grad:
        g = torch.randn_like(ref64)
        out.backward(g.to(out.dtype))
        ref.backward(g.to(ref.dtype))
        ref64.backward(g)
        for name, a, b, c in zip("qkv", ins, ref_ins, ins64):
            assert_tolerance(f"d{name}", a.grad, b.grad, c.grad, factor=3.0,
                             floor=1e-5 if q.dtype == torch.float32 else 2e-2)
    return out


def test_signature_matches_torch():
    # SDPA is a builtin without an introspectable signature; its documented one is
    # (query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False)
    params = inspect.signature(pyattn.sdpa).parameters
    assert [(n, p.default) for n, p in params.items()] == [
        ("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty), ("value", inspect.Parameter.empty),
        ("attn_mask", None), ("dropout_p", 0.0), ("is_causal", False), ("scale", None), ("enable_gqa", False)]
    q = _rand(1, 2, 4, 8)
    # the same call spelled with keywords works on both
    kw = dict(query=q, key=q, value=q, attn_mask=None, dropout_p=0.0, is_causal=True, scale=None, enable_gqa=False)
    assert max_err(pyattn.sdpa(**kw), SDPA(**kw)) < 1e-6


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("L,S", [(17, 17), (7, 33), (40, 9), (1, 20)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_dense_and_causal(dtype, L, S, is_causal):
    # is_causal is top-left aligned: for L > S the late rows see every key, for L < S they see a prefix
    _check(_rand(2, 3, L, 32, dtype=dtype), _rand(2, 3, S, 32, dtype=dtype), _rand(2, 3, S, 32, dtype=dtype),
           is_causal=is_causal, grad=True)


@pytest.mark.parametrize("scale", [None, 0.05, 1.0, 3.0])
def test_scale(scale):
    _check(_rand(2, 2, 13, 16), _rand(2, 2, 21, 16), _rand(2, 2, 21, 16), scale=scale, grad=True)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("mask_shape", [(13, 21), (2, 1, 13, 21), (1, 3, 13, 21), (2, 3, 13, 21), (2, 3, 1, 21)],
                         ids=str)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_attn_mask(dtype, mask_shape, kind):
    if kind == "bool":
        mask = torch.rand(mask_shape, device=DEVICE) > 0.3
    else:
        mask = _rand(*mask_shape, dtype=dtype)
    _check(_rand(2, 3, 13, 32, dtype=dtype), _rand(2, 3, 21, 32, dtype=dtype), _rand(2, 3, 21, 32, dtype=dtype),
           attn_mask=mask, grad=True)


def test_float_mask_with_minus_inf_and_causal():
    mask = torch.zeros(13, 13, device=DEVICE)
    mask[:, 3] = float("-inf")
    mask[5] = -1e4
    _check(_rand(2, 2, 13, 16), _rand(2, 2, 13, 16), _rand(2, 2, 13, 16), attn_mask=mask)
    # SDPA's contract: an explicit mask and is_causal=True together are an error
    causal = torch.full((13, 13), float("-inf"), device=DEVICE).triu(1)
    _check(_rand(2, 2, 13, 16), _rand(2, 2, 13, 16), _rand(2, 2, 13, 16), attn_mask=mask + causal)
    q = _rand(2, 2, 13, 16)
    with pytest.raises(pyattn.InputError, match="is_causal"):
        pyattn.sdpa(q, q, q, attn_mask=mask, is_causal=True)


def test_fully_masked_rows_are_zero_like_sdpa():
    mask = torch.rand(2, 1, 9, 11, device=DEVICE) > 0.5
    mask[:, :, 4] = False  # row 4 sees nothing
    q, k, v = (_rand(2, 2, n, 16).requires_grad_() for n in (9, 11, 11))
    out = pyattn.sdpa(q, k, v, attn_mask=mask)
    ref = SDPA(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    assert (out[:, :, 4] == 0).all()
    assert max_err(out, ref) < 1e-5 or not torch.isfinite(ref).all()
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[:, :, 4] == 0).all()


def test_float_mask_gradient():
    q, k, v = _rand(2, 2, 9, 16), _rand(2, 2, 12, 16), _rand(2, 2, 12, 16)
    m1 = _rand(2, 1, 9, 12).requires_grad_()
    m2 = m1.detach().clone().requires_grad_()
    g = torch.randn(2, 2, 9, 16, device=DEVICE)
    pyattn.sdpa(q, k, v, attn_mask=m1).backward(g)
    SDPA(q, k, v, attn_mask=m2).backward(g)
    assert m1.grad is not None and max_err(m1.grad, m2.grad) < 1e-5


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("Hq,Hkv", [(8, 2), (6, 1), (4, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_gqa(dtype, Hq, Hkv, masked):
    mask = (torch.rand(2, 1, 11, 19, device=DEVICE) > 0.2) if masked else None
    _check(_rand(2, Hq, 11, 32, dtype=dtype), _rand(2, Hkv, 19, 32, dtype=dtype), _rand(2, Hkv, 19, 32, dtype=dtype),
           attn_mask=mask, enable_gqa=True, is_causal=not masked, grad=True)


def test_gqa_requires_flag_like_sdpa():
    q, k = _rand(1, 8, 5, 16), _rand(1, 2, 5, 16)
    with pytest.raises(RuntimeError):
        SDPA(q, k, k)
    with pytest.raises(ValueError, match="enable_gqa"):
        pyattn.sdpa(q, k, k)


def test_single_kv_head_broadcasts_without_flag():
    _check(_rand(2, 6, 7, 16), _rand(2, 1, 9, 16), _rand(2, 1, 9, 16), grad=True)


@pytest.mark.parametrize("mask_shape", [None, (7, 9), (3, 7, 9)], ids=str)
@pytest.mark.parametrize("is_causal", [False, True])
def test_3d_inputs(mask_shape, is_causal):
    mask = None if mask_shape is None else torch.rand(mask_shape, device=DEVICE) > 0.3
    if mask is not None and is_causal:
        is_causal = False
    out = _check(_rand(3, 7, 16), _rand(3, 9, 16), _rand(3, 9, 16), attn_mask=mask, is_causal=is_causal, grad=True)
    assert out.shape == (3, 7, 16)


def test_2d_and_5d_inputs():
    assert _check(_rand(7, 16), _rand(9, 16), _rand(9, 16), is_causal=True).shape == (7, 16)
    mask = torch.rand(3, 1, 7, 9, device=DEVICE) > 0.2
    out = _check(_rand(2, 3, 4, 7, 16), _rand(2, 3, 4, 9, 16), _rand(2, 3, 4, 9, 16), attn_mask=mask, grad=True)
    assert out.shape == (2, 3, 4, 7, 16)


def test_batch_broadcast():
    _check(_rand(3, 2, 7, 16), _rand(1, 2, 9, 16), _rand(3, 2, 9, 16), grad=True)


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=str)
@pytest.mark.parametrize("E,Ev", [(16, 48), (64, 8), (32, 33)])
def test_value_dim_differs(dtype, E, Ev):
    mask = torch.rand(2, 1, 10, 14, device=DEVICE) > 0.3
    out = _check(_rand(2, 2, 10, E, dtype=dtype), _rand(2, 2, 14, E, dtype=dtype), _rand(2, 2, 14, Ev, dtype=dtype),
                 attn_mask=mask, grad=True)
    assert out.shape == (2, 2, 10, Ev)


def test_strided_inputs():
    # (B, N, H, D) memory viewed as (B, H, N, D), as every transformer layer does
    q = _rand(2, 13, 4, 32).transpose(1, 2)
    k = _rand(2, 17, 4, 32).transpose(1, 2)
    v = _rand(2, 17, 4, 32).transpose(1, 2)
    _check(q, k, v, is_causal=True, grad=True)


def test_float64():
    q, k, v = _rand(1, 2, 9, 16, dtype=torch.float64), _rand(1, 2, 5, 16, dtype=torch.float64), \
        _rand(1, 2, 5, 16, dtype=torch.float64)
    assert max_err(pyattn.sdpa(q, k, v, is_causal=True), SDPA(q, k, v, is_causal=True)) < 1e-12


def test_empty_sequences():
    q, k = _rand(2, 3, 5, 16), _rand(2, 3, 4, 16)
    for a, b in ((q[:, :, :0], k), (q, k[:, :, :0]), (q[:0], k[:0])):
        out, ref = pyattn.sdpa(a, b, b), SDPA(a, b, b)
        assert out.shape == ref.shape
        assert torch.equal(out, torch.nan_to_num(ref)) or out.numel() == 0


def test_no_dropout_in_default_call_is_deterministic():
    q, k, v = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    assert torch.equal(pyattn.sdpa(q, k, v), pyattn.sdpa(q, k, v))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_statistics(p):
    # q = k = 0 gives uniform attention 1/S; with v = I each output entry is one attention
    # probability: 0 when dropped, 1/(S(1-p)) when kept. Compare the keep rate with SDPA's.
    S = 64
    q = torch.zeros(4, 8, 128, S, device=DEVICE)
    k = torch.zeros(4, 8, S, S, device=DEVICE)
    v = torch.eye(S, device=DEVICE).expand(4, 8, S, S)
    torch.manual_seed(1)
    out = pyattn.sdpa(q, k, v, dropout_p=p)
    ref = SDPA(q, k, v, dropout_p=p)
    kept = out != 0
    assert torch.allclose(out[kept], torch.full_like(out[kept], 1 / (S * (1 - p))), rtol=1e-5)
    n = out.numel()
    rate, ref_rate = kept.float().mean().item(), (ref != 0).float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 6 * sigma, (rate, 1 - p)
    assert abs(rate - ref_rate) < 9 * sigma
    # unbiased: the mean output equals the dropout-free one
    assert abs(out.mean().item() - 1 / S) < 6 * sigma / S + 1e-6
    # a fresh mask per call, reproducible from torch's seed
    torch.manual_seed(2)
    a = pyattn.sdpa(q, k, v, dropout_p=p)
    torch.manual_seed(2)
    b = pyattn.sdpa(q, k, v, dropout_p=p)
    assert torch.equal(a, b) and not torch.equal(a, out)


def test_dropout_gradient_matches_its_own_mask():
    # backward replays the forward's mask: grad of sum(out * g) must equal a finite difference
    q = _rand(1, 2, 6, 8, dtype=torch.float64).requires_grad_()
    k, v = _rand(1, 2, 7, 8, dtype=torch.float64), _rand(1, 2, 7, 8, dtype=torch.float64)
    torch.manual_seed(3)
    out = pyattn.sdpa(q, k, v, dropout_p=0.3)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    eps = 1e-6
    dq = torch.zeros_like(q)
    dq[0, 1, 2, 3] = eps
    torch.manual_seed(3)
    up = (pyattn.sdpa(q.detach() + dq, k, v, dropout_p=0.3) * g).sum()
    torch.manual_seed(3)
    down = (pyattn.sdpa(q.detach() - dq, k, v, dropout_p=0.3) * g).sum()
    assert abs((up - down).item() / (2 * eps) - q.grad[0, 1, 2, 3].item()) < 1e-5


def test_errors_name_the_argument():
    q = _rand(1, 2, 5, 16)
    with pytest.raises(ValueError, match="head dim"):
        pyattn.sdpa(q, _rand(1, 2, 5, 8), _rand(1, 2, 5, 8))
    with pytest.raises(ValueError, match="sequence length"):
        pyattn.sdpa(q, _rand(1, 2, 5, 16), _rand(1, 2, 6, 16))
    with pytest.raises(ValueError, match="attn_mask"):
        pyattn.sdpa(q, q, q, attn_mask=torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="dropout_p"):
        pyattn.sdpa(q, q, q, dropout_p=1.5)
    with pytest.raises(ValueError, match="at least 2 dims"):
        pyattn.sdpa(q[0, 0, 0], q[0, 0, 0], q[0, 0, 0])
