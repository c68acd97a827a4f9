"""The calls whose Triton launches the static GPU check compiles: every shipped config.

Each case is a forward and backward call of the public API with CPU tensors and
``backend="triton"``, run under :func:`pyattn.tools.launch_capture.capture` (so nothing executes;
only the launch parameters are recorded). Cases marked ``ci`` form the representative set compiled
in the test suite; ``--all`` compiles every case.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Case:
    name: str
    family: str
    run: Callable[[], None]
    ci: bool = False


def _backward(outputs):
    outputs = [o for o in outputs if o.requires_grad]
    torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])


# --------------------------------------------------------------------------------------------
# attention: the plain variant, every mask flag alone, and all flags together (the register peak)
# --------------------------------------------------------------------------------------------
ATTN_VARIANTS = ("plain", "causal", "window", "padding", "bias", "alibi", "dropout", "varlen", "all")
ATTN_HEAD_DIMS = (64, 128, 256, 96)  # 96: padded head dim (EVEN_D False)
# CI: the plain variant, the all-flags variant (highest register pressure) at D 128 and 256
_ATTN_CI = {("bf16", 64, "plain"), ("bf16", 128, "all"), ("bf16", 256, "all")}


def _attention_case(dtype: torch.dtype, D: int, variant: str) -> Callable[[], None]:
    def run():
        import pyattn

        B, H, N = 2, 4, 256
        mk = lambda *shape: torch.randn(*shape, dtype=dtype).requires_grad_()  # noqa: E731
        if variant == "varlen":
            cu = torch.tensor([0, 100, N], dtype=torch.int32)
            q, k, v = mk(N, H, D), mk(N, H, D), mk(N, H, D)
            out = pyattn.varlen_attention(q, k, v, cu, cu, 156, 156, causal=True, backend="triton")
            _backward([out])
            return
        q, k, v = mk(B, H, N, D), mk(B, H // 2, N, D), mk(B, H // 2, N, D)  # GQA
        kw = {}
        if variant in ("causal", "all"):
            kw["causal"] = True
        if variant == "window":
            kw["window"] = (128, 0)
        if variant in ("padding", "all"):
            pad = torch.zeros(B, N, dtype=torch.bool)
            pad[1, 200:] = True  # True = padding (PyTorch's meaning)
            kw["key_padding_mask"] = pad
        if variant in ("bias", "all"):
            kw["bias"] = torch.randn(1, H, N, N, dtype=dtype).requires_grad_()
        if variant in ("alibi", "all"):
            kw["alibi_slopes"] = torch.rand(H)
        if variant in ("dropout", "all"):
            kw["dropout_p"] = 0.1
        out = pyattn.attention(q, k, v, backend="triton", **kw)
        _backward([out])

    return run


def attention_cases() -> List[Case]:
    cases = []
    for dn, dtype in DTYPES.items():
        for D in ATTN_HEAD_DIMS:
            for variant in ATTN_VARIANTS:
                cases.append(Case(f"attention_{dn}_d{D}_{variant}", "attention", _attention_case(dtype, D, variant),
                                  ci=(dn, D, variant) in _ATTN_CI))
    return cases


# --------------------------------------------------------------------------------------------
# rms_norm: small rows, the widest single-pass rows of forward and backward, chunked rows
# --------------------------------------------------------------------------------------------
def _rms_norm_case(dtype: torch.dtype, N: int, residual: bool) -> Callable[[], None]:
    def run():
        import pyattn

        x = torch.randn(16, N, dtype=dtype).requires_grad_()
        w = torch.randn(N, dtype=dtype).requires_grad_()
        if residual:
            r = torch.randn(16, N, dtype=dtype).requires_grad_()
            y, h = pyattn.rms_norm(x, w, residual=r, backend="triton")
            _backward([y, h])
        else:
            _backward([pyattn.rms_norm(x, w, backend="triton")])

    return run


def rms_norm_cases() -> List[Case]:
    cases = []
    for dn, dtype in DTYPES.items():
        for N in (1024, 4096, 8192, 65536):
            for residual in (False, True):
                ci = dn == "bf16" and residual and N == 65536
                cases.append(Case(f"rms_norm_{dn}_N{N}{'_residual' if residual else ''}", "rms_norm",
                                  _rms_norm_case(dtype, N, residual), ci=ci))
    return cases


# --------------------------------------------------------------------------------------------
# glu: the elementwise GLU (narrow and wide rows) and the fused GLU feed-forward, every activation
# --------------------------------------------------------------------------------------------
def _glu_case(dtype: torch.dtype, act: str, I: int) -> Callable[[], None]:
    def run():
        import pyattn

        gate = torch.randn(64, I, dtype=dtype).requires_grad_()
        up = torch.randn(64, I, dtype=dtype).requires_grad_()
        _backward([pyattn.glu(gate, up, act, backend="triton")])

    return run


def _glu_ffn_case(dtype: torch.dtype, act: str) -> Callable[[], None]:
    def run():
        import pyattn

        x = torch.randn(128, 256, dtype=dtype).requires_grad_()
        wgu = torch.randn(1024, 256, dtype=dtype).requires_grad_()
        wd = torch.randn(256, 512, dtype=dtype).requires_grad_()
        bgu = torch.randn(1024, dtype=dtype).requires_grad_()
        _backward([pyattn.glu_ffn(x, wgu, wd, activation=act, bias_gate_up=bgu, backend="triton")])

    return run


def glu_cases() -> List[Case]:
    from ..reference.glu import ACTIVATIONS

    cases = []
    for dn, dtype in DTYPES.items():
        for act in ACTIVATIONS:
            for I in (64, 1024):
                cases.append(Case(f"glu_{dn}_{act}_I{I}", "glu", _glu_case(dtype, act, I),
                                  ci=dn == "bf16" and act == "gelu" and I == 1024))
            cases.append(Case(f"glu_ffn_{dn}_{act}", "glu", _glu_ffn_case(dtype, act),
                              ci=dn == "bf16" and act == "silu"))
    return cases


FAMILIES = {"attention": attention_cases, "rms_norm": rms_norm_cases, "glu": glu_cases}


def all_cases(families=tuple(FAMILIES)) -> List[Case]:
    return [case for fam in families for case in FAMILIES[fam]()]
