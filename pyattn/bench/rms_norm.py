"""RMSNorm benchmark rows: pyattn against eager (Hugging Face LlamaRMSNorm), F.rms_norm,
torch.compile of the eager formula and, on GPU, Liger-Kernel."""
from __future__ import annotations

from typing import List

import torch

from .cases import Case, suite


def llama_rms_norm_eager(x, weight, eps):
    # the formula of transformers' LlamaRMSNorm
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


_compiled = {}


def _compiled_eager():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(llama_rms_norm_eager, dynamic=False)
    return _compiled["fn"]


def _peers(device):
    import pyattn

    peers = {
        "pyattn": lambda x, w, eps: pyattn.rms_norm(x, w, eps),
        "eager": llama_rms_norm_eager,
        "F.rms_norm": lambda x, w, eps: torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps),
        "compile": lambda x, w, eps: _compiled_eager()(x, w, eps),
    }
    if device.type == "cuda":
        try:
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            peers["liger"] = lambda x, w, eps: LigerRMSNormFunction.apply(x, w, eps)
        except Exception:
            pass
    return peers


SHAPES = [(1024, 1024), (4096, 1024), (4096, 4096), (8192, 4096)]  # rows x hidden
DEFAULT_SHAPES = {(4096, 1024), (8192, 4096)}  # the headline rows (README) of the default run


def _cases_for(device: torch.device, M: int, N: int, dtype: torch.dtype) -> List[Case]:
    # one function scope per shape: the timed closures must not see a later iteration's tensors
    x = torch.randn(M, N, device=device, dtype=dtype)
    w = torch.randn(N, device=device, dtype=dtype)
    g = torch.randn(M, N, device=device, dtype=dtype)
    elt = x.element_size()
    peers = _peers(device)
    dname = str(dtype).replace("torch.", "")
    fwd = {name: (lambda f=f: f(x, w, 1e-6)) for name, f in peers.items()}
    xg = x.detach().clone().requires_grad_()
    wg = w.detach().clone().requires_grad_()

    def fwd_bwd(f):
        def run():
            xg.grad = None
            wg.grad = None
            f(xg, wg, 1e-6).backward(g)
        return run

    layout = dict(params={"rows": M, "hidden": N, "elements": M * N}, x="elements", x_label="tensor size (elements)",
                  tier="default" if (M, N) in DEFAULT_SHAPES else "full")
    return [Case("rms_norm", "fwd", f"{M}x{N}", dname, fwd, work=2 * M * N * elt, unit="GB/s", **layout),
            Case("rms_norm", "fwd+bwd", f"{M}x{N}", dname, {name: fwd_bwd(f) for name, f in peers.items()},
                 work=5 * M * N * elt, unit="GB/s", **layout)]


@suite("rms_norm")
def rms_norm_cases(device: torch.device, quick: bool) -> List[Case]:
    dtypes = [torch.float32] if device.type == "cpu" else [torch.bfloat16, torch.float32]
    shapes = SHAPES[:1] if quick else SHAPES
    return [case for dtype in dtypes for M, N in shapes for case in _cases_for(device, M, N, dtype)]
