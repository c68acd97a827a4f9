"""Attention benchmark rows: dense and masked attention against SDPA, eager softmax attention and
FlexAttention (eager and compiled); on GPU also flash-attn and xformers when installed."""
from __future__ import annotations

from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .cases import Case, suite

_compiled: Dict[str, Callable] = {}


def _flex():
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except Exception:
        return None, None
    if "flex" not in _compiled:
        _compiled["flex"] = torch.compile(flex_attention, dynamic=False)
    return flex_attention, create_block_mask


def eager_attention(q, k, v, causal=False, mask=None):
    s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool, device=q.device).triu(m - n + 1), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def _gpu_peers(causal):
    peers = {}
    try:
        from flash_attn import flash_attn_func

        peers["flash-attn"] = lambda q, k, v: flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                              causal=causal)
    except Exception:
        pass
    try:
        import xformers.ops as xops

        bias = xops.LowerTriangularMask() if causal else None
        peers["xformers"] = lambda q, k, v: xops.memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    except Exception:
        pass
    return peers


def _impls(device, causal: bool, window=None, flex_ok=True) -> Dict[str, Callable]:
    import pyattn

    impls = {"pyattn": lambda q, k, v: pyattn.attention(q, k, v, causal=causal, window=window)}
    if window is None:
        impls["sdpa"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        impls["eager"] = lambda q, k, v: eager_attention(q, k, v, causal=causal)
    else:
        def banded(q, k, v):
            n = q.shape[-2]
            i = torch.arange(n, device=q.device)
            d = i[None, :] - i[:, None]
            mask = (d >= -window[0]) & (d <= (window[1] if window[1] is not None else n))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        impls["sdpa"] = banded
    flex, create_block_mask = _flex()
    if flex is not None and flex_ok:
        def mask_mod(b, h, qi, ki):
            ok = qi >= 0
            if causal:
                ok = ok & (ki <= qi)
            if window is not None:
                ok = ok & (ki >= qi - window[0])
                if window[1] is not None:
                    ok = ok & (ki <= qi + window[1])
            return ok

        masks = {}

        def block_mask(q, k):
            key = (q.shape[-2], k.shape[-2])
            if key not in masks:
                masks[key] = create_block_mask(mask_mod, None, None, q.shape[-2], k.shape[-2], device=str(q.device)) \
                    if (causal or window is not None) else None
            return masks[key]

        impls["flex"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask(q, k))
        impls["flex-compiled"] = lambda q, k, v: _compiled["flex"](q, k, v, block_mask=block_mask(q, k))
    if device.type == "cuda" and window is None:
        impls.update(_gpu_peers(causal))
    return impls


def fwd_bwd_runs(device, impls: Dict[str, Callable], q, k, v, wrap=None):
    """The timed calls of peers ``impls`` (name -> f(q, k, v)) on the same inputs: forward, and
    forward+backward on leaf copies with a fixed upstream gradient -> (fwd, bwd) name -> run().
    FlexAttention has no CPU backward and its eager mode is only a forward reference point: no
    backward runs for them. ``wrap(mode, name, run) -> run`` decorates each call (timing records)."""
    wrap = wrap or (lambda mode, name, run: run)
    fwd = {name: wrap("fwd", name, lambda f=f: f(q, k, v)) for name, f in impls.items()}
    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    g = torch.randn_like(q)

    def fb(f):
        def run():
            for t in (qg, kg, vg):
                t.grad = None
            f(qg, kg, vg).backward(g)
        return run

    no_bwd = ("flex", "flex-compiled") if device.type == "cpu" else ("flex",)
    bwd = {name: wrap("fwd+bwd", name, fb(f)) for name, f in impls.items() if name not in no_bwd}
    return fwd, bwd


def _cases_for(device, B, H, N, D, dtype, causal=False, window=None, label=None, flex_eager_max=2048,
               tier="default", full_impls=("flex", "flex-compiled")) -> List[Case]:
    q, k, v = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(3))
    impls = _impls(device, causal, window)
    if N > flex_eager_max:
        impls.pop("flex", None)  # eager FlexAttention materialises N x N scores
    if N > 8192:
        impls.pop("eager", None)
    if window is not None:
        visible = min(N, window[0] + 1 + (window[1] or 0))
        flops = 4 * B * H * N * visible * D
    else:
        flops = 4 * B * H * N * N * D // (2 if causal else 1)
    cfg = label or f"B{B} H{H} N{N} D{D}" + (" causal" if causal else "")
    dt = str(dtype).replace("torch.", "")
    fwd, bwd_impls = fwd_bwd_runs(device, impls, q, k, v)
    kind = "window" if window is not None else "causal" if causal else ""
    layout = dict(params={"B": B, "H": H, "N": N, "D": D}, x="N", x_label="sequence length N (tokens)",
                  facets=("D",), figure="attention" + (f"-{kind}" if kind else ""), tier=tier,
                  full_impls=tuple(full_impls))
    return [Case("attention", "fwd", cfg, dt, fwd, work=flops, unit="TFLOP/s", **layout),
            Case("attention", "fwd+bwd", cfg, dt, bwd_impls, work=3.5 * flops, unit="TFLOP/s", **layout)]


# headline rows of the default run (the README's shapes): (dtype, D, N); FlexAttention compiled
# (about 25 s of compilation per shape on 2 cores) only on the first
CPU_DEFAULT = {(torch.float32, 64, 512), (torch.float32, 64, 1024), (torch.float32, 64, 2048),
               (torch.float32, 64, 4096), (torch.bfloat16, 64, 512), (torch.bfloat16, 64, 1024),
               (torch.bfloat16, 64, 2048)}
CPU_DEFAULT_FLEX = {(torch.float32, 64, 2048)}


@suite("attention")
def attention_cases(device: torch.device, quick: bool) -> List[Case]:
    if device.type == "cuda":
        Ns, Ds, dtypes = [512, 1024, 2048, 4096, 8192], [64, 128], [torch.bfloat16]
    else:
        Ns, Ds, dtypes = [512, 1024, 2048, 4096], [64, 128], [torch.float32, torch.bfloat16]
    if quick:
        Ns, Ds = [1024], [64]
    cases = []
    for dtype in dtypes:
        for D in Ds:
            for N in Ns:
                if device.type == "cpu" and dtype != torch.float32 and N > 2048:
                    continue  # SDPA's bf16 CPU backward takes tens of seconds per call here
                key = (dtype, D, N)
                if device.type == "cuda":
                    tier, full = ("default" if D == 64 or N in (1024, 4096) else "full"), ()
                else:
                    tier = "default" if key in CPU_DEFAULT else "full"
                    full = ("flex",) if key in CPU_DEFAULT_FLEX else ("flex", "flex-compiled")
                cases += _cases_for(device, 1, 8, N, D, dtype, tier=tier, full_impls=full)
    return cases


@suite("masks")
def mask_cases(device: torch.device, quick: bool) -> List[Case]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    headline = 4096 if device.type == "cuda" else 2048
    causal_Ns = [1024] if quick else [headline // 2, headline, headline * 2]
    cases = []
    for n in causal_Ns:
        cases += _cases_for(device, 1, 8, n, 64, dtype, causal=True, tier="default" if n == headline else "full",
                            full_impls=("flex",) if n == headline else ("flex", "flex-compiled"))
    win_Ns = [4096, 16384] if not quick else [2048]
    for n in win_Ns:
        # SDPA with a dense band mask takes seconds per call at N=16384: --full only
        cases += _cases_for(device, 1, 4 if device.type == "cpu" else 8, n, 64, dtype, window=(256, 0),
                            label=f"N{n} D64 window(256,0)", tier="default" if n <= 4096 else "full",
                            full_impls=("flex",))
    cases += _varlen_cases(device, dtype, quick)
    return cases


def _varlen_cases(device, dtype, quick) -> List[Case]:
    import pyattn

    B, N, H, D = (16, 512, 12, 64) if not quick else (8, 256, 4, 64)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(N // 8, N + 1, (B,), generator=g)
    keep = (torch.arange(N)[None, :] < lengths[:, None]).to(device)  # True = real token
    pad = ~keep  # key_padding_mask: True = padding (PyTorch's meaning)
    x = [torch.randn(B, N, H, D, device=device, dtype=dtype) for _ in range(3)]
    packed = [pyattn.unpad(t, keep)[0] for t in x]
    _, _, cu, max_len = pyattn.unpad(x[0], keep)
    q, k, v = (t.transpose(1, 2) for t in x)
    flops = sum(4 * H * int(n) * int(n) * D for n in lengths)
    mask4 = keep[:, None, None, :]
    impls = {
        "pyattn": lambda: pyattn.varlen_attention(*packed, cu, cu, max_len, max_len),
        "pyattn-padded": lambda: pyattn.attention(q, k, v, key_padding_mask=pad),
        "sdpa-padded": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask4),
    }
    fill = float(lengths.sum()) / (B * N)
    return [Case("attention", "fwd", f"BERT-like varlen B{B} N<={N} (fill {fill:.0%})", str(dtype).replace("torch.", ""),
                 impls, work=flops, unit="TFLOP/s", params={"B": B, "N": N, "H": H, "D": D, "fill": round(fill, 3)},
                 figure="attention-varlen")]
