"""PyTorch's meanings: ``key_padding_mask`` of pyattn.attention (True = padding, ignored)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import pyattn
from helpers import DEVICE, assert_tolerance, backends_for_device, skip_unless_backend

BACKENDS = backends_for_device()


@pytest.fixture(params=BACKENDS)
def backend(request):
    skip_unless_backend(request.param)
    return request.param


def _sdpa_ref(q, k, v, mask, dtype):
    """SDPA in ``dtype`` with an SDPA mask (bool True = attend, or additive); rows that see no key -> 0."""
    out = F.scaled_dot_product_attention(q.to(dtype), k.to(dtype), v.to(dtype),
                                         attn_mask=mask if mask.dtype == torch.bool else mask.to(dtype))
    return torch.nan_to_num(out, nan=0.0)


def _qkv(B=3, H=2, Nq=9, Nk=13, D=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(DEVICE) for n in (Nq, Nk, Nk)]


def _padding(B=3, Nk=13):
    pad = torch.zeros(B, Nk, dtype=torch.bool)
    pad[0, 9:] = True
    pad[1, :3] = True
    pad[2] = True  # batch 2: every key is padding -> output 0, not NaN
    return pad.to(DEVICE)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_key_padding_mask_means_ignore(backend, kind):
    """key_padding_mask True (or -inf) = that key is ignored, exactly as torch.nn.MultiheadAttention."""
    q, k, v = _qkv()
    pad = _padding()
    if kind == "bool":
        kpm, sdpa_mask = pad, ~pad[:, None, None, :]
    else:  # an additive float mask: -inf at padding plus finite per-key offsets
        offs = torch.linspace(-1.0, 0.5, pad.shape[1], device=DEVICE).expand_as(pad)
        kpm = offs.masked_fill(pad, float("-inf"))
        sdpa_mask = kpm[:, None, None, :]
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = pyattn.attention(*leaves, key_padding_mask=kpm, backend=backend)
    refs = {}
    for name, dt in (("64", torch.float64), ("low", torch.float32)):
        rl = [t.clone().to(dt).requires_grad_() for t in (q, k, v)]
        refs[name] = (_sdpa_ref(*rl, sdpa_mask, dt), rl)
    assert_tolerance("out", out, refs["low"][0], refs["64"][0])
    assert torch.all(out[2] == 0)
    g = torch.randn_like(out)
    out.backward(g)
    for o, _ in refs.values():
        o.backward(g.to(o.dtype))
    for i, nm in enumerate(("dq", "dk", "dv")):
        grad = leaves[i].grad
        assert torch.isfinite(grad).all() and torch.all(grad[2] == 0), nm
        assert_tolerance(nm, grad, refs["low"][1][i].grad, refs["64"][1][i].grad, factor=3.0, floor=1e-4)


def test_key_padding_mask_with_bool_attn_mask(backend):
    # bool attn_mask + key padding take the block-schedule path: the padding must keep torch's meaning there
    q, k, v = _qkv(Nq=13)
    pad = _padding()
    allowed = torch.ones(13, 13, dtype=torch.bool, device=DEVICE).tril()
    out = pyattn.attention(q, k, v, key_padding_mask=pad, attn_mask=allowed, backend=backend)
    mask = allowed[None, None] & ~pad[:, None, None, :]
    ref64 = _sdpa_ref(q, k, v, mask, torch.float64)
    assert_tolerance("out", out, _sdpa_ref(q, k, v, mask, torch.float32), ref64)
    assert torch.all(out[2] == 0)


def test_key_padding_mask_rejects_other_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="key_padding_mask must have dtype"):
        pyattn.attention(q, k, v, key_padding_mask=torch.zeros(3, 13, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, Nk\) = \(3, 13\)"):
        pyattn.attention(q, k, v, key_padding_mask=torch.zeros(3, 9, dtype=torch.bool, device=DEVICE))

