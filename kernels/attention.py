"""FlashAttention-2 in Triton: the attention engine of pyattn (semantics: pyattn/reference/attention.py).

One forward kernel and one backward pair (dk/dv over key blocks, dq over query blocks; no atomics,
deterministic) share one score routine, specialised by ``tl.constexpr`` feature flags
(bias, alibi, key padding, window band, dropout, varlen). Scalars (scale, window sizes, dropout
threshold, seed, lengths) are runtime arguments. Key/query blocks outside the visibility band are
skipped by computing the loop bounds.

Plain PyTorch equivalent of the forward (no masks)::

    s = scale * q @ k.transpose(-1, -2)          # (B, H, Nq, Nk), k repeated over GQA groups
    lse = torch.logsumexp(s, -1)
    out = torch.softmax(s, -1) @ v

This module imports only torch and triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import to_dtype as _to_dtype
from .attention_configs import launch_config as _launch_config

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_C: tl.constexpr = tl.constexpr(INTERPRET)

LOG2E = 1.4426950408889634
_LOG2E_C: tl.constexpr = tl.constexpr(LOG2E)


# --------------------------------------------------------------------------------------------
# jit helpers
# --------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, acc):
    """acc + a @ b with fp32 accumulation. Interpreter: upcast (its bf16/fp16 dot is wrong).
    fp32 operands use IEEE precision (no TF32) so fp32 results match an fp32 reference."""
    if _INTERPRET_C:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    x = x ^ (x >> 16)
    return x


@triton.jit
def _dropout_row_hash(seed, bh, offs_m):
    """hash32(a ^ i) per query row, a = hash32(seed + bh * 0x9E3779B9) (u32 wrap)."""
    a = _hash32(seed.to(tl.uint32) + bh.to(tl.uint32) * 0x9E3779B9)
    return _hash32(a ^ offs_m.to(tl.uint32))


@triton.jit
def _dropout_keep(row_hash, offs_n, threshold):
    r = _hash32(row_hash[:, None] ^ offs_n.to(tl.uint32)[None, :])
    return (r >> 8) >= threshold.to(tl.uint32)


@triton.jit
def _scores(q, k_ptrs, offs_m, offs_n, d_ok, Nq, Nk, off, qk_scale,
            bias_ptr, stride_bias_m, stride_bias_n, slope2, kpm_ptr, stride_kpm_n,
            window_left, window_right, bits_ptr, stride_bits_m, partial,
            HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PADDING: tl.constexpr,
            HAS_WINDOW: tl.constexpr, HAS_BITS: tl.constexpr):
    """Scores of one (BLOCK_M, BLOCK_N) tile in log2 units (s * log2(e)); invisible -> -inf.
    k_ptrs points at the (BLOCK_N, BLOCK_D) key tile (rows offs_n). With HAS_BITS, a ``partial``
    tile of a block schedule also applies the packed element mask (bit j % 8 of byte j // 8 of
    row i); full tiles skip its loads."""
    n_ok = offs_n < Nk
    k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
    s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], k.shape[0]], dtype=tl.float32)) * qk_scale
    valid = (offs_m[:, None] < Nq) & n_ok[None, :]
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_m[:, None].to(tl.int64) * stride_bias_m + offs_n[None, :].to(tl.int64) * stride_bias_n,
                    mask=valid, other=0.0).to(tl.float32)
        s += b * _LOG2E_C
    if HAS_ALIBI:
        dist = tl.abs(offs_m[:, None] + off - offs_n[None, :]).to(tl.float32)
        s -= slope2 * dist
    if HAS_WINDOW:
        rel = offs_n[None, :] - (offs_m[:, None] + off)
        valid = valid & ((window_left < 0) | (rel >= -window_left))
        valid = valid & ((window_right < 0) | (rel <= window_right))
    if HAS_PADDING:
        kp = tl.load(kpm_ptr + offs_n * stride_kpm_n, mask=n_ok, other=0)
        valid = valid & (kp != 0)[None, :]
    if HAS_BITS:
        byte = tl.load(bits_ptr + offs_m[:, None].to(tl.int64) * stride_bits_m + (offs_n[None, :] >> 3),
                       mask=valid & partial, other=0)
        bit = ((byte.to(tl.int32) >> (offs_n[None, :] & 7)) & 1) != 0
        valid = valid & (bit | (partial == 0))
    return tl.where(valid, s, float("-inf")), k


@triton.jit
def _schedule_step(it, PNum, PIdx, FNum, FIdx, row, n_other, SCHED_B: tl.constexpr, SUB: tl.constexpr,
                   TILE: tl.constexpr):
    """Start of the ``it``-th tile of a block schedule row (partial blocks first, then full ones;
    SUB tiles of TILE per block of SCHED_B) and whether it is partial."""
    n_part = tl.load(PNum + row)
    blk = it // SUB
    partial = blk < n_part
    kb = tl.load(PIdx + row * n_other + blk, mask=partial, other=0) + \
        tl.load(FIdx + row * n_other + blk - n_part, mask=blk >= n_part, other=0)
    return kb * SCHED_B + (it % SUB) * TILE, partial


@triton.jit
def _schedule_len(PNum, FNum, row, SUB: tl.constexpr):
    return (tl.load(PNum + row) + tl.load(FNum + row)) * SUB


@triton.jit
def _seq_info(pid_b, CuQ, CuK, Nq_arg, Nk_arg, bottom_right, IS_VARLEN: tl.constexpr):
    """(q_start, k_start, Nq, Nk, off, tensor batch index) of batch / varlen sequence pid_b."""
    if IS_VARLEN:
        q_start = tl.load(CuQ + pid_b).to(tl.int64)
        Nq = (tl.load(CuQ + pid_b + 1) - tl.load(CuQ + pid_b)).to(tl.int32)
        k_start = tl.load(CuK + pid_b).to(tl.int64)
        Nk = (tl.load(CuK + pid_b + 1) - tl.load(CuK + pid_b)).to(tl.int32)
        b_t = pid_b * 0
    else:
        q_start = pid_b * 0
        k_start = pid_b * 0
        Nq = Nq_arg
        Nk = Nk_arg
        b_t = pid_b
    off = tl.where(bottom_right != 0, Nk - Nq, 0)
    return q_start, k_start, Nq, Nk, off, b_t


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["H", "GROUP", "Nq_arg", "Nk_arg", "D", "window_left", "window_right", "bottom_right", "dropout_threshold", "seed"])
def _attention_fwd_kernel(
    Q, K, V, Out, Lse, Bias, Slopes, Kpm, CuQ, CuK, PNum, PIdx, FNum, FIdx, Bits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lb, stride_lh,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_kpb, stride_kpn,
    stride_schb, stride_schh, n_qblocks, n_kblocks, stride_bitsb, stride_bitsh, stride_bitsm,
    H, GROUP, Nq_arg, Nk_arg, D,
    scale, window_left, window_right, bottom_right,
    dropout_scale, dropout_threshold, seed,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SCHED: tl.constexpr, HAS_BITS: tl.constexpr, SCHED_BQ: tl.constexpr, SCHED_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    q_start, k_start, Nq, Nk, off, b_t = _seq_info(pid_b, CuQ, CuK, Nq_arg, Nk_arg, bottom_right, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= Nq:
        return
    kvh = pid_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < D
    m_ok = offs_m < Nq

    q_ptrs = Q + b_t * stride_qb + pid_h * stride_qh + q_start * stride_qm + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b_t * stride_kb + kvh * stride_kh + k_start * stride_kn + offs_d[None, :]
    v_base = V + b_t * stride_vb + kvh * stride_vh + k_start * stride_vn + offs_d[None, :]
    bias_ptr = Bias + b_t * stride_biasb + pid_h * stride_biash
    kpm_ptr = Kpm + b_t * stride_kpb
    slope2 = scale * 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + pid_b * stride_sb + pid_h * stride_sh).to(tl.float32) * _LOG2E_C
    qk_scale = scale * _LOG2E_C
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(seed, pid_b * H + pid_h, offs_m)

    # key range of the band for this query block
    lo = start_m * 0
    hi = Nk + 0
    if HAS_WINDOW:
        last_m = tl.minimum(start_m + BLOCK_M, Nq) - 1
        if window_left >= 0:
            lo = tl.maximum(start_m + off - window_left, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if window_right >= 0:
            hi = tl.minimum(last_m + off + window_right + 1, Nk)

    # the key tiles to visit: the band [lo, hi), or the listed blocks of a schedule
    sched_row = pid_b * stride_schb + pid_h * stride_schh + start_m // SCHED_BQ
    bits_ptr = Bits + pid_b * stride_bitsb + pid_h * stride_bitsh
    if HAS_SCHED:
        n_iter = _schedule_len(PNum, FNum, sched_row, SCHED_BK // BLOCK_N)
    else:
        n_iter = tl.cdiv(hi - lo, BLOCK_N)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_iter):
        if HAS_SCHED:
            start_n, partial = _schedule_step(it, PNum, PIdx, FNum, FIdx, sched_row, n_kblocks, SCHED_BK,
                                              SCHED_BK // BLOCK_N, BLOCK_N)
        else:
            start_n = lo + it * BLOCK_N
            partial = it < 0
        offs_n = start_n + offs_n0
        s, k = _scores(q, k_base + offs_n[:, None].to(tl.int64) * stride_kn, offs_m, offs_n, d_ok, Nq, Nk, off,
                       qk_scale, bias_ptr, stride_biasm, stride_biasn, slope2, kpm_ptr, stride_kpn,
                       window_left, window_right, bits_ptr, stride_bitsm, partial,
                       HAS_BIAS, HAS_ALIBI, HAS_PADDING, HAS_WINDOW, HAS_BITS)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, offs_n, dropout_threshold)
            p = tl.where(keep, p * dropout_scale, 0.0)
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn, mask=(offs_n < Nk)[:, None] & d_ok[None, :], other=0.0)
        acc = _dot(p.to(v.dtype), v, acc)
        m_i = m_new

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) / _LOG2E_C)
    o_ptrs = Out + b_t * stride_ob + pid_h * stride_oh + q_start * stride_om + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :]
    tl.store(o_ptrs, _to_dtype(acc, Out.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    tl.store(Lse + b_t * stride_lb + pid_h * stride_lh + q_start + offs_m, lse, mask=m_ok)


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    Out, DO, Delta,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    Nq, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta[b, h, i] = sum_d dout[b, h, i, d] * out[b, h, i, d] (rows of the (B, H, N) view)."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m < Nq)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + pid_b * stride_ob + pid_h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_d[None, :],
                mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + pid_b * stride_dob + pid_h * stride_doh + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :],
                 mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta + pid_b * stride_lb + pid_h * stride_lh + offs_m, tl.sum(o * do, 1), mask=offs_m < Nq)


@triton.jit(do_not_specialize=["H", "GROUP", "Nq_arg", "Nk_arg", "D", "window_left", "window_right", "bottom_right", "dropout_threshold", "seed"])
def _attention_bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Bias, Slopes, Kpm, CuQ, CuK, PNum, PIdx, FNum, FIdx, Bits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_kpb, stride_kpn,
    stride_schb, stride_schh, n_qblocks, n_kblocks, stride_bitsb, stride_bitsh, stride_bitsm,
    H, GROUP, Nq_arg, Nk_arg, D,
    scale, window_left, window_right, bottom_right,
    dropout_scale, dropout_threshold, seed,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SCHED: tl.constexpr, HAS_BITS: tl.constexpr, SCHED_BQ: tl.constexpr, SCHED_BK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dk, dv of one key block of one kv head; loops over the GQA group's query heads and the
    query blocks of the band (deterministic, no atomics)."""
    pid_n = tl.program_id(0)
    pid_kvh = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    q_start, k_start, Nq, Nk, off, b_t = _seq_info(pid_b, CuQ, CuK, Nq_arg, Nk_arg, bottom_right, IS_VARLEN)
    start_n = pid_n * BLOCK_N
    if start_n >= Nk:
        return
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < D
    n_ok = offs_n < Nk
    nd_mask = n_ok[:, None] & d_ok[None, :]
    k_ptrs = K + b_t * stride_kb + pid_kvh * stride_kh + k_start * stride_kn + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :]
    v = tl.load(V + b_t * stride_vb + pid_kvh * stride_vh + k_start * stride_vn + offs_n[:, None].to(tl.int64) * stride_vn + offs_d[None, :],
                mask=nd_mask, other=0.0)
    kpm_ptr = Kpm + b_t * stride_kpb
    qk_scale = scale * _LOG2E_C

    # query range of the band for this key block
    lo = start_n * 0
    hi = Nq + 0
    if HAS_WINDOW:
        last_n = tl.minimum(start_n + BLOCK_N, Nk) - 1
        if window_right >= 0:
            lo = tl.maximum(start_n - off - window_right, 0)
            lo = (lo // BLOCK_M) * BLOCK_M
        if window_left >= 0:
            hi = tl.minimum(last_n - off + window_left + 1, Nq)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, GROUP):
        h = pid_kvh * GROUP + g
        q_base = Q + b_t * stride_qb + h * stride_qh + q_start * stride_qm + offs_d[None, :]
        do_base = DO + b_t * stride_dob + h * stride_doh + q_start * stride_dom + offs_d[None, :]
        l_base = Lse + b_t * stride_lb + h * stride_lh + q_start
        dl_base = Delta + b_t * stride_lb + h * stride_lh + q_start
        bias_ptr = Bias + b_t * stride_biasb + h * stride_biash
        slope2 = scale * 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Slopes + pid_b * stride_sb + h * stride_sh).to(tl.float32) * _LOG2E_C
        # the query tiles to visit: the band [lo, hi), or the listed blocks of a schedule
        sched_row = pid_b * stride_schb + h * stride_schh + start_n // SCHED_BK
        bits_ptr = Bits + pid_b * stride_bitsb + h * stride_bitsh
        if HAS_SCHED:
            n_iter = _schedule_len(PNum, FNum, sched_row, SCHED_BQ // BLOCK_M)
        else:
            n_iter = tl.cdiv(hi - lo, BLOCK_M)
        for it in range(0, n_iter):
            if HAS_SCHED:
                start_m, partial = _schedule_step(it, PNum, PIdx, FNum, FIdx, sched_row, n_qblocks, SCHED_BQ,
                                                  SCHED_BQ // BLOCK_M, BLOCK_M)
            else:
                start_m = lo + it * BLOCK_M
                partial = it < 0
            offs_m = start_m + offs_m0
            m_ok = offs_m < Nq
            md_mask = m_ok[:, None] & d_ok[None, :]
            q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm, mask=md_mask, other=0.0)
            s, k = _scores(q, k_ptrs, offs_m, offs_n, d_ok, Nq, Nk, off,
                           qk_scale, bias_ptr, stride_biasm, stride_biasn, slope2, kpm_ptr, stride_kpn,
                           window_left, window_right, bits_ptr, stride_bitsm, partial,
                           HAS_BIAS, HAS_ALIBI, HAS_PADDING, HAS_WINDOW, HAS_BITS)
            lse = tl.load(l_base + offs_m, mask=m_ok, other=0.0)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C)
            p = tl.math.exp2(s - lse2[:, None])
            do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom, mask=md_mask, other=0.0)
            delta = tl.load(dl_base + offs_m, mask=m_ok, other=0.0)
            dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
            if HAS_DROPOUT:
                row_hash = _dropout_row_hash(seed, pid_b * H + h, offs_m)
                keep = _dropout_keep(row_hash, offs_n, dropout_threshold)
                pd = tl.where(keep, p * dropout_scale, 0.0)
                dp = tl.where(keep, dp * dropout_scale, 0.0)
            else:
                pd = p
            dv = _dot(tl.trans(pd.to(do.dtype)), do, dv)
            ds = p * (dp - delta[:, None])
            dk = _dot(tl.trans(ds.to(q.dtype)), q, dk)
    dk = dk * scale
    tl.store(DK + b_t * stride_dkb + pid_kvh * stride_dkh + k_start * stride_dkn + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
             _to_dtype(dk, DK.dtype.element_ty), mask=nd_mask)
    tl.store(DV + b_t * stride_dvb + pid_kvh * stride_dvh + k_start * stride_dvn + offs_n[:, None].to(tl.int64) * stride_dvn + offs_d[None, :],
             _to_dtype(dv, DV.dtype.element_ty), mask=nd_mask)


@triton.jit(do_not_specialize=["H", "GROUP", "Nq_arg", "Nk_arg", "D", "window_left", "window_right", "bottom_right", "dropout_threshold", "seed"])
def _attention_bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, DBias, Bias, Slopes, Kpm, CuQ, CuK, PNum, PIdx, FNum, FIdx, Bits,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_lb, stride_lh,
    stride_dqb, stride_dqh, stride_dqm,
    stride_dbb, stride_dbh, stride_dbm,
    stride_biasb, stride_biash, stride_biasm, stride_biasn,
    stride_sb, stride_sh,
    stride_kpb, stride_kpn,
    stride_schb, stride_schh, n_qblocks, n_kblocks, stride_bitsb, stride_bitsh, stride_bitsm,
    H, GROUP, Nq_arg, Nk_arg, D,
    scale, window_left, window_right, bottom_right,
    dropout_scale, dropout_threshold, seed,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_PADDING: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr,
    HAS_SCHED: tl.constexpr, HAS_BITS: tl.constexpr, SCHED_BQ: tl.constexpr, SCHED_BK: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """dq (and dbias = dS when requested) of one query block; loops over the key blocks of the band."""
    pid_m = tl.program_id(0)
    pid_h = tl.program_id(1).to(tl.int64)
    pid_b = tl.program_id(2).to(tl.int64)
    q_start, k_start, Nq, Nk, off, b_t = _seq_info(pid_b, CuQ, CuK, Nq_arg, Nk_arg, bottom_right, IS_VARLEN)
    start_m = pid_m * BLOCK_M
    if start_m >= Nq:
        return
    kvh = pid_h // GROUP
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    if EVEN_D:
        d_ok = offs_d < BLOCK_D
    else:
        d_ok = offs_d < D
    m_ok = offs_m < Nq
    md_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b_t * stride_qb + pid_h * stride_qh + q_start * stride_qm + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=md_mask, other=0.0)
    do = tl.load(DO + b_t * stride_dob + pid_h * stride_doh + q_start * stride_dom + offs_m[:, None].to(tl.int64) * stride_dom + offs_d[None, :],
                 mask=md_mask, other=0.0)
    lse = tl.load(Lse + b_t * stride_lb + pid_h * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * _LOG2E_C)
    delta = tl.load(Delta + b_t * stride_lb + pid_h * stride_lh + q_start + offs_m, mask=m_ok, other=0.0)
    k_base = K + b_t * stride_kb + kvh * stride_kh + k_start * stride_kn + offs_d[None, :]
    v_base = V + b_t * stride_vb + kvh * stride_vh + k_start * stride_vn + offs_d[None, :]
    bias_ptr = Bias + b_t * stride_biasb + pid_h * stride_biash
    dbias_ptr = DBias + b_t * stride_dbb + pid_h * stride_dbh
    kpm_ptr = Kpm + b_t * stride_kpb
    slope2 = scale * 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Slopes + pid_b * stride_sb + pid_h * stride_sh).to(tl.float32) * _LOG2E_C
    qk_scale = scale * _LOG2E_C
    if HAS_DROPOUT:
        row_hash = _dropout_row_hash(seed, pid_b * H + pid_h, offs_m)

    lo = start_m * 0
    hi = Nk + 0
    if HAS_WINDOW:
        last_m = tl.minimum(start_m + BLOCK_M, Nq) - 1
        if window_left >= 0:
            lo = tl.maximum(start_m + off - window_left, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        if window_right >= 0:
            hi = tl.minimum(last_m + off + window_right + 1, Nk)

    sched_row = pid_b * stride_schb + pid_h * stride_schh + start_m // SCHED_BQ
    bits_ptr = Bits + pid_b * stride_bitsb + pid_h * stride_bitsh
    if HAS_SCHED:
        n_iter = _schedule_len(PNum, FNum, sched_row, SCHED_BK // BLOCK_N)
    else:
        n_iter = tl.cdiv(hi - lo, BLOCK_N)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for it in range(0, n_iter):
        if HAS_SCHED:
            start_n, partial = _schedule_step(it, PNum, PIdx, FNum, FIdx, sched_row, n_kblocks, SCHED_BK,
                                              SCHED_BK // BLOCK_N, BLOCK_N)
        else:
            start_n = lo + it * BLOCK_N
            partial = it < 0
        offs_n = start_n + offs_n0
        s, k = _scores(q, k_base + offs_n[:, None].to(tl.int64) * stride_kn, offs_m, offs_n, d_ok, Nq, Nk, off,
                       qk_scale, bias_ptr, stride_biasm, stride_biasn, slope2, kpm_ptr, stride_kpn,
                       window_left, window_right, bits_ptr, stride_bitsm, partial,
                       HAS_BIAS, HAS_ALIBI, HAS_PADDING, HAS_WINDOW, HAS_BITS)
        p = tl.math.exp2(s - lse2[:, None])
        v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn, mask=(offs_n < Nk)[:, None] & d_ok[None, :], other=0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32))
        if HAS_DROPOUT:
            keep = _dropout_keep(row_hash, offs_n, dropout_threshold)
            dp = tl.where(keep, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_DBIAS:
            tl.store(dbias_ptr + offs_m[:, None].to(tl.int64) * stride_dbm + offs_n[None, :], ds,
                     mask=m_ok[:, None] & (offs_n < Nk)[None, :])
        dq = _dot(ds.to(k.dtype), k, dq)
    dq = dq * scale
    tl.store(DQ + b_t * stride_dqb + pid_h * stride_dqh + q_start * stride_dqm + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :],
             _to_dtype(dq, DQ.dtype.element_ty), mask=md_mask)


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))


def _config(kernel: str, block_d: int, dtype: torch.dtype, device: torch.device, scheduled: bool = False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in {"fwd", "dkdv", "dq"}: per-arch
    tables in attention_configs.py (one fixed config under the interpreter)."""
    BM, BN, nw, ns = _launch_config(kernel, block_d, dtype, device)
    if scheduled and block_d >= 128 and not INTERPRET:
        # the schedule walk and the mask-bit loads cost registers: narrower key tiles, no pipelining
        BN, ns = 16, 1
        BM = 16 if kernel == "dkdv" else min(BM, 32)
    return BM, BN, nw, ns


# --------------------------------------------------------------------------------------------
# Python API
# --------------------------------------------------------------------------------------------
def _pre_block_m(block_d: int) -> int:
    """Rows per program of the delta pre-pass on GPU (keeps ~4K elements per program: no spills)."""
    return max(16, 4096 // block_d)


def _common_args(q, bias, alibi_slopes, key_padding_mask, is_varlen):
    dummy = q
    if bias is not None:
        bias_t, bias_s = bias, tuple(bias.stride())
    else:
        bias_t, bias_s = dummy, (0, 0, 0, 0)
    if alibi_slopes is not None:
        sl = alibi_slopes
        s_b, s_h = sl.stride()
        if is_varlen and sl.shape[0] == 1:
            s_b = 0
        slopes_t, slopes_s = sl, (s_b, s_h)
    else:
        slopes_t, slopes_s = dummy, (0, 0)
    if key_padding_mask is not None:
        kpm = key_padding_mask
        if kpm.dtype == torch.bool:
            kpm = kpm.view(torch.uint8)
        kpm_t, kpm_s = kpm, tuple(kpm.stride())
    else:
        kpm_t, kpm_s = dummy, (0, 0)
    return bias_t, bias_s, slopes_t, slopes_s, kpm_t, kpm_s


class _Schedule:
    """Kernel arguments of a block schedule (pyattn/block_mask.py): one direction's lists
    (kv lists for the forward and dq kernels, q lists for the dk/dv kernel) and the mask bits."""

    def __init__(self, lists, bits, block_q, block_k):
        self.lists, self.bits, self.block_q, self.block_k = lists, bits, block_q, block_k

    def args(self, q, direction):
        """(pointers, strides, constexprs) for ``direction`` in {"kv", "q"}; dense when self is None."""
        lists = self.lists[direction]
        num = lists[2]
        Bm, Hm, nb = num.shape
        strides = (Hm * nb if Bm > 1 else 0, nb if Hm > 1 else 0)
        ptrs = lists
        if self.bits is not None:
            bits = self.bits
            bstr = (bits.stride(0) if bits.shape[0] > 1 else 0, bits.stride(1) if bits.shape[1] > 1 else 0,
                    bits.stride(2))
        else:
            bits, bstr = q, (0, 0, 0)
        return ptrs, bits, strides, bstr


def _schedule_args(schedule, q, direction, Nq, Nk):
    if schedule is None:
        return (q, q, q, q, q), (0, 0, 1, 1, 0, 0, 0), dict(HAS_SCHED=False, HAS_BITS=False, SCHED_BQ=16, SCHED_BK=16)
    ptrs, bits, strides, bstr = schedule.args(q, direction)
    nqb, nkb = triton.cdiv(Nq, schedule.block_q), triton.cdiv(Nk, schedule.block_k)
    # kernel order: PNum, PIdx, FNum, FIdx, Bits (lists are (partial num, partial idx, full num, full idx))
    return ((ptrs[0], ptrs[1], ptrs[2], ptrs[3], bits), (*strides, nqb, nkb, *bstr),
            dict(HAS_SCHED=True, HAS_BITS=schedule.bits is not None, SCHED_BQ=schedule.block_q,
                 SCHED_BK=schedule.block_k))


def _fit(block, schedule, which):
    """Tile size lined up with the schedule: a divisor of its block (all are powers of two)."""
    if schedule is None:
        return block
    sched_block = schedule.block_q if which == "q" else schedule.block_k
    if INTERPRET:  # fewer, larger tiles (the interpreter's cost is per tile); 128-blocks still split in two
        return min(64, sched_block)
    return min(block, sched_block)


def attention_forward(q, k, v, bias, alibi_slopes, key_padding_mask, cu_seqlens_q, cu_seqlens_k,
                      max_seqlen_q, max_seqlen_k, scale, window_left, window_right, bottom_right,
                      dropout_p, dropout_threshold, seed, schedule=None):
    """Returns (out (B, H, Nq, D) in q.dtype, lse (B, H, Nq) fp32). See the attention contract.
    ``schedule``: a :class:`_Schedule` to visit its listed key blocks instead of the band."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    is_varlen = cu_seqlens_q is not None
    out = torch.empty((B, H, Nq, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or (not is_varlen and Nq == 0):
        lse.fill_(float("-inf"))
        out.zero_()
        return out, lse
    block_d = _block_d(D)
    BM, BN, nw, ns = _config("fwd", block_d, q.dtype, q.device, schedule is not None)
    BM, BN = _fit(BM, schedule, "q"), _fit(BN, schedule, "k")
    sch_p, sch_s, sch_f = _schedule_args(schedule, q, "kv", Nq, Nk)
    bias_t, bias_s, slopes_t, slopes_s, kpm_t, kpm_s = _common_args(q, bias, alibi_slopes, key_padding_mask, is_varlen)
    if is_varlen:
        n_seq = cu_seqlens_q.numel() - 1
        grid = (triton.cdiv(max(int(max_seqlen_q), 1), BM), H, n_seq)
        cuq, cuk = cu_seqlens_q, cu_seqlens_k
        if lse.numel():
            lse.fill_(float("-inf"))  # rows not owned by any sequence
            out.zero_()
    else:
        grid = (triton.cdiv(Nq, BM), H, B)
        cuq = cuk = q
    has_window = window_left >= 0 or window_right >= 0
    has_dropout = dropout_p > 0.0
    dscale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    _attention_fwd_kernel[grid](
        q, k, v, out, lse, bias_t, slopes_t, kpm_t, cuq, cuk, *sch_p,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        lse.stride(0), lse.stride(1),
        *bias_s, *slopes_s, *kpm_s, *sch_s,
        H, H // Hkv, Nq, Nk, D,
        float(scale), int(window_left), int(window_right), int(bool(bottom_right)),
        float(dscale), int(dropout_threshold), int(seed),
        HAS_BIAS=bias is not None, HAS_ALIBI=alibi_slopes is not None,
        HAS_PADDING=key_padding_mask is not None, HAS_WINDOW=has_window,
        HAS_DROPOUT=has_dropout, IS_VARLEN=is_varlen, **sch_f,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, EVEN_D=block_d == D, num_warps=nw, num_stages=ns,
    )
    return out, lse


def attention_backward(dout, q, k, v, out, lse, bias, alibi_slopes, key_padding_mask, cu_seqlens_q,
                       cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, window_left, window_right,
                       bottom_right, dropout_p, dropout_threshold, seed, bias_requires_grad, schedule=None):
    """Returns (dq, dk, dv, dbias or None); dk/dv summed over each kv head's query heads (GQA).
    ``schedule``: a :class:`_Schedule` with both directions' lists."""
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    is_varlen = cu_seqlens_q is not None
    dq = torch.empty_like(q, memory_format=torch.contiguous_format)
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    dbias = None
    if bias_requires_grad:
        dbias = torch.zeros((B, H, Nq, Nk), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(); dk.zero_(); dv.zero_()
        return dq, dk, dv, dbias
    block_d = _block_d(D)
    delta = torch.empty((B, H, Nq), dtype=torch.float32, device=q.device)
    PM = 32 if INTERPRET else _pre_block_m(block_d)
    _attention_bwd_preprocess_kernel[(triton.cdiv(Nq, PM), H, B)](
        out, dout, delta,
        out.stride(0), out.stride(1), out.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        delta.stride(0), delta.stride(1),
        Nq, D, BLOCK_M=PM, BLOCK_D=block_d,
    )
    lse = lse.contiguous()
    BMk, BNk, nwk, nsk = _config("dkdv", block_d, q.dtype, q.device, schedule is not None)
    BM, BN, nw, ns = _config("dq", block_d, q.dtype, q.device, schedule is not None)
    BMk, BNk = _fit(BMk, schedule, "q"), _fit(BNk, schedule, "k")
    BM, BN = _fit(BM, schedule, "q"), _fit(BN, schedule, "k")
    sk_p, sk_s, sk_f = _schedule_args(schedule, q, "q", Nq, Nk)
    sq_p, sq_s, sq_f = _schedule_args(schedule, q, "kv", Nq, Nk)
    bias_t, bias_s, slopes_t, slopes_s, kpm_t, kpm_s = _common_args(q, bias, alibi_slopes, key_padding_mask, is_varlen)
    if is_varlen:
        n_seq = cu_seqlens_q.numel() - 1
        grid_q = (triton.cdiv(max(int(max_seqlen_q), 1), BM), H, n_seq)
        grid_k = (triton.cdiv(max(int(max_seqlen_k), 1), BNk), Hkv, n_seq)
        cuq, cuk = cu_seqlens_q, cu_seqlens_k
        dq.zero_(); dk.zero_(); dv.zero_()  # rows outside every sequence
    else:
        grid_q = (triton.cdiv(Nq, BM), H, B)
        grid_k = (triton.cdiv(Nk, BNk), Hkv, B)
        cuq = cuk = q
    has_window = window_left >= 0 or window_right >= 0
    has_dropout = dropout_p > 0.0
    dscale = 1.0 / (1.0 - dropout_p) if dropout_p < 1.0 else 0.0
    common_tail = (
        H, H // Hkv, Nq, Nk, D,
        float(scale), int(window_left), int(window_right), int(bool(bottom_right)),
        float(dscale), int(dropout_threshold), int(seed),
    )
    flags = dict(HAS_BIAS=bias is not None, HAS_ALIBI=alibi_slopes is not None,
                 HAS_PADDING=key_padding_mask is not None, HAS_WINDOW=has_window,
                 HAS_DROPOUT=has_dropout, IS_VARLEN=is_varlen)
    _attention_bwd_dkdv_kernel[grid_k](
        q, k, v, dout, lse, delta, dk, dv, bias_t, slopes_t, kpm_t, cuq, cuk, *sk_p,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2),
        dv.stride(0), dv.stride(1), dv.stride(2),
        *bias_s, *slopes_s, *kpm_s, *sk_s,
        *common_tail, **flags, **sk_f,
        BLOCK_M=BMk, BLOCK_N=BNk, BLOCK_D=block_d, EVEN_D=block_d == D, num_warps=nwk, num_stages=nsk,
    )
    dbias_t = dbias if dbias is not None else q
    dbs = (dbias.stride(0), dbias.stride(1), dbias.stride(2)) if dbias is not None else (0, 0, 0)
    _attention_bwd_dq_kernel[grid_q](
        q, k, v, dout, lse, delta, dq, dbias_t, bias_t, slopes_t, kpm_t, cuq, cuk, *sq_p,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        dout.stride(0), dout.stride(1), dout.stride(2),
        lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2),
        *dbs,
        *bias_s, *slopes_s, *kpm_s, *sq_s,
        *common_tail, **flags, **sq_f, HAS_DBIAS=dbias is not None,
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=block_d, EVEN_D=block_d == D, num_warps=nw, num_stages=ns,
    )
    return dq, dk, dv, dbias


def block_sparse_forward(q, k, v, kv_lists, mask_bits, key_padding_mask, block_q, block_k, scale, window_left,
                         window_right, bottom_right, dropout_p, dropout_threshold, seed):
    """Forward over a block schedule. kv_lists = (kv_num_blocks, kv_indices, full_kv_num_blocks,
    full_kv_indices) (pyattn/block_mask.py); the kernel walks only the listed key blocks."""
    sched = _Schedule({"kv": kv_lists}, mask_bits, block_q, block_k)
    return attention_forward(q, k, v, None, None, key_padding_mask, None, None, q.shape[2], k.shape[2], scale,
                             window_left, window_right, bottom_right, dropout_p, dropout_threshold, seed,
                             schedule=sched)


def block_sparse_backward(dout, q, k, v, out, lse, kv_lists, q_lists, mask_bits, key_padding_mask, block_q, block_k,
                          scale, window_left, window_right, bottom_right, dropout_p, dropout_threshold, seed):
    """Backward over a block schedule: dq walks the kv lists, dk/dv the transposed q lists."""
    sched = _Schedule({"kv": kv_lists, "q": q_lists}, mask_bits, block_q, block_k)
    dq, dk, dv, _ = attention_backward(dout, q, k, v, out, lse, None, None, key_padding_mask, None, None, q.shape[2],
                                       k.shape[2], scale, window_left, window_right, bottom_right, dropout_p,
                                       dropout_threshold, seed, False, schedule=sched)
    return dq, dk, dv
