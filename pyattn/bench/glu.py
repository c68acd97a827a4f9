"""GLU feed-forward benchmark rows: pyattn.glu_ffn against the eager LlamaMLP formula (separate
gate/up/down weights, as in Hugging Face), torch.compile of it and, on GPU, Liger-Kernel's SwiGLU.

Work is counted as GEMM FLOPs: forward 6·T·H·I, forward+backward 18·T·H·I. Peak memory of one
forward+backward (bytes above what existed before the call) is recorded in the notes: on GPU
from torch.cuda.max_memory_allocated, on CPU from the peak resident set size (reset through
/proc/self/clear_refs; large tensors are mmap'd, so RSS follows them), else from the PyTorch
profiler's allocation events; the bytes saved for backward are recorded too.
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


def _peak_bytes(fn, device) -> int:
    """Peak bytes allocated above the starting point while ``fn`` runs."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:  # Linux: reset the peak RSS, run, read it back (large tensors are mmap'd: RSS follows them)
        import gc
        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        fn()
        return max(0, _proc_status_kb("VmHWM") - base) * 1024
    except OSError:
        pass
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # allocations are attributed to the op that made them (self memory), frees to "[memory]" events
    events = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events())
    cur = peak = 0
    for _, delta in events:
        cur += delta
        peak = max(peak, cur)
    return peak


def _proc_status_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")


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

    cases = [Case("glu_ffn", "fwd", cfg, dname, {n: fwd(f) for n, f in peers.items()},
                  work=6 * T * H * inter, unit="TFLOP/s")]

    leaves = [t.detach().clone().requires_grad_() for t in (x, w_gate_up, w_down)]
    xg, wgug, wdg = leaves
    wgg, wug = (t.detach().clone().requires_grad_() for t in (w_gate, w_up))
    import pyattn.ops.glu as ops

    def fb_pyattn():
        xg.grad = wgug.grad = wdg.grad = None
        ops.glu_ffn(xg, wgug, wdg).backward(g)

    def fb_peer(f):
        def run():
            xg.grad = wgg.grad = wug.grad = wdg.grad = None
            f(xg, wgg, wug, wdg).backward(g)
        return run

    impls = {"pyattn": fb_pyattn}
    impls.update({n: fb_peer(f) for n, f in peers.items() if n != "pyattn"})
    notes = {}
    try:
        fb_pyattn()  # warm up (builds the extension) before measuring memory
        fb_peer(llama_mlp_eager)()
        mb = 2.0 ** 20

        def peak(fn):
            xg.grad = wgug.grad = wdg.grad = wgg.grad = wug.grad = None  # gradients count as new memory
            return f"{_peak_bytes(fn, device) / mb:.1f}"

        notes["peak_mem_MB_pyattn"] = peak(fb_pyattn)
        notes["peak_mem_MB_eager"] = peak(fb_peer(llama_mlp_eager))
        if "liger" in peers:
            notes["peak_mem_MB_liger"] = peak(fb_peer(peers["liger"]))
        params = [xg, wgug, wdg, wgg, wug]
        notes["saved_MB_pyattn"] = f"{_saved_bytes(lambda: ops.glu_ffn(xg, wgug, wdg), params) / mb:.1f}"
        notes["saved_MB_eager"] = \
            f"{_saved_bytes(lambda: llama_mlp_eager(xg, wgg, wug, wdg), params) / mb:.1f}"
        xg.grad = wgug.grad = wdg.grad = wgg.grad = wug.grad = None
    except Exception as exc:  # memory notes are best effort
        notes["peak_mem_error"] = f"{type(exc).__name__}: {exc}"[:120]
    cases.append(Case("glu_ffn", "fwd+bwd", cfg, dname, impls, work=18 * T * H * inter, unit="TFLOP/s",
                      notes=notes))
    return cases


SHAPES = [(4096, 1024, 2816)]  # tokens x hidden x intermediate
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
    return [case for dtype in dtypes for T, H, inter in shapes for case in _cases_for(device, T, H, inter, dtype)]
