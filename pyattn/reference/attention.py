"""Reference attention in plain PyTorch: materialises the (Nq, Nk) scores and the mask.

This is the oracle of the attention engine; its semantics are those of every backend:

    s_ij = scale * <q_i, k_j> + bias_ij - slope * |i + off - j|      (off = Nk - Nq if bottom_right else 0)
    key j visible to query i iff  i + off - window_left <= j <= i + off + window_right  and  key_padding_mask[j]
    P = softmax over visible keys (rows with no visible key: P = 0, lse = -inf)
    out = (P * keep / (1 - p)) @ v     with keep from :func:`dropout_keep_mask`
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def dropout_threshold(p: float) -> int:
    """Keep an element when (hash >> 8) >= threshold: P(keep) = 1 - threshold / 2**24."""
    return int(p * 16777216.0)


def dropout_keep_mask(seed: int, batch_head: Tensor, Nq: int, Nk: int, p: float, device=None) -> Tensor:
    """Counter-based dropout mask shared bit-for-bit by every backend.

    batch_head: int64 tensor of (b * H + h) values, shape (...,). Returns bool (..., Nq, Nk), True = keep.
    """
    device = device if device is not None else batch_head.device
    bh = batch_head.to(torch.int64).reshape(*batch_head.shape, 1, 1)
    a = _hash32((seed + bh * 0x9E3779B9) & _M32)
    i = torch.arange(Nq, device=device, dtype=torch.int64).view(Nq, 1)
    j = torch.arange(Nk, device=device, dtype=torch.int64).view(1, Nk)
    r = _hash32(_hash32(a ^ i) ^ j)
    return (r >> 8) >= dropout_threshold(p)


def visibility_mask(Nq: int, Nk: int, window_left: int, window_right: int, bottom_right: bool, device) -> Tensor:
    """Bool (Nq, Nk): the causal/window band. -1 means unbounded on that side."""
    off = (Nk - Nq) if bottom_right else 0
    i = torch.arange(Nq, device=device).view(Nq, 1) + off
    j = torch.arange(Nk, device=device).view(1, Nk)
    keep = torch.ones(Nq, Nk, dtype=torch.bool, device=device)
    if window_left >= 0:
        keep &= j >= i - window_left
    if window_right >= 0:
        keep &= j <= i + window_right
    return keep


def alibi_bias(slopes: Tensor, Nq: int, Nk: int, bottom_right: bool) -> Tensor:
    """(B, H, Nq, Nk) fp32: -slope * |i + off - j|; slopes (B, H)."""
    off = (Nk - Nq) if bottom_right else 0
    i = torch.arange(Nq, device=slopes.device).view(Nq, 1) + off
    j = torch.arange(Nk, device=slopes.device).view(1, Nk)
    dist = (i - j).abs().to(slopes.dtype)
    return -slopes[..., None, None] * dist


def _masked_scores(q, k, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right, bottom_right):
    """scale * q k^T + bias + ALiBi with invisible keys at -inf; q (B, H, Nq, D), k (B, H, Nk, D)."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if bias is not None:
        s = s + bias.to(s.dtype)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(torch.float32), Nq, Nk, bottom_right).to(s.dtype)
    visible = visibility_mask(Nq, Nk, window_left, window_right, bottom_right, q.device).expand(B, H, Nq, Nk)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.view(B, 1, 1, Nk)
    return s.masked_fill(~visible, float("-inf"))


def _dense(q, k, v, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right, bottom_right,
           dropout_p, seed, batch_head):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hkv != H:
        k = k.repeat_interleave(H // Hkv, dim=1)
        v = v.repeat_interleave(H // Hkv, dim=1)
    s = _masked_scores(q, k, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right, bottom_right)
    # rows that see no key: P = 0 and lse = -inf, with finite gradients (no softmax of all -inf)
    row_empty = torch.isneginf(s).all(-1, keepdim=True)
    s = s.masked_fill(row_empty, 0.0)
    lse = torch.logsumexp(s.to(torch.float32) if s.dtype != torch.float64 else s, dim=-1)
    lse = lse.masked_fill(row_empty[..., 0], float("-inf"))
    p = torch.softmax(s, dim=-1).masked_fill(row_empty, 0.0)
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, batch_head, Nq, Nk, dropout_p, q.device)
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    out = torch.matmul(p, v)
    return out, lse


def attention_reference(q: Tensor, k: Tensor, v: Tensor, *, bias: Optional[Tensor] = None,
                        alibi_slopes: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                        cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_k: Optional[Tensor] = None,
                        scale: Optional[float] = None, window_left: int = -1, window_right: int = -1,
                        bottom_right: bool = True, dropout_p: float = 0.0, seed: int = 0,
                        compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Materialised attention. q (B, H, Nq, D), k/v (B, Hkv, Nk, D); bias broadcastable to
    (B, H, Nq, Nk); alibi_slopes (B, H) or (H,); key_padding_mask (B, Nk) bool True = keep.
    Varlen: B == 1 and cu_seqlens_q/k (S + 1,) delimit packed sequences along dim 2.
    Computes in ``compute_dtype`` (default: q's dtype) and returns (out in q's dtype, lse fp32 (B, H, Nq)).
    """
    dtype = compute_dtype or q.dtype
    out_dtype = q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H = q.shape[:2]
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(B, H)
    if cu_seqlens_q is None:
        bh = torch.arange(B * H, device=q.device).view(B, H)
        out, lse = _dense(q, k, v, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right,
                          bottom_right, dropout_p, seed, bh)
        return out.to(out_dtype), lse.to(torch.float32)
    outs, lses = [], []
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        qs, ks, vs = q[:, :, cq[s]:cq[s + 1]], k[:, :, ck[s]:ck[s + 1]], v[:, :, ck[s]:ck[s + 1]]
        bh = (s * H + torch.arange(H, device=q.device)).view(1, H)
        slopes = alibi_slopes[s:s + 1] if alibi_slopes is not None and alibi_slopes.shape[0] > 1 else alibi_slopes
        o, l = _dense(qs, ks, vs, None, slopes, None, scale, window_left, window_right, bottom_right,
                      dropout_p, seed, bh)
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2).to(out_dtype), torch.cat(lses, 2).to(torch.float32)


def _dense_backward(dout, q, k, v, out, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right,
                    bottom_right, dropout_p, seed, batch_head, bias_grad):
    B, H, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    group = H // Hkv
    ke = k.repeat_interleave(group, dim=1) if group > 1 else k
    ve = v.repeat_interleave(group, dim=1) if group > 1 else v
    s = _masked_scores(q, ke, bias, alibi_slopes, key_padding_mask, scale, window_left, window_right, bottom_right)
    p = torch.softmax(s, dim=-1)
    p = torch.nan_to_num(p, nan=0.0)  # rows that see no key
    dp = torch.matmul(dout, ve.transpose(-1, -2))
    pd = p
    if dropout_p > 0:
        keep = dropout_keep_mask(seed, batch_head, Nq, Nk, dropout_p, q.device).to(p.dtype) / (1.0 - dropout_p)
        pd = p * keep
        dp = dp * keep
    dv = torch.matmul(pd.transpose(-1, -2), dout)
    delta = (dout * out).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, ke) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q) * scale
    if group > 1:
        dk = dk.view(B, Hkv, group, Nk, D).sum(2)
        dv = dv.view(B, Hkv, group, Nk, D).sum(2)
    return dq, dk, dv, (ds if bias_grad else None)


def attention_backward_reference(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, *,
                                 bias: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                                 key_padding_mask: Optional[Tensor] = None, cu_seqlens_q: Optional[Tensor] = None,
                                 cu_seqlens_k: Optional[Tensor] = None, scale: Optional[float] = None,
                                 window_left: int = -1, window_right: int = -1, bottom_right: bool = True,
                                 dropout_p: float = 0.0, seed: int = 0, bias_grad: bool = False,
                                 compute_dtype: Optional[torch.dtype] = None):
    """Closed-form gradients of :func:`attention_reference` (the FlashAttention backward formulas
    on materialised matrices). Returns (dq, dk, dv, dbias or None) with dbias (B, H, Nq, Nk)."""
    dtype = compute_dtype or q.dtype
    dout, q, k, v, out = (t.to(dtype) for t in (dout, q, k, v, out))
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H = q.shape[:2]
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(B, H)
    if cu_seqlens_q is None:
        bh = torch.arange(B * H, device=q.device).view(B, H)
        return _dense_backward(dout, q, k, v, out, bias, alibi_slopes, key_padding_mask, scale, window_left,
                               window_right, bottom_right, dropout_p, seed, bh, bias_grad)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for s in range(len(cq) - 1):
        sq, sk = slice(cq[s], cq[s + 1]), slice(ck[s], ck[s + 1])
        bh = (s * H + torch.arange(H, device=q.device)).view(1, H)
        slopes = alibi_slopes[s:s + 1] if alibi_slopes is not None and alibi_slopes.shape[0] > 1 else alibi_slopes
        g = _dense_backward(dout[:, :, sq], q[:, :, sq], k[:, :, sk], v[:, :, sk], out[:, :, sq], None, slopes, None,
                            scale, window_left, window_right, bottom_right, dropout_p, seed, bh, False)
        dq[:, :, sq], dk[:, :, sk], dv[:, :, sk] = g[0], g[1], g[2]
    return dq, dk, dv, None


def schedule_visibility(kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor,
                        full_kv_indices: Tensor, mask_bits: Optional[Tensor], block_q: int, block_k: int,
                        Nq: int, Nk: int) -> Tensor:
    """bool (Bm, Hm, Nq, Nk): the elements a block schedule makes visible (pyattn/block_mask.py):
    every element of a full block, and the mask bits inside a partial block."""
    Bm, Hm, nqb = full_kv_num_blocks.shape
    nkb = full_kv_indices.shape[-1]
    dev = full_kv_indices.device

    def table(num, idx):
        valid = torch.arange(idx.shape[-1], device=dev) < num.unsqueeze(-1)
        t = torch.zeros(Bm, Hm, nqb, nkb + 1, dtype=torch.bool, device=dev)
        t.scatter_(-1, torch.where(valid, idx.long(), nkb), True)  # padding entries -> spare column
        return t[..., :nkb].repeat_interleave(block_q, 2).repeat_interleave(block_k, 3)[:, :, :Nq, :Nk]

    vis = table(full_kv_num_blocks, full_kv_indices)
    if mask_bits is not None:
        shifts = torch.arange(8, device=dev, dtype=torch.uint8)
        bits = ((mask_bits.unsqueeze(-1) >> shifts) & 1).flatten(-2)[..., :Nk].bool()  # flatten: also for 0 rows
        vis = vis | (table(kv_num_blocks, kv_indices) & bits)
    return vis


def schedule_bias(q: Tensor, visible: Tensor) -> Tensor:
    """The reference's form of a visibility mask: an additive (B, H, Nq, Nk) bias (0 / -inf)."""
    B, H, Nq, _ = q.shape
    Nk = visible.shape[-1]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    return torch.where(visible, zero, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device)).expand(B, H, Nq, Nk)
