import pytest
import torch

import pyattn
from pyattn.reference.attention import attention_reference
from helpers import DEVICE, assert_tolerance, backends_for_device, skip_unless_backend

BACKENDS = backends_for_device()
LENGTHS = [1, 7, 64, 129]


@pytest.fixture(params=BACKENDS)
def backend(request):
    skip_unless_backend(request.param)
    return request.param


def _packed(lengths_q, lengths_k, H=4, Hkv=2, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q = torch.randn(tq, H, D, generator=g).to(DEVICE, dtype)
    k = torch.randn(tk, Hkv, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(tk, Hkv, D, generator=g).to(DEVICE, dtype)
    cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0)), dtype=torch.int32, device=DEVICE)  # noqa: E731
    return q, k, v, cu(lengths_q), cu(lengths_k)


def _check(backend, lengths_q, lengths_k, dtype=torch.float32, dropout_p=0.0, **kw):
    q, k, v, cq, ck = _packed(lengths_q, lengths_k, dtype=dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(99)
    out = pyattn.varlen_attention(*leaves, cq, ck, max(lengths_q), max(lengths_k), dropout_p=dropout_p,
                                  backend=backend, **kw)
    torch.manual_seed(99)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p else 0
    assert out.shape == q.shape
    wl, wr = kw.get("window") or (-1, -1)
    wl = -1 if wl is None else wl
    wr = -1 if wr is None else wr
    if kw.get("causal"):
        wr = 0 if wr < 0 else min(wr, 0)
    g = torch.randn_like(out)
    out.backward(g)
    refs = {}
    for name, cdt in (("64", torch.float64), ("low", dtype)):
        rl = [t.detach().to(cdt).requires_grad_() for t in (q, k, v)]
        o, _ = attention_reference(*(t.transpose(0, 1).unsqueeze(0) for t in rl), cu_seqlens_q=cq, cu_seqlens_k=ck,
                                   window_left=wl, window_right=wr, dropout_p=dropout_p, seed=seed, compute_dtype=cdt)
        o = o[0].transpose(0, 1)
        o.backward(g.to(cdt))
        refs[name] = (o, rl)
    assert_tolerance("out", out, refs["low"][0], refs["64"][0])
    for i, nm in enumerate(("dq", "dk", "dv")):
        assert_tolerance(nm, leaves[i].grad, refs["low"][1][i].grad, refs["64"][1][i].grad, factor=3.0, floor=1e-4)
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_varlen_dense(backend, dtype):
    _check(backend, LENGTHS, LENGTHS, dtype=dtype)


def test_varlen_causal_rectangular(backend):
    _check(backend, [1, 7, 30, 5], [3, 7, 64, 0], causal=True)


def test_varlen_window_and_dropout(backend):
    _check(backend, LENGTHS, LENGTHS, window=(8, 0), dropout_p=0.25)


def test_varlen_matches_padded_batch(backend):
    B, N, H, D = 3, 40, 2, 16
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(B, N, H, D, generator=g).to(DEVICE) for _ in range(3)]
    lengths = torch.tensor([40, 13, 1])
    kpm = (torch.arange(N)[None, :] < lengths[:, None]).to(DEVICE)  # True = real token (unpad's convention)
    padded = pyattn.attention(*(t.transpose(1, 2) for t in x), key_padding_mask=~kpm, causal=True, backend=backend)
    packed = [pyattn.unpad(t, kpm) for t in x]
    _, idx, cu, max_len = packed[0]
    out = pyattn.varlen_attention(packed[0][0], packed[1][0], packed[2][0], cu, cu, max_len, max_len, causal=True,
                                  backend=backend)
    repadded = pyattn.pad(out, idx, B, N)
    torch.testing.assert_close(repadded[kpm], padded.transpose(1, 2)[kpm], rtol=1e-5, atol=1e-5)
    assert torch.all(repadded[~kpm] == 0)


def test_pad_unpad_round_trip():
    x = torch.randn(3, 7, 5)
    kpm = torch.rand(3, 7) > 0.5
    packed, idx, cu, max_len = pyattn.unpad(x, kpm)
    assert packed.shape == (int(kpm.sum()), 5) and cu.dtype == torch.int32 and int(cu[-1]) == int(kpm.sum())
    assert max_len == int(kpm.sum(1).max())
    back = pyattn.pad(packed, idx, 3, 7)
    assert torch.equal(back[kpm], x[kpm]) and torch.all(back[~kpm] == 0)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda a: a.update(cq=a["cq"].long()), TypeError, "cu_seqlens_q must have dtype"),
    (lambda a: a.update(ck=torch.tensor([0, 5, 3, 8], dtype=torch.int32)), ValueError, "non-decreasing"),
    (lambda a: a.update(ck=torch.tensor([1, 5, 8], dtype=torch.int32)), ValueError, "must start at 0"),
    (lambda a: a.update(cq=torch.tensor([0, 8], dtype=torch.int32)), ValueError, "describe the same number"),
    (lambda a: a.update(window=(-2, 0)), ValueError, "window left size"),
    (lambda a: a.update(q=a["q"][:, :, :8]), ValueError, "k head dim"),
    (lambda a: a.update(max_q=-1), ValueError, "max_seqlen_q"),
])
def test_varlen_bad_input(mutate, exc, match):
    q, k, v, cq, ck = _packed([3, 5], [4, 4])
    args = dict(q=q, k=k, v=v, cq=cq, ck=ck, max_q=5, window=None)
    mutate(args)
    with pytest.raises(exc, match=match):
        pyattn.varlen_attention(args["q"], k, v, args["cq"], args["ck"], args["max_q"], 4, window=args["window"])
