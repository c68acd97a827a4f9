"""PyTorch's meanings: ``key_padding_mask`` of pyattn.attention, and pyattn.nn.MultiheadAttention as a
drop-in for torch.nn.MultiheadAttention (same constructor, parameters, forward and return)."""
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


# ---------------------------------------------------------------- pyattn.nn.MultiheadAttention
E, H, N, L, S = 16, 2, 3, 5, 7


def _modules(backend, dtype=torch.float32, **ctor):
    """torch's module with random parameters (biases too), pyattn's loaded from its state dict, and an fp64 copy."""
    torch.manual_seed(0)
    ref = torch.nn.MultiheadAttention(E, H, **ctor)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    ours = pyattn.nn.MultiheadAttention(E, H, **ctor, backend=backend)
    ours.load_state_dict(ref.state_dict())
    ref64 = torch.nn.MultiheadAttention(E, H, **ctor, dtype=torch.float64)
    ref64.load_state_dict(ref.state_dict())
    return ours.to(DEVICE, dtype), ref.to(DEVICE, dtype), ref64.to(DEVICE)


def _inputs(batch_first, kdim=E, vdim=E, batched=True, dtype=torch.float32, self_attn=False):
    g = torch.Generator().manual_seed(1)

    def mk(n, d):
        shape = ((N, n, d) if batch_first else (n, N, d)) if batched else (n, d)
        return torch.randn(shape, generator=g).to(DEVICE, dtype)

    q = mk(L if not self_attn else S, E)
    if self_attn:
        return q, q, q
    return q, mk(S, kdim), mk(S, vdim)


def _run(module, q, k, v, kwargs, dtype):
    """Forward + backward of ``module`` on copies of the inputs in ``dtype``; returns out, weights and grads."""
    self_attn = q is k and k is v
    leaves = [t.detach().to(dtype).requires_grad_() for t in ((q,) if self_attn else (q, k, v))]
    qkv = leaves * 3 if self_attn else leaves
    kw = {n: (m.to(dtype) if isinstance(m, torch.Tensor) and m.is_floating_point() else m) for n, m in kwargs.items()}
    module.zero_grad()
    out, w = module(*qkv, **kw)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, dtype)
    (out * g).sum().backward()
    grads = {f"d{nm}": t.grad for nm, t in zip("qkv", leaves)}
    grads.update({f"d{n}": p.grad for n, p in module.named_parameters() if p.grad is not None})
    return out, w, grads


def _compare(ours, ref, ref64, q, k, v, dtype=torch.float32, **kwargs):
    o, w, g = _run(ours, q, k, v, kwargs, dtype)
    o32, w32, g32 = _run(ref, q, k, v, kwargs, dtype)
    o64, w64, g64 = _run(ref64, q, k, v, kwargs, torch.float64)
    floor = 1e-5 if dtype == torch.float32 else 1e-3
    assert o.dtype == dtype and o.shape == o64.shape
    assert_tolerance("attn_output", o, o32, o64, floor=floor)
    assert (w is None) == (w64 is None)
    if w is not None:
        assert_tolerance("attn_output_weights", w, w32, w64, floor=floor)
    assert set(g) == set(g64)
    for name in g64:
        assert_tolerance(name, g[name], g32[name], g64[name], factor=3.0, floor=10 * floor)
    return o, w


def _masks(batch_first_kind):
    pad = torch.zeros(N, S, dtype=torch.bool)
    pad[0, 5:] = True
    pad[2, :2] = True
    allowed_not = torch.ones(L, S, dtype=torch.bool).triu(S - L + 1)  # True = NOT allowed (torch MHA)
    if batch_first_kind == "bool":
        return dict(key_padding_mask=pad.to(DEVICE), attn_mask=allowed_not.to(DEVICE))
    g = torch.Generator().manual_seed(4)
    kpm = torch.zeros(N, S).masked_fill(pad, float("-inf"))
    am = torch.randn(N * H, L, S, generator=g).masked_fill(allowed_not, float("-inf"))
    return dict(key_padding_mask=kpm.to(DEVICE), attn_mask=am.to(DEVICE))


CASES = {
    # name: (constructor args, input args, forward args)
    "self-seq-first": (dict(), dict(self_attn=True), dict(need_weights=False)),
    "cross-bool-masks": (dict(batch_first=True), dict(), dict(need_weights=False, masks="bool")),
    "kdim-vdim-float-masks": (dict(kdim=12, vdim=20, batch_first=True), dict(kdim=12, vdim=20),
                              dict(need_weights=False, masks="float")),
    "bias_kv-zero_attn-no-bias": (dict(add_bias_kv=True, add_zero_attn=True, bias=False), dict(),
                                  dict(need_weights=False, masks="bool")),
    "causal-hint": (dict(batch_first=True), dict(self_attn=True), dict(need_weights=False, causal=True)),
    "unbatched": (dict(), dict(batched=False), dict(need_weights=False, unbatched_masks=True)),
}


def _forward_args(fwd):
    fwd = dict(fwd)
    kind = fwd.pop("masks", None)
    kw = _masks(kind) if kind else {}
    if fwd.pop("causal", False):
        kw.update(attn_mask=torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1), is_causal=True)
    if fwd.pop("unbatched_masks", False):
        kw.update(key_padding_mask=_masks("bool")["key_padding_mask"][0],
                  attn_mask=(torch.rand(H, L, S, generator=torch.Generator().manual_seed(5)) < 0.3).to(DEVICE))
    kw.update(fwd)
    return kw


@pytest.mark.parametrize("case", list(CASES))
def test_mha_matches_torch(backend, case):
    ctor, inp, fwd = CASES[case]
    ours, ref, ref64 = _modules(backend, **ctor)
    q, k, v = _inputs(ctor.get("batch_first", False), **inp)
    _compare(ours, ref, ref64, q, k, v, **_forward_args(fwd))


def test_mha_bf16(backend):
    ours, ref, ref64 = _modules(backend, dtype=torch.bfloat16, batch_first=True)
    q, k, v = _inputs(True, dtype=torch.bfloat16)
    _compare(ours, ref, ref64, q, k, v, dtype=torch.bfloat16, need_weights=False, **_masks("bool"))


@pytest.mark.parametrize("average", [True, False])
@pytest.mark.parametrize("masks", ["bool", "float"])
def test_mha_need_weights(average, masks):
    # need_weights=True: torch's default; weights from the plain (unfused) computation, as torch
    ours, ref, ref64 = _modules("reference")
    q, k, v = _inputs(False)
    _, w = _compare(ours, ref, ref64, q, k, v, need_weights=True, average_attn_weights=average, **_masks(masks))
    assert w.shape == ((N, L, S) if average else (N, H, L, S))


def test_mha_state_dict_both_ways():
    for ctor in (dict(), dict(kdim=12, vdim=20, add_bias_kv=True), dict(bias=False)):
        t = torch.nn.MultiheadAttention(E, H, **ctor)
        p = pyattn.nn.MultiheadAttention(E, H, **ctor)
        assert isinstance(p, torch.nn.MultiheadAttention)
        assert {k: v.shape for k, v in t.state_dict().items()} == {k: v.shape for k, v in p.state_dict().items()}
        p.load_state_dict(t.state_dict())
        t2 = torch.nn.MultiheadAttention(E, H, **ctor)
        t2.load_state_dict(p.state_dict())
        assert all(torch.equal(a, b) for a, b in zip(t.state_dict().values(), t2.state_dict().values()))


def test_mha_causal_hint_is_trusted_like_torch():
    # torch: with need_weights=False and no key padding, is_causal=True replaces attn_mask by the causal mask
    ours, ref, _ = _modules("reference", batch_first=True)
    x = _inputs(True, self_attn=True)[0]
    not_causal = torch.zeros(S, S, dtype=torch.bool, device=DEVICE)
    with torch.no_grad():
        a = ours(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)[0]
        b = ref(x, x, x, attn_mask=not_causal, is_causal=True, need_weights=False)[0]
        c = ref(x, x, x, attn_mask=torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1), need_weights=False)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="is_causal=True .* needs attn_mask"):
        ours(x, x, x, is_causal=True)


@pytest.mark.parametrize("need_weights", [False, True])
def test_mha_fully_padded_batch_gives_zero_attention(backend, need_weights):
    ours, _, _ = _modules(backend, batch_first=True)
    q, k, v = _inputs(True)
    pad = torch.zeros(N, S, dtype=torch.bool, device=DEVICE)
    pad[1] = True  # torch gives NaN for batch 1; pyattn gives attention output 0 (so out_proj's bias)
    out, w = ours(q, k, v, key_padding_mask=pad, need_weights=need_weights)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1], ours.out_proj.bias.detach().expand(L, E))
    if need_weights:
        assert torch.all(w[1] == 0) and torch.isfinite(w).all()


def test_mha_inside_torch_transformer_layer():
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(E, H, dim_feedforward=32, dropout=0.0, batch_first=True)
    ours = pyattn.nn.MultiheadAttention(E, H, batch_first=True, backend="reference")
    ours.load_state_dict(layer.self_attn.state_dict())
    x = torch.randn(N, S, E, device=DEVICE)
    pad = _masks("bool")["key_padding_mask"]
    causal = torch.ones(S, S, dtype=torch.bool, device=DEVICE).triu(1)  # True = not allowed
    layer = layer.to(DEVICE)
    ref = layer(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True)
    layer.self_attn = ours.to(DEVICE)
    torch.testing.assert_close(layer(x, src_mask=causal, src_key_padding_mask=pad, is_causal=True), ref,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("call,exc,match", [
    (lambda m, x: m(x[0], x, x), ValueError, "key must be 2-D like query"),
    (lambda m, x: m(x[..., :8], x, x), ValueError, "query must have 16 features"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, 3, dtype=torch.bool)), ValueError,
     r"key_padding_mask must have shape \(N, S\)"),
    (lambda m, x: m(x, x, x, key_padding_mask=torch.zeros(N, S, dtype=torch.int32)), TypeError,
     "key_padding_mask must be bool or a float"),
    (lambda m, x: m(x, x, x, attn_mask=torch.zeros(2, S, S, dtype=torch.bool)), ValueError,
     r"attn_mask must have shape \(L, S\)"),
    (lambda m, x: m(x.double(), x.double(), x.double()), TypeError, "query has dtype float64 but in_proj_weight"),
])
def test_mha_bad_input(call, exc, match):
    m = pyattn.nn.MultiheadAttention(E, H, backend="reference")
    x = torch.randn(S, N, E)
    with pytest.raises(exc, match=match):
        call(m, x)
