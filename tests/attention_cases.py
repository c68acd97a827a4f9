"""Shared machinery for the attention tests: inputs, the fp64 / low-precision references, checks."""
from __future__ import annotations

import torch

import pyattn
from pyattn.reference.attention import attention_reference
from helpers import DEVICE, assert_tolerance

LOW_PRECISION_ERROR_FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def make_inputs(B=2, H=2, Hkv=None, Nq=17, Nk=None, D=32, dtype=torch.float32, layout="bhnd", seed=0):
    Hkv = Hkv or H
    Nk = Nq if Nk is None else Nk
    g = torch.Generator().manual_seed(seed)

    def rnd(b, h, n):
        t = torch.randn(b, n, h, D, generator=g) if layout == "bnhd" else torch.randn(b, h, n, D, generator=g)
        t = t.to(DEVICE, dtype)
        return t.transpose(1, 2) if layout == "bnhd" else t

    return rnd(B, H, Nq), rnd(B, Hkv, Nk), rnd(B, Hkv, Nk)


def engine_args(q, k, *, causal=False, causal_alignment="bottom_right", window=None, key_padding_mask=None,
                bias=None, attn_mask=None, alibi_slopes=None):
    """The reference's arguments for the same call to pyattn.attention."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    wl, wr = window if window is not None else (-1, -1)
    wl = -1 if wl is None else wl
    wr = -1 if wr is None else wr
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    full_bias = None
    if bias is not None:
        full_bias = bias.expand(B, H, Nq, Nk)
    keep = None  # pyattn.attention's key_padding_mask has PyTorch's meaning; the reference takes a keep-mask
    if key_padding_mask is not None and key_padding_mask.dtype == torch.bool:
        keep = ~key_padding_mask
    elif key_padding_mask is not None:
        kb = key_padding_mask[:, None, None, :].expand(B, H, Nq, Nk)
        full_bias = kb if full_bias is None else full_bias + kb
    if attn_mask is not None:
        m = attn_mask.expand(B, H, Nq, Nk)
        mb = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill(~m, float("-inf")) \
            if m.dtype == torch.bool else m
        full_bias = mb if full_bias is None else full_bias + mb
    return dict(bias=full_bias, alibi_slopes=alibi_slopes, key_padding_mask=keep, window_left=wl,
                window_right=wr, bottom_right=causal_alignment == "bottom_right")


def check_attention(backend, q, k, v, *, grad=True, dropout_p=0.0, **mask_kwargs):
    """Run pyattn.attention and compare output and gradients with the tolerance rule."""
    dtype = q.dtype
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    bias = mask_kwargs.get("bias")
    bias_leaf = None
    if bias is not None and grad:
        bias_leaf = bias.detach().clone().requires_grad_()
        mask_kwargs = dict(mask_kwargs, bias=bias_leaf)
    torch.manual_seed(1234)
    out = pyattn.attention(*leaves, dropout_p=dropout_p, backend=backend, **mask_kwargs)
    seed = 0
    if dropout_p > 0:
        torch.manual_seed(1234)
        seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    assert out.dtype == dtype and out.shape == q.shape
    args = engine_args(q, k, **{k_: v_ for k_, v_ in mask_kwargs.items()})
    refs = {}
    for name, cdt in (("64", torch.float64), ("low", dtype)):
        rl = [t.detach().clone().to(cdt).requires_grad_(grad) for t in (q, k, v)]
        rargs = dict(args)
        rb = None
        if bias_leaf is not None:
            rb = bias.detach().clone().to(cdt).requires_grad_()
            rargs = dict(args, **engine_args(q, k, **dict(mask_kwargs, bias=rb)))
        o, _ = attention_reference(*rl, dropout_p=dropout_p, seed=seed, compute_dtype=cdt, **rargs)
        refs[name] = (o, rl, rb)
    floor = 1e-5
    assert_tolerance("out", out, refs["low"][0], refs["64"][0], floor=floor)
    if not grad:
        return out
    g = torch.randn_like(out)
    out.backward(g)
    grads = {}
    for name, (o, rl, rb) in refs.items():
        o.backward(g.to(o.dtype))
    for i, nm in enumerate(("dq", "dk", "dv")):
        assert_tolerance(nm, leaves[i].grad, refs["low"][1][i].grad, refs["64"][1][i].grad, factor=3.0, floor=1e-4)
    if bias_leaf is not None:
        assert_tolerance("dbias", bias_leaf.grad, refs["low"][2].grad, refs["64"][2].grad, factor=3.0, floor=1e-4)
    return out
