"""GLU feed-forward benchmark rows: pyattn.glu_ffn against the eager LlamaMLP formula (separate
gate/up/down weights, as in Hugging Face), torch.compile of it and, on GPU, Liger-Kernel's SwiGLU.

Work is counted as GEMM FLOPs: forward 6·T·H·I, forward+backward 18·T·H·I. The runner records
each implementation's peak memory (timing.peak_memory_bytes: bytes above what existed before the
call); the bytes saved for backward are recorded in the fwd+bwd row's notes.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from .cases import Case, suite


def llama_mlp_eager(x, w_gate, w_up, w_down):
    # the forward of transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


_compiled: Dict[str, Callable] = {}


def _compiled_eager():
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(llama_mlp_eager, dynamic=False)
    return _compiled["fn"]


def _liger():
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:
        return None

    def f(x, w_gate, w_up, w_down):
        return F.linear(LigerSiLUMulFunction.apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down)

    return f


def _peers(device, w_gate_up):
    import pyattn.ops.glu as ops

    peers = {
        "pyattn": lambda x, wg, wu, wd: ops.glu_ffn(x, w_gate_up, wd),
        "eager": llama_mlp_eager,
        "compile": lambda x, wg, wu, wd: _compiled_eager()(x, wg, wu, wd),
    }
    if device.type == "cuda":
        liger = _liger()
        if liger is not None:
            peers["liger"] = liger
    return peers


def _saved_bytes(fn, params) -> int:
    """Bytes of the distinct non-parameter storages saved for backward by ``fn``."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def _cases_for(device: torch.device, T: int, H: int, inter: int, dtype: torch.dtype) -> List[Case]:
    # one function scope per shape: the timed closures must not see a later iteration's tensors
    gen = torch.Generator(device).manual_seed(0)
    x = torch.randn(T, H, device=device, generator=gen).to(dtype)
    w_gate_up = (torch.randn(2 * inter, H, device=device, generator=gen) / H ** 0.5).to(dtype)
    w_gate, w_up = w_gate_up[:inter].clone(), w_gate_up[inter:].clone()
    w_down = (torch.randn(H, inter, device=device, generator=gen) / inter ** 0.5).to(dtype)
    g = torch.randn(T, H, device=device, generator=gen).to(dtype)
    peers = _peers(device, w_gate_up)
    cfg = f"{T}x{H}x{inter}"
    dname = str(dtype).replace("torch.", "")

    def fwd(f):
        def run():
            with torch.no_grad():
                return f(x, w_gate, w_up, w_down)
        return run

    layout = dict(params={"T": T, "H": H, "I": inter}, x="T", x_label="tokens T", facets=("H", "I"),
                  tier="default" if (T, H, inter) in DEFAULT_SHAPES else "full", measure_memory=True)
    # planning estimates (s per call) for the 2-core CPU from its 2026-11-25 run: GEMM-bound, far
    # above the generic rate the planner assumes otherwise
    scale = T * H * inter / (4096 * 1024 * 2816) if device.type == "cpu" else None
    est_fwd = {"pyattn": 0.45 * scale, "eager": 0.5 * scale, "compile": 0.45 * scale} if scale else None
    est_fb = {"pyattn": 1.25 * scale, "eager": 1.3 * scale, "compile": 1.25 * scale} if scale else None
    cases = [Case("glu_ffn", "fwd", cfg, dname, {n: fwd(f) for n, f in peers.items()},
                  work=6 * T * H * inter, unit="TFLOP/s", est_s=est_fwd, **layout)]

    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    xg, wgug, wdg = leaves
    wgg, wug = (t.detach().clone().requires_grad_() for t in (w_gate, w_up))
    import pyattn.ops.glu as ops

    def clear_grads():  # gradients left from an earlier call would count as memory already there
        xg.grad = wgug.grad = wdg.grad = wgg.grad = wug.grad = None

    def fb_pyattn():
        clear_grads()
        ops.glu_ffn(xg, wgug, wdg).backward(g)

    def fb_peer(f):
        def run():
            clear_grads()
            f(xg, wgg, wug, wdg).backward(g)
        return run

    impls = {"pyattn": fb_pyattn}
    impls.update({n: fb_peer(f) for n, f in peers.items() if n != "pyattn"})

    def saved_notes():
        mb = 2.0 ** 20
        params = [xg, wgug, wdg, wgg, wug]
        notes = {"saved_MB_pyattn": f"{_saved_bytes(lambda: ops.glu_ffn(xg, wgug, wdg), params) / mb:.1f}",
                 "saved_MB_eager": f"{_saved_bytes(lambda: llama_mlp_eager(xg, wgg, wug, wdg), params) / mb:.1f}"}
        clear_grads()
        return notes

    cases.append(Case("glu_ffn", "fwd+bwd", cfg, dname, impls, work=18 * T * H * inter, unit="TFLOP/s",
                      lazy_notes=saved_notes, est_s=est_fb, **layout))
    return cases


SHAPES = [(1024, 1024, 2816), (2048, 1024, 2816), (4096, 1024, 2816)]  # tokens x hidden x intermediate
DEFAULT_SHAPES = {(4096, 1024, 2816), (4096, 4096, 11008)}  # the headline rows (README)
GPU_EXTRA_SHAPES = [(4096, 4096, 11008)]


@suite("glu")
def glu_cases(device: torch.device, quick: bool) -> List[Case]:
    shapes = list(SHAPES)
    if device.type == "cuda":
        shapes += GPU_EXTRA_SHAPES
        dtypes = [torch.bfloat16]
    else:
        # bf16 GEMMs run ~4x slower than fp32 on CPUs without AMX/AVX512-BF16: opt in
        dtypes = [torch.float32] + ([torch.bfloat16] if os.environ.get("PYATTN_BENCH_CPU_BF16") == "1" else [])
    if quick:
        shapes, dtypes = shapes[:1], dtypes[:1]
    if device.type == "cuda":
        shapes = [s for s in shapes if s in DEFAULT_SHAPES] + [s for s in shapes if s not in DEFAULT_SHAPES]
    return [case for dtype in dtypes for T, H, inter in shapes for case in _cases_for(device, T, H, inter, dtype)]
