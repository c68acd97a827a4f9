"""``pyattn.nn.LocalSelfAttention``: Reformer's chunked local self-attention on pyattn's block-sparse engine.

Parameter names (``query``, ``key``, ``value``, Linear without bias) and constructor arguments
follow transformers' ``LocalSelfAttention``, so its state dict loads as is and ``from_config``
takes a ``ReformerConfig``. The output is the attention result before Reformer's output projection.

The sequence is cut into chunks of ``local_attn_chunk_length``; every query of chunk c attends to
all keys of chunks c - before .. c + after, cyclically (transformers' ``_look_adjacent`` wraps
around: chunk 0 sees the last chunk). That is whole chunks, not a sliding window around each
query, so it runs as a block schedule (:class:`pyattn.BlockMask`) of chunk-aligned blocks: all
blocks are full (mask-free) when the chunk length is a multiple of 16, otherwise the schedule keeps
the chunk boundaries as packed element bits. The causal mask and key padding are applied by the
kernels inside the visited blocks.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_int, check_probability
from ..attention import attention
from ..block_mask import BlockMask
from ..block_sparse import block_sparse_attention

_BLOCKS = (128, 64, 32, 16)


def chunk_multiplicity(n_chunks: int, before: int, after: int, device=None) -> Tensor:
    """int64 (C, C): how often query chunk c sees key chunk c' (offsets -before..after, modulo C).
    Entries above 1 happen when 1 + before + after > C: transformers then concatenates the same
    chunk twice, which doubles its keys' weight in the softmax."""
    c = torch.arange(n_chunks, device=device)
    offsets = torch.arange(-before, after + 1, device=device)
    seen = (c.view(-1, 1) + offsets.view(1, -1)) % n_chunks  # (C, W)
    out = torch.zeros(n_chunks, n_chunks, dtype=torch.int64, device=device)
    return out.scatter_add_(1, seen, torch.ones_like(seen))


def local_block_mask(seq_len: int, chunk_length: int, before: int, after: int, *, causal: bool = False,
                     device=None) -> BlockMask:
    """Schedule (1, 1, N, N) of chunked local attention: query chunk c sees key chunks
    (c - before .. c + after) mod C, C = seq_len / chunk_length (seq_len must be a multiple).
    With ``causal`` the blocks wholly above the diagonal are dropped (the kernels' causal mask
    does the rest). Block size: the largest of 128, 64, 32, 16 dividing chunk_length (all blocks
    full); none divides it: blocks of 16 with the chunk boundaries as element bits."""
    if seq_len % chunk_length:
        raise ValueError(f"seq_len ({seq_len}) must be a multiple of chunk_length ({chunk_length})")
    C = seq_len // chunk_length
    seen = chunk_multiplicity(C, before, after, device) > 0  # (C, C) chunk table
    block = next((b for b in _BLOCKS if chunk_length % b == 0), None)
    if block is not None:
        per = chunk_length // block
        table = seen.repeat_interleave(per, 0).repeat_interleave(per, 1)
        if causal:
            table = table & torch.ones_like(table).tril()
        return BlockMask.from_block_bools(table[None, None].contiguous(), block_size=(block, block),
                                          seq_lengths=(seq_len, seq_len))
    chunk = torch.arange(seq_len, device=device) // chunk_length
    mask = seen[chunk][:, chunk]  # (N, N) element table: only for chunk lengths off the block grid
    if causal:
        mask = mask & torch.ones_like(mask).tril()
    return BlockMask.from_bool_mask(mask[None, None], block_size=16, always_bits=True)


class LocalSelfAttention(nn.Module):
    """x (B, N, hidden) -> (B, N, heads * head_size): transformers' ``LocalSelfAttention``.

    Args follow ReformerConfig: ``local_attn_chunk_length``, ``local_num_chunks_before`` /
    ``_after``, ``is_decoder`` (causal), ``local_attention_probs_dropout_prob``.

    Semantics as transformers (documented deviations marked *):
        * N <= chunk_length: plain full attention (causal when is_decoder) with key padding.
        * N > chunk_length: chunk c attends to chunks c - before .. c + after modulo the chunk count
          (wrap-around; with causal the wrapped keys are in the future and masked). When
          1 + before + after exceeds the chunk count transformers sees a chunk twice: reproduced
          with an additive log-multiplicity bias (dense attention, only for such short sequences).
        * (*) N not a multiple of chunk_length: padded with masked keys, as ``ReformerModel``
          does (transformers' module alone fails to reshape).
        * (*) a query that sees no unmasked key gets 0 (transformers' finite -1e9 mask gives the
          mean of the window's values); this only happens at padding positions.
        * (*) dropout uses pyattn's counter-based mask, not torch's RNG stream.

    Equivalent PyTorch (N a multiple of L, W = before + 1 + after chunks)::

        q, k, v = (t.view(B, H, C, L, D) for t in (q, k / sqrt(D), v))
        adj = lambda t: torch.cat([t.roll(-i, 2) for i in range(-before, after + 1)], 3)  # (B, H, C, W*L, D)
        s = (q @ adj(k).transpose(-1, -2)).masked_fill(~visible, -1e9)                     # causal, padding
        out = (s.softmax(-1) @ adj(v)).view(B, H, N, D)
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_head_size: int, *,
                 local_attn_chunk_length: int = 64, local_num_chunks_before: int = 1, local_num_chunks_after: int = 0,
                 is_decoder: bool = False, local_attention_probs_dropout_prob: float = 0.0,
                 backend: Optional[str] = None):
        super().__init__()
        check_int("hidden_size", hidden_size, 1)
        check_int("num_attention_heads", num_attention_heads, 1)
        check_int("attention_head_size", attention_head_size, 1)
        check_int("local_attn_chunk_length", local_attn_chunk_length, 1)
        check_int("local_num_chunks_before", local_num_chunks_before, 0)
        check_int("local_num_chunks_after", local_num_chunks_after, 0)
        if not isinstance(is_decoder, bool):
            raise TypeError(f"is_decoder must be a bool, got {type(is_decoder).__name__}")
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = attention_head_size
        self.chunk_length = local_attn_chunk_length
        self.num_chunks_before = local_num_chunks_before
        self.num_chunks_after = local_num_chunks_after
        self.is_decoder = is_decoder
        self.dropout = check_probability("local_attention_probs_dropout_prob", local_attention_probs_dropout_prob)
        self.backend = backend
        all_head = num_attention_heads * attention_head_size
        self.query = nn.Linear(hidden_size, all_head, bias=False)
        self.key = nn.Linear(hidden_size, all_head, bias=False)
        self.value = nn.Linear(hidden_size, all_head, bias=False)
        self._schedules: Dict[Tuple[int, str], BlockMask] = {}

    @classmethod
    def from_config(cls, config, backend: Optional[str] = None) -> "LocalSelfAttention":
        return cls(config.hidden_size, config.num_attention_heads, config.attention_head_size,
                   local_attn_chunk_length=config.local_attn_chunk_length,
                   local_num_chunks_before=config.local_num_chunks_before,
                   local_num_chunks_after=config.local_num_chunks_after, is_decoder=config.is_decoder,
                   local_attention_probs_dropout_prob=config.local_attention_probs_dropout_prob, backend=backend)

    def _schedule(self, n: int, device) -> BlockMask:
        key = (n, str(device))
        if key not in self._schedules:
            if len(self._schedules) > 8:
                self._schedules.clear()
            self._schedules[key] = local_block_mask(n, self.chunk_length, self.num_chunks_before,
                                                    self.num_chunks_after, causal=self.is_decoder, device=device)
        return self._schedules[key]

    def attend(self, q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """The attention on projected heads: q, k, v (B, H, N, D), key_padding_mask (B, N) True = pad."""
        B, H, N, D = q.shape
        p = self.dropout if self.training else 0.0
        L = self.chunk_length
        if N <= L:
            return attention(q, k, v, causal=self.is_decoder, key_padding_mask=key_padding_mask, dropout_p=p,
                             backend=self.backend)
        Np = -(-N // L) * L
        kpm = key_padding_mask
        if Np != N:
            q, k, v = (F.pad(t, (0, 0, 0, Np - N)) for t in (q, k, v))
            base = kpm if kpm is not None else torch.zeros(B, N, dtype=torch.bool, device=q.device)
            kpm = torch.cat([base, torch.ones(B, Np - N, dtype=torch.bool, device=q.device)], 1)
        C = Np // L
        if 1 + self.num_chunks_before + self.num_chunks_after > C:
            # a chunk appears more than once in the window (short sequence): weight its keys by their count
            mult = chunk_multiplicity(C, self.num_chunks_before, self.num_chunks_after, q.device)
            chunk = torch.arange(Np, device=q.device) // L
            bias = mult[chunk][:, chunk].to(q.dtype).log()  # (Np, Np), -inf where unseen
            out = attention(q, k, v, causal=self.is_decoder, key_padding_mask=kpm, bias=bias, dropout_p=p,
                            backend=self.backend)
        else:
            out = block_sparse_attention(q, k, v, self._schedule(Np, q.device), causal=self.is_decoder,
                                         key_padding_mask=kpm, dropout_p=p, backend=self.backend)
        return out[:, :, :N] if Np != N else out

    def forward(self, hidden_states: Tensor, key_padding_mask: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None) -> Tensor:
        """key_padding_mask (B, N) bool, True = padding (PyTorch's meaning); or transformers'
        attention_mask (B, N), 1 = keep."""
        if attention_mask is not None:
            if key_padding_mask is not None:
                raise ValueError("give key_padding_mask (True = pad) or attention_mask (1 = keep), not both")
            key_padding_mask = attention_mask == 0
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be 3-D (B, N, hidden), got shape {tuple(hidden_states.shape)}")
        B, N, _ = hidden_states.shape
        H, D = self.num_attention_heads, self.attention_head_size
        q = self.query(hidden_states).view(B, N, H, D).transpose(1, 2)
        k = self.key(hidden_states).view(B, N, H, D).transpose(1, 2)
        v = self.value(hidden_states).view(B, N, H, D).transpose(1, 2)
        out = self.attend(q, k, v, key_padding_mask)
        return out.transpose(1, 2).reshape(B, N, H * D)

    def extra_repr(self) -> str:
        return (f"heads={self.num_attention_heads}, head_size={self.attention_head_size}, "
                f"chunk_length={self.chunk_length}, chunks_before={self.num_chunks_before}, "
                f"chunks_after={self.num_chunks_after}, causal={self.is_decoder}, dropout={self.dropout}")
