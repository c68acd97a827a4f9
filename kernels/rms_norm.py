"""RMSNorm in Triton: one program per row in the forward, row groups with private weight-gradient
partials in the backward (no atomics, so the weight gradient is deterministic)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import to_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_BLOCK_N = 8192  # wider rows are processed in chunks of this size (forward)
MAX_BLOCK_N_BWD = 4096  # the backward holds more row vectors live: smaller chunks avoid spills


@triton.jit
def _rms_norm_fwd_kernel(X, R, W, Y, H, RSTD, stride_x, stride_r, stride_y, stride_h, N, eps,
                         HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, BLOCK_N: tl.constexpr,
                         SINGLE_PASS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    x_row = X + row * stride_x
    r_row = R + row * stride_r
    h_row = H + row * stride_h
    y_row = Y + row * stride_y
    if SINGLE_PASS:
        mask = cols < N
        h = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            h_low = to_dtype(h + tl.load(r_row + cols, mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
            tl.store(h_row + cols, h_low, mask=mask)
            h = h_low.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / N + eps)
        y = h * rstd
        if HAS_WEIGHT:
            y = y * tl.load(W + cols, mask=mask, other=0.0)
        tl.store(y_row + cols, to_dtype(y, Y.dtype.element_ty), mask=mask)
    else:
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            h = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                h_low = to_dtype(h + tl.load(r_row + start + cols, mask=mask, other=0.0).to(tl.float32), H.dtype.element_ty)
                tl.store(h_row + start + cols, h_low, mask=mask)
                h = h_low.to(tl.float32)
            acc += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / N + eps)
        for start in range(0, N, BLOCK_N):
            mask = start + cols < N
            if HAS_RESIDUAL:
                h = tl.load(h_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            else:
                h = tl.load(x_row + start + cols, mask=mask, other=0.0).to(tl.float32)
            y = h * rstd
            if HAS_WEIGHT:
                y = y * tl.load(W + start + cols, mask=mask, other=0.0)
            tl.store(y_row + start + cols, to_dtype(y, Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DH, DX, DW_PART, stride_dy, stride_x, stride_dh, stride_dx,
                         M, N, rows_per_program,
                         HAS_WEIGHT: tl.constexpr, HAS_DH: tl.constexpr, BLOCK_N: tl.constexpr,
                         SINGLE_PASS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    row_begin = pid * rows_per_program
    row_end = tl.minimum(row_begin + rows_per_program, M)
    cols = tl.arange(0, BLOCK_N)
    dw_row = DW_PART + pid * N
    if SINGLE_PASS:
        mask = cols < N
        if HAS_WEIGHT:
            w = tl.load(W + cols, mask=mask, other=0.0)
        dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for row in range(row_begin, row_end):
            rstd = tl.load(RSTD + row)
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            xhat = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32) * rstd
            g = dy
            if HAS_WEIGHT:
                dw_acc += dy * xhat
                g = dy * w
            c = tl.sum(xhat * g, axis=0) / N
            dx = (g - xhat * c) * rstd
            if HAS_DH:
                dx += tl.load(DH + row * stride_dh + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + row * stride_dx + cols, to_dtype(dx, DX.dtype.element_ty), mask=mask)
        if HAS_WEIGHT:
            tl.store(dw_row + cols, dw_acc, mask=mask)
    else:
        if HAS_WEIGHT:
            for start in range(0, N, BLOCK_N):
                tl.store(dw_row + start + cols, tl.zeros([BLOCK_N], dtype=tl.float32), mask=start + cols < N)
        for row in range(row_begin, row_end):
            rstd = tl.load(RSTD + row)
            acc = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                g = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
                if HAS_WEIGHT:
                    g = g * tl.load(W + start + cols, mask=mask, other=0.0)
                xhat = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                acc += xhat * g
            c = tl.sum(acc, axis=0) / N
            for start in range(0, N, BLOCK_N):
                mask = start + cols < N
                dy = tl.load(DY + row * stride_dy + start + cols, mask=mask, other=0.0).to(tl.float32)
                xhat = tl.load(X + row * stride_x + start + cols, mask=mask, other=0.0).to(tl.float32) * rstd
                g = dy
                if HAS_WEIGHT:
                    g = dy * tl.load(W + start + cols, mask=mask, other=0.0)
                    # this program owns its partial row: read-modify-write is race free
                    dw = tl.load(dw_row + start + cols, mask=mask, other=0.0)
                    tl.store(dw_row + start + cols, dw + dy * xhat, mask=mask)
                dx = (g - xhat * c) * rstd
                if HAS_DH:
                    dx += tl.load(DH + row * stride_dh + start + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DX + row * stride_dx + start + cols, to_dtype(dx, DX.dtype.element_ty), mask=mask)


def _block_and_warps(N: int, max_block: int = MAX_BLOCK_N):
    block = min(triton.next_power_of_2(max(N, 1)), max_block)
    if INTERPRET:
        return block, 1
    warps = 16 if block >= 8192 else 8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1
    return block, warps


def rms_norm_forward(x, weight, residual, eps):
    """x, residual: (M, N) with unit column stride; weight: (N,) fp32 or None.

    Returns (y (M, N) in x.dtype, h (M, N) or empty, rstd (M,) fp32)."""
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    h = torch.empty((M, N) if residual is not None else (0,), dtype=x.dtype, device=x.device)
    rstd = torch.empty((M,), dtype=torch.float32, device=x.device)
    if M == 0:
        return y, h, rstd
    block, warps = _block_and_warps(N)
    _rms_norm_fwd_kernel[(M,)](
        x, residual if residual is not None else x, weight if weight is not None else x, y, h, rstd,
        x.stride(0), residual.stride(0) if residual is not None else 0, y.stride(0), N if residual is not None else 0,
        N, eps, HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None, BLOCK_N=block,
        SINGLE_PASS=N <= block, num_warps=warps)
    return y, h, rstd


def _num_row_groups(M: int, device: torch.device) -> int:
    if device.type == "cuda":
        return max(1, min(M, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(M, 8))


def rms_norm_backward(dy, xin, weight, rstd, dh):
    """Returns (dx (M, N) in xin.dtype, dweight (N,) fp32 or empty)."""
    M, N = xin.shape
    dx = torch.empty((M, N), dtype=xin.dtype, device=xin.device)
    groups = _num_row_groups(M, xin.device)
    rows_per_program = triton.cdiv(M, groups) if M else 0
    dw_part = torch.empty((groups if weight is not None else 0, N), dtype=torch.float32, device=xin.device)
    if M > 0:
        block, warps = _block_and_warps(N, MAX_BLOCK_N_BWD)
        _rms_norm_bwd_kernel[(groups,)](
            dy, xin, weight if weight is not None else xin, rstd, dh if dh is not None else dy, dx,
            dw_part if weight is not None else dx, dy.stride(0), xin.stride(0),
            dh.stride(0) if dh is not None else 0, dx.stride(0), M, N, rows_per_program,
            HAS_WEIGHT=weight is not None, HAS_DH=dh is not None, BLOCK_N=block, SINGLE_PASS=N <= block,
            num_warps=warps)
    if weight is None:
        return dx, torch.empty((0,), dtype=torch.float32, device=xin.device)
    if M == 0:
        return dx, torch.zeros((N,), dtype=torch.float32, device=xin.device)
    return dx, dw_part.sum(0)


def gpu_compile_specs():
    """Every shipped GPU configuration, for the static sm_80 / sm_90 compile check."""
    specs = []
    for dt in ("fp32", "fp16", "bf16"):
        # (hidden size, single pass): small rows, the widest single-pass rows, chunked rows
        for n, single in ((1024, True), (MAX_BLOCK_N_BWD, True), (MAX_BLOCK_N, True), (65536, False)):
            block, warps = _block_and_warps(n)
            specs.append(dict(
                name=f"rms_norm_fwd_{dt}_N{n}", fn=_rms_norm_fwd_kernel,
                signature=dict(X=f"*{dt}", R=f"*{dt}", W="*fp32", Y=f"*{dt}", H=f"*{dt}", RSTD="*fp32",
                               stride_x="i64", stride_r="i64", stride_y="i64", stride_h="i64", N="i32", eps="fp32",
                               HAS_RESIDUAL="constexpr", HAS_WEIGHT="constexpr", BLOCK_N="constexpr",
                               SINGLE_PASS="constexpr"),
                constexprs=dict(HAS_RESIDUAL=True, HAS_WEIGHT=True, BLOCK_N=block, SINGLE_PASS=n <= block),
                num_warps=warps, num_stages=1))
            block, warps = _block_and_warps(n, MAX_BLOCK_N_BWD)
            specs.append(dict(
                name=f"rms_norm_bwd_{dt}_N{n}", fn=_rms_norm_bwd_kernel,
                signature=dict(DY=f"*{dt}", X=f"*{dt}", W="*fp32", RSTD="*fp32", DH=f"*{dt}", DX=f"*{dt}",
                               DW_PART="*fp32", stride_dy="i64", stride_x="i64", stride_dh="i64", stride_dx="i64",
                               M="i32", N="i32", rows_per_program="i32",
                               HAS_WEIGHT="constexpr", HAS_DH="constexpr", BLOCK_N="constexpr",
                               SINGLE_PASS="constexpr"),
                constexprs=dict(HAS_WEIGHT=True, HAS_DH=True, BLOCK_N=block, SINGLE_PASS=n <= block),
                num_warps=warps, num_stages=1))
    return specs
