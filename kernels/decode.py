"""KV-cache decoding attention in Triton (split-K flash-decoding; semantics: pyattn/reference/decode.py).

Grid (B * Hkv, num_splits): each program takes one kv head of one sequence and one slice of its
keys, and computes all R = (H / Hkv) * Nq query rows that share the kv head as one (BLOCK_R, D)
tile, so each K/V tile is loaded once for the whole GQA group. Contiguous caches
(B, Hkv, max_len, D) and paged ones (num_pages, Hkv, page_size, D) share the kernel: with
``IS_PAGED`` each key's page comes from the block table. With several splits, every program
writes its normalised partial output and log-sum-exp, and ``_decode_combine_kernel`` merges them.

Plain PyTorch equivalent (one sequence b with L keys, Nq = 1)::

    k = k_cache[b, :, :L].repeat_interleave(H // Hkv, 0)
    out[b] = torch.softmax(q[b] @ k.transpose(-1, -2) * scale, -1) @ v_cache[b, :, :L].repeat_interleave(H // Hkv, 0)

This module imports only torch and triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ._common import to_dtype as _to_dtype

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_INTERPRET_C: tl.constexpr = tl.constexpr(INTERPRET)
LOG2E = 1.4426950408889634
_LN2_C: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b):
    """a @ b in fp32. Interpreter: upcast (its bf16/fp16 dot is wrong); fp32 uses IEEE precision."""
    if _INTERPRET_C:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, input_precision="ieee")
        else:
            return tl.dot(a, b)


@triton.jit
def _decode_split_kernel(Q, K, V, SeqLens, BlockTable, Alibi, Out, Lse, PartOut, PartLse,
                         stride_qb, stride_qh, stride_qn,
                         stride_k0, stride_k1, stride_k2, stride_v0, stride_v1, stride_v2,
                         stride_bt0, stride_bt1, page_size,
                         H, Hkv, Nq, D, num_splits, n_appended, qk_scale, window_left, window_right,
                         G: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         IS_PAGED: tl.constexpr, HAS_ALIBI: tl.constexpr, ONE_SPLIT: tl.constexpr):
    pid_bh = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    L = tl.load(SeqLens + b).to(tl.int32) + n_appended
    # keys some row can see: [lo, L)
    lo = tl.where(window_left >= 0, tl.maximum(L - Nq - window_left, 0), 0)
    chunk = tl.cdiv(tl.cdiv(tl.maximum(L - lo, 0), num_splits), BLOCK_N) * BLOCK_N
    s0 = tl.minimum(lo + split * chunk, L)
    s1 = tl.minimum(s0 + chunk, L)

    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    R = G * Nq
    r_ok = offs_r < R
    d_ok = offs_d < D
    head = hk * G + offs_r // Nq
    qi = offs_r % Nq
    pos = L - Nq + qi  # position of each query row
    q_ptrs = Q + b * stride_qb + head[:, None].to(tl.int64) * stride_qh + qi[:, None] * stride_qn + offs_d[None, :]
    q = tl.load(q_ptrs, mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * H + head, mask=r_ok, other=0.0) * 1.4426950408889634

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for start in range(s0, s1, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < s1
        if IS_PAGED:
            page = tl.load(BlockTable + b * stride_bt0 + (offs_n // page_size) * stride_bt1, mask=n_ok, other=0)
            page = page.to(tl.int64)
            slot = offs_n % page_size
            k_rows = page * stride_k0 + hk * stride_k1 + slot * stride_k2
            v_rows = page * stride_v0 + hk * stride_v1 + slot * stride_v2
        else:
            k_rows = b * stride_k0 + hk * stride_k1 + offs_n.to(tl.int64) * stride_k2
            v_rows = b * stride_v0 + hk * stride_v1 + offs_n.to(tl.int64) * stride_v2
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(K + k_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        s = _dot(q, tl.trans(k)) * qk_scale  # log2 units
        if HAS_ALIBI:
            s -= slope2[:, None] * tl.abs(pos[:, None] - offs_n[None, :]).to(tl.float32)
        visible = n_ok[None, :] & r_ok[:, None]
        visible = visible & ((window_left < 0) | (offs_n[None, :] >= pos[:, None] - window_left))
        visible = visible & ((window_right < 0) | (offs_n[None, :] <= pos[:, None] + window_right))
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + v_rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * _LN2_C, float("-inf"))
    if ONE_SPLIT:
        row = (b * H + head) * Nq + qi
        o_ptrs = Out + row[:, None] * D + offs_d[None, :]
        tl.store(o_ptrs, _to_dtype(out, Out.dtype.element_ty), mask=r_ok[:, None] & d_ok[None, :])
        tl.store(Lse + row, lse, mask=r_ok)
    else:
        item = pid_bh * num_splits + split
        p_ptrs = PartOut + (item * R + offs_r[:, None]) * D + offs_d[None, :]
        tl.store(p_ptrs, out, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(PartLse + item * R + offs_r, lse, mask=r_ok)


@triton.jit
def _decode_combine_kernel(PartOut, PartLse, Out, Lse, H, Hkv, Nq, D, num_splits,
                           G: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per (b, kv head, row r): out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max)."""
    pid = tl.program_id(0).to(tl.int64)
    R = G * Nq
    r = pid % R
    bh = pid // R
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    d_ok = offs_d < D
    lse_s = tl.load(PartLse + (bh * num_splits + offs_s) * R + r, mask=s_ok, other=float("-inf"))
    M = tl.max(lse_s, 0)
    M_safe = tl.where(M == float("-inf"), 0.0, M)
    w = tl.exp(lse_s - M_safe)
    o = tl.load(PartOut + ((bh * num_splits + offs_s[:, None]) * R + r) * D + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    den = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(den > 0, den, 1.0)
    b = bh // Hkv
    hk = bh % Hkv
    head = hk * G + r // Nq
    row = (b * H + head) * Nq + r % Nq
    tl.store(Out + row * D + offs_d, _to_dtype(out, Out.dtype.element_ty), mask=d_ok)
    tl.store(Lse + row, tl.where(den > 0, M + tl.log(tl.where(den > 0, den, 1.0)), float("-inf")))


def decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi, scale, window_left, window_right,
                   n_appended, num_splits):
    """q (B, H, Nq, D) (unit last stride), caches with unit last stride -> (out (B, H, Nq, D), lse fp32 (B, H, Nq))."""
    B, H, Nq, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    R = G * Nq
    out = torch.empty(B, H, Nq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Nq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out.zero_(), lse.fill_(float("-inf"))
    BLOCK_R = max(16, triton.next_power_of_2(R))
    BLOCK_D = max(16, triton.next_power_of_2(D))
    BLOCK_N = 64 if BLOCK_D <= 128 and BLOCK_R <= 32 else 32
    paged = block_table is not None
    bt = block_table if paged else cache_seqlens
    one = num_splits == 1
    if one:
        part_out = part_lse = out  # unused
    else:
        part_out = torch.empty(B * Hkv * num_splits * R * D, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(B * Hkv * num_splits * R, dtype=torch.float32, device=q.device)
    alibi_t = alibi if alibi is not None else lse
    _decode_split_kernel[(B * Hkv, num_splits)](
        q, k_cache, v_cache, cache_seqlens, bt, alibi_t, out, lse, part_out, part_lse,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bt.stride(0), bt.stride(1) if paged else 0, k_cache.shape[2],
        H, Hkv, Nq, D, num_splits, n_appended, scale * LOG2E, window_left, window_right,
        G=G, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, IS_PAGED=paged, HAS_ALIBI=alibi is not None,
        ONE_SPLIT=one, num_warps=4)
    if not one:
        _decode_combine_kernel[(B * Hkv * R,)](
            part_out, part_lse, out, lse, H, Hkv, Nq, D, num_splits,
            G=G, BLOCK_S=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=BLOCK_D, num_warps=4)
    return out, lse
