"""``pyattn.PagedKVCache``: a paged key/value cache for :func:`pyattn.decode_attention`.

Keys and values of every layer live in page pools ``(num_pages, Hkv, page_size, D)``; each
sequence owns a list of pages (its row of the block table) and a length. Pages are handed out
from a free list as sequences grow and returned when they are freed, so sequences of very
different lengths share one pool without padding::

    cache = pyattn.PagedKVCache(num_layers=2, num_pages=64, page_size=16, num_kv_heads=8, head_dim=128)
    seqs = [cache.add_sequence(), cache.add_sequence()]
    for layer in range(2):
        cache.append(seqs, k_prompt[layer], v_prompt[layer], layer=layer)   # (B, Hkv, N, D)
    cache.advance(seqs, N)
    ...
    cache.reserve(seqs, 1)          # before a decode step that appends one token per sequence
    out = pyattn.decode_attention(q, *cache.layer(0), cache.cache_seqlens(seqs),
                                  block_table=cache.block_table(seqs), k_new=k1, v_new=v1)
    cache.advance(seqs, 1)          # after the step's last layer
    cache.free(seqs[0])
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import Tensor


class PagedKVCache:
    """Page pools for ``num_layers`` layers plus the per-sequence page lists and lengths.

    Args:
        num_layers: layers sharing the block table (one K and one V pool each).
        num_pages: pages per pool; page_size: tokens per page.
        num_kv_heads, head_dim: Hkv and D.
        max_pages_per_seq: width of the block table (default: num_pages).
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.bfloat16, device="cpu", max_pages_per_seq: int | None = None):
        for name, val in (("num_layers", num_layers), ("num_pages", num_pages), ("page_size", page_size),
                          ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        self.page_size = page_size
        self.num_pages = num_pages
        self.max_pages_per_seq = max_pages_per_seq or num_pages
        self.device = torch.device(device)
        shape = (num_pages, num_kv_heads, page_size, head_dim)
        self.k_pages = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v_pages = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._free: List[int] = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self._pages: Dict[int, List[int]] = {}
        self._lengths: Dict[int, int] = {}
        self._next_id = 0

    # ---- sequences
    def add_sequence(self, length: int = 0) -> int:
        """A new sequence with room for ``length`` tokens (length 0: no page yet); returns its id."""
        sid = self._next_id
        self._next_id += 1
        self._pages[sid] = []
        self._lengths[sid] = 0
        self._ensure(sid, length)
        return sid

    def free(self, seq_id: int) -> None:
        """Return the sequence's pages to the pool."""
        self._check_seq(seq_id)
        self._free.extend(reversed(self._pages.pop(seq_id)))
        del self._lengths[seq_id]

    def length(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._lengths[seq_id]

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def reserve(self, seq_ids: Sequence[int], n: int) -> None:
        """Make room for ``n`` more tokens in each sequence (allocates pages; lengths unchanged)."""
        for sid in seq_ids:
            self._check_seq(sid)
            self._ensure(sid, self._lengths[sid] + n)

    def advance(self, seq_ids: Sequence[int], n: int) -> None:
        """Count ``n`` more valid tokens per sequence (after they were written, e.g. by every layer)."""
        for sid in seq_ids:
            self._check_seq(sid)
            new = self._lengths[sid] + n
            if new > len(self._pages[sid]) * self.page_size:
                raise ValueError(f"sequence {sid}: advancing to {new} tokens needs reserve() first "
                                 f"({len(self._pages[sid])} pages of {self.page_size})")
            self._lengths[sid] = new

    # ---- views handed to decode_attention
    def layer(self, index: int) -> Tuple[Tensor, Tensor]:
        """(k_pages, v_pages) of one layer: (num_pages, Hkv, page_size, D) each."""
        return self.k_pages[index], self.v_pages[index]

    def block_table(self, seq_ids: Sequence[int]) -> Tensor:
        """(B, max_pages_per_seq) int32: row b lists sequence seq_ids[b]'s pages (unused entries 0)."""
        table = torch.zeros(len(seq_ids), self.max_pages_per_seq, dtype=torch.int32)
        for b, sid in enumerate(seq_ids):
            self._check_seq(sid)
            pages = self._pages[sid]
            table[b, :len(pages)] = torch.tensor(pages, dtype=torch.int32)
        return table.to(self.device)

    def cache_seqlens(self, seq_ids: Sequence[int]) -> Tensor:
        """(B,) int32 valid lengths."""
        for sid in seq_ids:
            self._check_seq(sid)
        return torch.tensor([self._lengths[s] for s in seq_ids], dtype=torch.int32, device=self.device)

    def append(self, seq_ids: Sequence[int], k: Tensor, v: Tensor, *, layer: int = 0) -> None:
        """Write k, v (B, Hkv, N, D) after each sequence's valid tokens in ``layer`` (reserving pages
        as needed). Lengths are not advanced: call :meth:`advance` once all layers are written."""
        from . import _dispatch
        from .ops.decode import decode_kv_append

        if k.dim() != 4 or k.shape != v.shape or k.shape[0] != len(seq_ids):
            raise ValueError(f"k and v must both be (B, Hkv, N, D) with B = {len(seq_ids)}, got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        self.reserve(seq_ids, k.shape[2])
        kp, vp = self.layer(layer)
        backend = _dispatch.select_backend("PagedKVCache.append", "decode", self.device, None,
                                           (kp.dtype, kp.shape[-1]))
        decode_kv_append(kp, vp, k.to(kp.dtype).contiguous(), v.to(vp.dtype).contiguous(),
                         self.cache_seqlens(seq_ids), self.block_table(seq_ids), backend)

    def append_packed(self, seq_ids: Sequence[int], k: Tensor, v: Tensor, cu_seqlens: Tensor, *,
                      layer: int = 0) -> None:
        """Write packed k, v (total, Hkv, D) (sequence b's tokens are rows cu_seqlens[b]:cu_seqlens[b+1],
        as :func:`pyattn.varlen_attention` takes them) after each sequence's valid tokens in ``layer``,
        reserving pages as needed; no padding is written. Lengths are not advanced."""
        kp, vp = self.layer(layer)
        if k.dim() != 3 or k.shape != v.shape or k.shape[1:] != (kp.shape[1], kp.shape[3]):
            raise ValueError(f"k and v must both be (total, Hkv, D) = (total, {kp.shape[1]}, {kp.shape[3]}), got "
                             f"{tuple(k.shape)} and {tuple(v.shape)}")
        if tuple(cu_seqlens.shape) != (len(seq_ids) + 1,) or int(cu_seqlens[-1]) != k.shape[0]:
            raise ValueError(f"cu_seqlens must have shape ({len(seq_ids) + 1},) and end at {k.shape[0]}, got "
                             f"{cu_seqlens.tolist()}")
        counts = cu_seqlens.to(torch.int64).diff().cpu()
        for sid, n in zip(seq_ids, counts.tolist()):
            self._check_seq(sid)
            self._ensure(sid, self._lengths[sid] + n)
        counts = counts.to(self.device)
        row = torch.repeat_interleave(torch.arange(len(seq_ids), device=self.device), counts)  # sequence of each token
        start = torch.repeat_interleave(cu_seqlens.to(self.device, torch.int64)[:-1], counts)
        pos = self.cache_seqlens(seq_ids).to(torch.int64)[row] + torch.arange(k.shape[0], device=self.device) - start
        page = self.block_table(seq_ids).to(torch.int64)[row, pos // self.page_size]
        kp[page, :, pos % self.page_size] = k.to(kp.dtype)
        vp[page, :, pos % self.page_size] = v.to(vp.dtype)

    # ---- internals
    def _check_seq(self, seq_id: int) -> None:
        if seq_id not in self._pages:
            raise KeyError(f"unknown or freed sequence id {seq_id}")

    def _ensure(self, sid: int, tokens: int) -> None:
        need = -(-tokens // self.page_size)
        pages = self._pages[sid]
        if need > self.max_pages_per_seq:
            raise ValueError(f"sequence {sid} would need {need} pages, more than max_pages_per_seq = "
                             f"{self.max_pages_per_seq}")
        if need - len(pages) > len(self._free):
            raise RuntimeError(f"PagedKVCache is out of pages: sequence {sid} needs {need - len(pages)} more, "
                               f"{len(self._free)} free")
        while len(pages) < need:
            pages.append(self._free.pop())
