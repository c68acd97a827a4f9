"""Triton LSH attention (Reformer): chunked attention over the bucket-sorted sequence.

Semantics: pyattn/reference/lsh.py. One program per (chunk, batch*head): it gathers its L query
rows through ``perm``, walks the 1 + before + after key chunks of its window ((c + i) mod C, the
banded block schedule on the sorted sequence) with online softmax, and writes the round output
and log-sum-exp at the rows' original positions. The rounds are combined by a second small kernel.
The backward recomputes the scores per chunk and scatters dq/dk/dv with fp32 atomics (rows of
different rounds share positions).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import to_dtype as _to_dtype
from .attention import INTERPRET, _dot, _dropout_keep, _dropout_row_hash

_NEG_INF: tl.constexpr = tl.constexpr(float("-inf"))


@triton.jit
def _window_scores(q, Perm, K, Kpm, bh, b, cc, offs_l, offs_d, pq, L, D, mask_value, self_mask_value,
                   stride_kb, stride_kh, stride_kn, stride_kpm_b, stride_kpm_n, h, T,
                   CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr):
    """Masked scores (BLOCK_L, BLOCK_L) of the query rows against key chunk cc; also its positions,
    the 'score is a mask constant' flags and the loaded key tile."""
    l_ok = offs_l < L
    pk = tl.load(Perm + bh * T + cc * L + offs_l, mask=l_ok, other=0)
    k = tl.load(K + b * stride_kb + h * stride_kh + pk[:, None] * stride_kn + offs_d[None, :],
                mask=l_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros((q.shape[0], k.shape[0]), dtype=tl.float32))
    masked = tl.zeros(s.shape, dtype=tl.int1)
    if CAUSAL:
        masked = masked | (pk[None, :] > pq[:, None])
    if HAS_KPM:
        kp = tl.load(Kpm + b * stride_kpm_b + pk * stride_kpm_n, mask=l_ok, other=0)
        masked = masked | (kp[None, :] != 0)
    s = tl.where(masked, mask_value, s)
    is_self = pk[None, :] == pq[:, None]
    s = tl.where(is_self, self_mask_value, s)
    s = tl.where(l_ok[None, :], s, _NEG_INF)  # columns past the chunk do not exist
    return s, pk, masked | is_self, k


@triton.jit
def _lsh_fwd_kernel(
    Q, K, V, Perm, Kpm, Ob, LseR, seed, dropout_threshold, dropout_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpm_b, stride_kpm_n,
    H, N, D, R, T, L, C, n_before, n_slots, mask_value, self_mask_value,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    d_ok = offs_d < D
    pq = tl.load(Perm + bh * T + c * L + offs_l, mask=l_ok, other=0)
    q = tl.load(Q + b * stride_qb + h * stride_qh + pq[:, None] * stride_qn + offs_d[None, :],
                mask=l_ok[:, None] & d_ok[None, :], other=0.0)
    m = tl.full((BLOCK_L,), _NEG_INF, dtype=tl.float32)
    lsum = tl.zeros((BLOCK_L,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(seed, bh, c * L + offs_l)
    for s_i in range(0, n_slots):
        cc = (c + s_i - n_before + C * n_slots) % C
        s, pk, _cst, _k = _window_scores(q, Perm, K, Kpm, bh, b, cc, offs_l, offs_d, pq, L, D, mask_value,
                                         self_mask_value, stride_kb, stride_kh, stride_kn, stride_kpm_b,
                                         stride_kpm_n, h, T, CAUSAL, HAS_KPM)
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        lsum = lsum * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, cc * L + offs_l, dropout_threshold)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(V + b * stride_vb + h * stride_vh + pk[:, None] * stride_vn + offs_d[None, :],
                    mask=l_ok[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m = m_new
    out = acc / lsum[:, None]
    r = (c * L + offs_l) // N
    orow = (bh * R + r) * N + pq
    tl.store(Ob + orow[:, None] * D + offs_d[None, :], out, mask=l_ok[:, None] & d_ok[None, :])
    tl.store(LseR + orow, m + tl.log(lsum), mask=l_ok)


@triton.jit
def _lsh_combine_kernel(Ob, LseR, Out, Lse, N, D, R, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                        OUT_DTYPE: tl.constexpr):
    """out = sum_r exp(lse_r - lse) o_r, lse = logsumexp_r lse_r, per (row block, batch*head)."""
    pid = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    mx = tl.full((BLOCK_M,), _NEG_INF, dtype=tl.float32)
    for r in range(0, R):
        mx = tl.maximum(mx, tl.load(LseR + (bh * R + r) * N + offs_m, mask=m_ok, other=0.0))
    ssum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r in range(0, R):
        ssum += tl.exp(tl.load(LseR + (bh * R + r) * N + offs_m, mask=m_ok, other=0.0) - mx)
    lse = mx + tl.log(ssum)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for r in range(0, R):
        w = tl.exp(tl.load(LseR + (bh * R + r) * N + offs_m, mask=m_ok, other=0.0) - lse)
        o = tl.load(Ob + ((bh * R + r) * N + offs_m)[:, None] * D + offs_d[None, :],
                    mask=m_ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += w[:, None] * o
    tl.store(Out + (bh * N + offs_m)[:, None] * D + offs_d[None, :], _to_dtype(acc, OUT_DTYPE),
             mask=m_ok[:, None] & (offs_d[None, :] < D))
    tl.store(Lse + bh * N + offs_m, lse, mask=m_ok)


@triton.jit
def _lsh_bwd_kernel(
    Q, K, V, Perm, Kpm, Dout, Out, Lse, Dlse, LseR, DQ, DK, DV, seed, dropout_threshold, dropout_scale,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_kpm_b, stride_kpm_n,
    H, N, D, R, T, L, C, n_before, n_slots, mask_value, self_mask_value,
    CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dS = w_r P (keep * g V^T - g.out + dlse), w_r = exp(lse_r - lse); dQ = dS K, dK = dS^T Q,
    dV = (w_r P keep)^T g, scattered with atomics into fp32 (B, H, N, D) buffers."""
    c = tl.program_id(0).to(tl.int64)
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    l_ok = offs_l < L
    d_ok = offs_d < D
    ld_ok = l_ok[:, None] & d_ok[None, :]
    pq = tl.load(Perm + bh * T + c * L + offs_l, mask=l_ok, other=0)
    r = (c * L) // N
    q = tl.load(Q + b * stride_qb + h * stride_qh + pq[:, None] * stride_qn + offs_d[None, :], mask=ld_ok, other=0.0)
    row = bh * N + pq
    g = tl.load(Dout + row[:, None] * D + offs_d[None, :], mask=ld_ok, other=0.0).to(tl.float32)
    o = tl.load(Out + row[:, None] * D + offs_d[None, :], mask=ld_ok, other=0.0).to(tl.float32)
    lse_r = tl.load(LseR + (bh * R + r) * N + pq, mask=l_ok, other=0.0)
    wr = tl.exp(lse_r - tl.load(Lse + row, mask=l_ok, other=0.0))
    delta = tl.sum(g * o, 1)
    dl = tl.load(Dlse + row, mask=l_ok, other=0.0)
    dq = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(seed, bh, c * L + offs_l)
    for s_i in range(0, n_slots):
        cc = (c + s_i - n_before + C * n_slots) % C
        s, pk, cst, k = _window_scores(q, Perm, K, Kpm, bh, b, cc, offs_l, offs_d, pq, L, D, mask_value,
                                       self_mask_value, stride_kb, stride_kh, stride_kn, stride_kpm_b,
                                       stride_kpm_n, h, T, CAUSAL, HAS_KPM)
        v = tl.load(V + b * stride_vb + h * stride_vh + pk[:, None] * stride_vn + offs_d[None, :],
                    mask=ld_ok, other=0.0)
        p = tl.exp(s - lse_r[:, None]) * wr[:, None]  # 0 in the columns past the chunk
        dp = _dot(g, tl.trans(v.to(tl.float32)), tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.float32))
        pd = p
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, cc * L + offs_l, dropout_threshold)
            z = tl.where(keep, dropout_scale, 0.0)
            dp = dp * z
            pd = p * z
        ds = tl.where(cst, 0.0, p * (dp - delta[:, None] + dl[:, None]))
        dq = _dot(ds, k.to(tl.float32), dq)
        dk = _dot(tl.trans(ds), q.to(tl.float32), tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32))
        dv = _dot(tl.trans(pd), g, tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32))
        krow = bh * N + pk
        tl.atomic_add(DK + krow[:, None] * D + offs_d[None, :], dk, mask=ld_ok)
        tl.atomic_add(DV + krow[:, None] * D + offs_d[None, :], dv, mask=ld_ok)
    tl.atomic_add(DQ + row[:, None] * D + offs_d[None, :], dq, mask=ld_ok)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _blocks(L: int, D: int):
    return max(16, triton.next_power_of_2(L)), max(16, triton.next_power_of_2(D))


def _common(q, k, v, perm, kpm, L, nb, na):
    B, H, N, D = q.shape
    T = perm.shape[-1]
    kpm_t = kpm if kpm is not None else q.new_zeros((1, 1), dtype=torch.bool)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), kpm_t.stride(0), kpm_t.stride(1))
    return B, H, N, D, T, T // N, T // L, kpm_t, strides


def lsh_forward(q, k, v, perm, kpm, L, nb, na, causal, mv, smv, p, threshold, seed):
    """Returns out (B, H, N, D), lse fp32 (B, H, N), lse_r fp32 (B, H, R, N)."""
    B, H, N, D, T, R, C, kpm_t, strides = _common(q, k, v, perm, kpm, L, nb, na)
    BL, BD = _blocks(L, D)
    o_r = torch.empty((B, H, R, N, D), device=q.device, dtype=torch.float32)
    lse_r = torch.empty((B, H, R, N), device=q.device, dtype=torch.float32)
    scale = 1.0 / (1.0 - p) if p > 0 else 1.0
    _lsh_fwd_kernel[(C, B * H)](
        q, k, v, perm, kpm_t, o_r, lse_r, seed, threshold, scale, *strides,
        H, N, D, R, T, L, C, nb, 1 + nb + na, mv, smv,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_DROPOUT=p > 0, BLOCK_L=BL, BLOCK_D=BD,
        num_warps=4, num_stages=1)
    out = torch.empty((B, H, N, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    BM = 32 if INTERPRET else 64
    _lsh_combine_kernel[(triton.cdiv(N, BM), B * H)](o_r, lse_r, out, lse, N, D, R, BLOCK_M=BM, BLOCK_D=BD,
                                                     OUT_DTYPE=_TL_DTYPES[q.dtype], num_warps=4)
    return out, lse, lse_r


def lsh_backward(dout, dlse, q, k, v, out, lse, lse_r, perm, kpm, L, nb, na, causal, mv, smv, p, threshold, seed):
    B, H, N, D, T, R, C, kpm_t, strides = _common(q, k, v, perm, kpm, L, nb, na)
    BL, BD = _blocks(L, D)
    dq = torch.zeros((B, H, N, D), device=q.device, dtype=torch.float32)
    dk = torch.zeros_like(dq)
    dv = torch.zeros_like(dq)
    scale = 1.0 / (1.0 - p) if p > 0 else 1.0
    _lsh_bwd_kernel[(C, B * H)](
        q, k, v, perm, kpm_t, dout, out, lse, dlse, lse_r, dq, dk, dv, seed, threshold, scale, *strides,
        H, N, D, R, T, L, C, nb, 1 + nb + na, mv, smv,
        CAUSAL=causal, HAS_KPM=kpm is not None, HAS_DROPOUT=p > 0, BLOCK_L=BL, BLOCK_D=BD,
        num_warps=4, num_stages=1)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
