"""Gated linear unit in Triton.

* ``_glu_fwd_kernel`` / ``_glu_bwd_kernel``: the fused elementwise act(gate) * up and its backward
  (dgate, dup and optionally the recomputed h, which may overwrite dout in place), on 2-D tiles of
  (T, I) views with unit column stride and any row stride.
* ``_glu_matmul_kernel``: pre = x @ w_gate_up.T (+ bias) with the GLU in the epilogue: one program
  owns the gate columns [n, n + BLOCK_N) and the matching up columns [I + n, I + n + BLOCK_N), keeps
  both accumulators, and writes pre (T, 2I) (saved for backward) and h = act(gate) * up (T, I).

Activation codes: 0 silu, 1 gelu (exact erf), 2 gelu_tanh, 3 relu, 4 sigmoid (constexpr: they
select code, not a value).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import to_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERP: tl.constexpr = tl.constexpr(INTERPRET)


@triton.jit
def _tanh(z):
    return 2.0 * tl.sigmoid(2.0 * z) - 1.0


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:
        a = g * tl.sigmoid(g)
    elif ACT == 1:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == 2:
        a = 0.5 * g * (1.0 + _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g)))
    elif ACT == 3:
        a = tl.maximum(g, 0.0)
    else:
        a = tl.sigmoid(g)
    return a


@triton.jit
def _act_grad(g, ACT: tl.constexpr):
    """(act(g), act'(g))."""
    if ACT == 0:
        s = tl.sigmoid(g)
        a = g * s
        d = s * (1.0 + g * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        a = g * cdf
        d = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (g + 0.044715 * g * g * g))
        a = 0.5 * g * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * g * g)
    elif ACT == 3:
        a = tl.maximum(g, 0.0)
        d = tl.where(g > 0.0, 1.0, 0.0)
    else:
        s = tl.sigmoid(g)
        a = s
        d = s * (1.0 - s)
    return a, d


@triton.jit
def _glu_fwd_kernel(G, U, O, stride_g, stride_u, stride_o, T, I,
                    ACT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    # 64-bit scalar row base, 32-bit offsets inside the tile
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    c0 = tl.program_id(1) * BLOCK_I
    rows = tl.arange(0, BLOCK_T)
    cols = c0 + tl.arange(0, BLOCK_I)
    mask = (r0 + rows < T)[:, None] & (cols < I)[None, :]
    g = tl.load(G + r0 * stride_g + (rows[:, None].to(tl.int64) * stride_g + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r0 * stride_u + (rows[:, None].to(tl.int64) * stride_u + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    h = _act(g, ACT) * u
    tl.store(O + r0 * stride_o + (rows[:, None].to(tl.int64) * stride_o + cols[None, :]), to_dtype(h, O.dtype.element_ty),
             mask=mask)


@triton.jit
def _glu_bwd_kernel(DO, G, U, DG, DU, H, stride_do, stride_g, stride_u, stride_dg, stride_du, stride_h, T, I,
                    ACT: tl.constexpr, STORE_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_I: tl.constexpr):
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_T
    c0 = tl.program_id(1) * BLOCK_I
    rows = tl.arange(0, BLOCK_T)
    cols = c0 + tl.arange(0, BLOCK_I)
    mask = (r0 + rows < T)[:, None] & (cols < I)[None, :]
    do = tl.load(DO + r0 * stride_do + (rows[:, None].to(tl.int64) * stride_do + cols[None, :]), mask=mask,
                 other=0.0).to(tl.float32)
    g = tl.load(G + r0 * stride_g + (rows[:, None].to(tl.int64) * stride_g + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + r0 * stride_u + (rows[:, None].to(tl.int64) * stride_u + cols[None, :]), mask=mask, other=0.0).to(tl.float32)
    a, d = _act_grad(g, ACT)
    tl.store(DG + r0 * stride_dg + (rows[:, None].to(tl.int64) * stride_dg + cols[None, :]), to_dtype(do * u * d, DG.dtype.element_ty),
             mask=mask)
    tl.store(DU + r0 * stride_du + (rows[:, None].to(tl.int64) * stride_du + cols[None, :]), to_dtype(do * a, DU.dtype.element_ty),
             mask=mask)
    if STORE_H:  # H may be DO: each element is read above before it is overwritten here
        tl.store(H + r0 * stride_h + (rows[:, None].to(tl.int64) * stride_h + cols[None, :]), to_dtype(a * u, H.dtype.element_ty),
                 mask=mask)


@triton.jit
def _glu_matmul_kernel(X, W, B, PRE, H, T, I, K, stride_xm, stride_wn, stride_pm, stride_hm,
                       ACT: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_m = tl.cdiv(T, BLOCK_M)
    num_n = tl.cdiv(I, BLOCK_N)
    # grouped order: GROUP_M row blocks share the same weight columns while they are in L2
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m

    # 64-bit scalar tile bases, 32-bit offsets inside the tile (fewer registers than 64-bit pointer tiles)
    m0 = pid_m.to(tl.int64) * BLOCK_M
    n0 = pid_n.to(tl.int64) * BLOCK_N
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # rows / columns past the end re-read the last one (in bounds, no load masks; results unused)
    lm = tl.minimum(pid_m * BLOCK_M + offs_m, T - 1) - pid_m * BLOCK_M
    ln = tl.minimum(pid_n * BLOCK_N + offs_n, I - 1) - pid_n * BLOCK_N
    x_ptrs = X + m0 * stride_xm + (lm[:, None].to(tl.int64) * stride_xm + rk[None, :])
    wg_ptrs = W + n0 * stride_wn + (ln[None, :].to(tl.int64) * stride_wn + rk[:, None])
    wu_ptrs = W + (n0 + I) * stride_wn + (ln[None, :].to(tl.int64) * stride_wn + rk[:, None])
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = rk < K - k
        a = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        bg = tl.load(wg_ptrs, mask=k_ok[:, None], other=0.0)
        bu = tl.load(wu_ptrs, mask=k_ok[:, None], other=0.0)
        if _INTERP:  # 16-bit tl.dot is wrong under the interpreter
            a = a.to(tl.float32)
            bg = bg.to(tl.float32)
            bu = bu.to(tl.float32)
        if IEEE:  # fp32 inputs: full fp32 products, not tf32
            acc_g = tl.dot(a, bg, acc_g, input_precision="ieee")
            acc_u = tl.dot(a, bu, acc_u, input_precision="ieee")
        else:
            acc_g = tl.dot(a, bg, acc_g)
            acc_u = tl.dot(a, bu, acc_u)
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K
        wu_ptrs += BLOCK_K
    rn = pid_n * BLOCK_N + offs_n
    n_ok = rn < I
    if HAS_BIAS:
        acc_g += tl.load(B + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_u += tl.load(B + I + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = (pid_m * BLOCK_M + offs_m < T)[:, None] & n_ok[None, :]
    g_low = to_dtype(acc_g, PRE.dtype.element_ty)
    u_low = to_dtype(acc_u, PRE.dtype.element_ty)
    p_ptrs = PRE + m0 * stride_pm + n0 + (offs_m[:, None] * stride_pm + offs_n[None, :])
    tl.store(p_ptrs, g_low, mask=mask)
    tl.store(p_ptrs + I, u_low, mask=mask)
    # h from the rounded pre-activation: the same values the backward recomputes it from
    h = _act(g_low.to(tl.float32), ACT) * u_low.to(tl.float32)
    tl.store(H + m0 * stride_hm + n0 + (offs_m[:, None] * stride_hm + offs_n[None, :]), to_dtype(h, H.dtype.element_ty),
             mask=mask)


# ----------------------------------------------------------------------------------------------
def _ew_blocks(I: int):
    block_i = min(triton.next_power_of_2(max(I, 1)), 64 if INTERPRET else 1024)
    block_t = max(1, (64 if INTERPRET else 1024) // block_i)
    warps = 1 if INTERPRET else 4  # 8 elements per thread: no spills (gpu_compile_specs)
    return block_t, block_i, warps


def _row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.shape[0] > 1 else t.shape[1]


def _unit_cols(t: torch.Tensor) -> torch.Tensor:
    return t if t.shape[1] <= 1 or t.stride(1) == 1 else t.contiguous()


def glu_forward(gate: torch.Tensor, up: torch.Tensor, act: int, out: torch.Tensor = None) -> torch.Tensor:
    """gate, up: (T, I) with unit column stride. Returns act(gate) * up as (T, I) (into ``out`` if given)."""
    gate, up = _unit_cols(gate), _unit_cols(up)
    T, I = gate.shape
    if out is None:
        out = torch.empty((T, I), dtype=gate.dtype, device=gate.device)
    if T == 0 or I == 0:
        return out
    bt, bi, warps = _ew_blocks(I)
    _glu_fwd_kernel[(triton.cdiv(T, bt), triton.cdiv(I, bi))](
        gate, up, out, _row_stride(gate), _row_stride(up), _row_stride(out), T, I,
        ACT=act, BLOCK_T=bt, BLOCK_I=bi, num_warps=warps)
    return out


def glu_backward_into(dout, gate, up, act: int, dgate, dup, store_h: bool) -> None:
    """Writes dgate/dup into the given (T, I) views (unit column stride, any row stride); with
    ``store_h`` overwrites ``dout`` with h = act(gate) * up."""
    T, I = gate.shape
    if T == 0 or I == 0:
        return
    bt, bi, warps = _ew_blocks(I)
    _glu_bwd_kernel[(triton.cdiv(T, bt), triton.cdiv(I, bi))](
        dout, gate, up, dgate, dup, dout, _row_stride(dout), _row_stride(gate), _row_stride(up), _row_stride(dgate),
        _row_stride(dup), _row_stride(dout), T, I, ACT=act, STORE_H=store_h, BLOCK_T=bt, BLOCK_I=bi, num_warps=warps)


def glu_backward(dout, gate, up, act: int):
    """Returns (dgate, dup), contiguous (T, I)."""
    gate, up, dout = _unit_cols(gate), _unit_cols(up), _unit_cols(dout)
    dgate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    dup = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    glu_backward_into(dout, gate, up, act, dgate, dup, False)
    return dgate, dup


def _gpu_matmul_config(fp32: bool):
    """(BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) on the GPU, chosen so that the two
    accumulators fit in registers without spills on sm_80 and sm_90 (see gpu_compile_specs)."""
    return (64, 64, 32, 8, 8, 3) if fp32 else (128, 64, 32, 8, 8, 3)


def _matmul_config(dtype: torch.dtype):
    if INTERPRET:  # small tiles, one config (multi-config autotune fails under the interpreter)
        return 16, 16, 16, 4, 1, 1
    return _gpu_matmul_config(dtype == torch.float32)


def glu_matmul(x: torch.Tensor, w_gate_up: torch.Tensor, bias, act: int):
    """x (T, K), w_gate_up (2I, K), bias (2I,) or None; rows of x and w need unit stride along K
    (copied otherwise: a transposed weight view).

    Returns (pre (T, 2I) = x @ w_gate_up.T + bias, h (T, I) = act(pre[:, :I]) * pre[:, I:])."""
    T, K = x.shape
    I = w_gate_up.shape[0] // 2
    x = _unit_cols(x)
    w_gate_up = _unit_cols(w_gate_up)
    if bias is not None:
        bias = bias.contiguous()  # read with unit stride (an expanded or sliced bias is copied)
    pre = torch.empty((T, 2 * I), dtype=x.dtype, device=x.device)
    h = torch.empty((T, I), dtype=x.dtype, device=x.device)
    if T == 0:
        return pre, h
    bm, bn, bk, gm, warps, stages = _matmul_config(x.dtype)
    grid = (triton.cdiv(T, bm) * triton.cdiv(I, bn),)
    _glu_matmul_kernel[grid](
        x, w_gate_up, bias if bias is not None else x, pre, h, T, I, K, x.stride(0), w_gate_up.stride(0),
        pre.stride(0), h.stride(0),
        ACT=act, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        GROUP_M=gm, num_warps=warps, num_stages=stages)
    return pre, h


def gpu_compile_specs():
    """Every shipped GPU configuration, for the static sm_80 / sm_90 compile check."""
    specs = []
    for dt, tdt in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        for act in range(5):
            for ew_i in (64, 1024):  # narrow and wide rows: the tile shapes _ew_blocks picks on GPU
                bt, bi, warps = max(1, 1024 // ew_i), ew_i, 4
                specs.append(dict(
                    name=f"glu_fwd_{dt}_act{act}_I{ew_i}", fn=_glu_fwd_kernel,
                    signature=dict(G=f"*{dt}", U=f"*{dt}", O=f"*{dt}", stride_g="i64", stride_u="i64",
                                   stride_o="i64", T="i32", I="i32", ACT="constexpr", BLOCK_T="constexpr",
                                   BLOCK_I="constexpr"),
                    constexprs=dict(ACT=act, BLOCK_T=bt, BLOCK_I=bi), num_warps=warps, num_stages=1))
                specs.append(dict(
                    name=f"glu_bwd_{dt}_act{act}_I{ew_i}", fn=_glu_bwd_kernel,
                    signature=dict(DO=f"*{dt}", G=f"*{dt}", U=f"*{dt}", DG=f"*{dt}", DU=f"*{dt}", H=f"*{dt}",
                                   stride_do="i64", stride_g="i64", stride_u="i64", stride_dg="i64",
                                   stride_du="i64", stride_h="i64", T="i32", I="i32", ACT="constexpr",
                                   STORE_H="constexpr", BLOCK_T="constexpr", BLOCK_I="constexpr"),
                    constexprs=dict(ACT=act, STORE_H=True, BLOCK_T=bt, BLOCK_I=bi), num_warps=warps, num_stages=1))
            bm, bn, bk, gm, mwarps, stages = _gpu_matmul_config(tdt == torch.float32)
            specs.append(dict(
                name=f"glu_matmul_{dt}_act{act}", fn=_glu_matmul_kernel,
                signature=dict(X=f"*{dt}", W=f"*{dt}", B=f"*{dt}", PRE=f"*{dt}", H=f"*{dt}", T="i32", I="i32",
                               K="i32", stride_xm="i64", stride_wn="i64", stride_pm="i64", stride_hm="i64",
                               ACT="constexpr", HAS_BIAS="constexpr", IEEE="constexpr", BLOCK_M="constexpr",
                               BLOCK_N="constexpr", BLOCK_K="constexpr", GROUP_M="constexpr"),
                constexprs=dict(ACT=act, HAS_BIAS=True, IEEE=tdt == torch.float32, BLOCK_M=bm, BLOCK_N=bn,
                                BLOCK_K=bk, GROUP_M=gm),
                num_warps=mwarps, num_stages=stages))
    return specs
