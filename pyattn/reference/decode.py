"""Reference KV-cache decoding attention in plain PyTorch: the oracle of ``pyattn.decode_attention``.

For sequence b with L_b = cache_seqlens[b] (+ Nq when new keys are appended) valid keys, query row
i (0 <= i < Nq) sits at position p_i = L_b - Nq + i (the new tokens are the last ones) and

    s_ij = scale * <q_i, k_j> - slope * |p_i - j|,   j in [0, L_b)
    key j visible iff  p_i - window_left <= j <= p_i + window_right   (-1 = unbounded; causal: right = 0)
    out_i = softmax over visible j (s_ij) @ v,   lse_i = logsumexp over visible j; no visible key: 0 / -inf

Keys live in a contiguous cache (B, Hkv, max_len, D) or a paged one (num_pages, Hkv, page_size, D)
addressed through ``block_table`` (B, max_pages): key j of sequence b is
``cache[block_table[b, j // page_size], :, j % page_size]``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def append_positions(cache_seqlens: Tensor, n_new: int) -> Tensor:
    """(B, n_new) int64 cache positions cache_seqlens[b] + t of the appended tokens."""
    return cache_seqlens.to(torch.int64)[:, None] + torch.arange(n_new, device=cache_seqlens.device)[None, :]


def append_kv(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor,
              block_table: Optional[Tensor]) -> None:
    """Write k_new/v_new (B, Hkv, Nnew, D) into the caches at positions cache_seqlens[b] + t (in place)."""
    B, _, n_new, _ = k_new.shape
    if B == 0 or n_new == 0:
        return
    pos = append_positions(cache_seqlens, n_new)  # (B, Nnew)
    kn, vn = k_new.transpose(1, 2), v_new.transpose(1, 2)  # (B, Nnew, Hkv, D)
    if block_table is None:
        b = torch.arange(B, device=pos.device)[:, None].expand_as(pos)
        k_cache[b, :, pos] = kn.to(k_cache.dtype)  # advanced indices around a slice: (B, Nnew, Hkv, D)
        v_cache[b, :, pos] = vn.to(v_cache.dtype)
    else:
        page_size = k_cache.shape[2]
        page = torch.gather(block_table.to(torch.int64), 1, pos // page_size)
        slot = pos % page_size
        k_cache[page, :, slot] = kn.to(k_cache.dtype)
        v_cache[page, :, slot] = vn.to(v_cache.dtype)


def gather_cache(cache: Tensor, block_table: Optional[Tensor], b: int, length: int) -> Tensor:
    """Keys 0..length-1 of sequence b as (Hkv, length, D)."""
    if block_table is None:
        return cache[b, :, :length]
    page_size = cache.shape[2]
    n_pages = (length + page_size - 1) // page_size
    pages = cache[block_table[b, :n_pages].to(torch.int64)]  # (n_pages, Hkv, P, D)
    return pages.transpose(0, 1).reshape(cache.shape[1], n_pages * page_size, cache.shape[3])[:, :length]


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                               block_table: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                               scale: Optional[float] = None, window_left: int = -1, window_right: int = -1,
                               n_appended: int = 0, compute_dtype: Optional[torch.dtype] = None
                               ) -> Tuple[Tensor, Tensor]:
    """Materialised decoding attention over caches that already hold any appended tokens.

    q (B, H, Nq, D); caches as in the module doc; cache_seqlens (B,) lengths *before* the
    ``n_appended`` new tokens; alibi_slopes (B, H) or (H,) or None. Computes in ``compute_dtype``
    (default q's dtype). Returns (out (B, H, Nq, D) in q's dtype, lse fp32 (B, H, Nq)).
    """
    dtype = compute_dtype or q.dtype
    B, H, Nq, D = q.shape
    Hkv = k_cache.shape[1]
    group = H // Hkv
    scale = D ** -0.5 if scale is None else scale
    if alibi_slopes is not None and alibi_slopes.dim() == 1:
        alibi_slopes = alibi_slopes.expand(B, H)
    out = torch.zeros(B, H, Nq, D, dtype=dtype, device=q.device)
    lse = torch.full((B, H, Nq), float("-inf"), dtype=torch.float32, device=q.device)
    lengths = (cache_seqlens.to(torch.int64) + n_appended).tolist()
    for b, L in enumerate(lengths):
        if L == 0 or Nq == 0:
            continue
        k = gather_cache(k_cache, block_table, b, L).to(dtype).repeat_interleave(group, 0)  # (H, L, D)
        v = gather_cache(v_cache, block_table, b, L).to(dtype).repeat_interleave(group, 0)
        s = torch.matmul(q[b].to(dtype), k.transpose(-1, -2)) * scale  # (H, Nq, L)
        p_i = torch.arange(Nq, device=q.device)[:, None] + (L - Nq)
        j = torch.arange(L, device=q.device)[None, :]
        if alibi_slopes is not None:
            s = s - alibi_slopes[b].to(dtype)[:, None, None] * (p_i - j).abs().to(dtype)
        visible = torch.ones(Nq, L, dtype=torch.bool, device=q.device)
        if window_left >= 0:
            visible &= j >= p_i - window_left
        if window_right >= 0:
            visible &= j <= p_i + window_right
        s = s.masked_fill(~visible, float("-inf"))
        empty = ~visible.any(-1)  # (Nq,)
        s = s.masked_fill(empty[None, :, None], 0.0)
        row_lse = torch.logsumexp(s.float() if dtype != torch.float64 else s, -1)
        lse[b] = row_lse.masked_fill(empty[None, :], float("-inf")).float()
        p = torch.softmax(s, -1).masked_fill(empty[None, :, None], 0.0)
        out[b] = torch.matmul(p, v)
    return out.to(q.dtype), lse
