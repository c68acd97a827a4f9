"""``pyattn.nn.LSHSelfAttention``: Reformer's shared-QK LSH self-attention layer on pyattn.lsh_attention.

Parameter names (``query_key``, ``value``) and constructor arguments follow transformers'
``LSHSelfAttention``, so a transformers state dict loads as is and ``from_config`` takes a
``ReformerConfig``. The output is the attention result before Reformer's output projection.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from ..lsh import default_n_buckets, lsh_attention_and_sort


class LSHSelfAttention(nn.Module):
    """x (B, N, hidden) -> (B, N, heads * head_size).

    Args follow ReformerConfig: ``num_hashes``, ``num_buckets`` (None = transformers' default for
    the sequence length, resolved per call), ``lsh_attn_chunk_length``, ``lsh_num_chunks_before``
    / ``_after``, ``is_decoder`` (causal), ``hash_seed`` (fixed rotations; None = fresh ones per
    call as transformers draws them), ``lsh_attention_probs_dropout_prob``.
    """

    def __init__(self, hidden_size: int, num_attention_heads: int, attention_head_size: int, *,
                 num_hashes: int = 1, num_buckets: Optional[Union[int, Sequence[int]]] = None,
                 lsh_attn_chunk_length: int = 64, lsh_num_chunks_before: int = 1, lsh_num_chunks_after: int = 0,
                 is_decoder: bool = False, hash_seed: Optional[int] = None,
                 lsh_attention_probs_dropout_prob: float = 0.0, max_position_embeddings: Optional[int] = None,
                 backend: Optional[str] = None):
        super().__init__()
        self.num_attention_heads = num_attention_heads
        self.attention_head_size = attention_head_size
        self.num_hashes = num_hashes
        self.num_buckets = num_buckets
        self.chunk_length = lsh_attn_chunk_length
        self.num_chunks_before = lsh_num_chunks_before
        self.num_chunks_after = lsh_num_chunks_after
        self.is_decoder = is_decoder
        self.hash_seed = hash_seed
        self.dropout = lsh_attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.backend = backend
        all_head = num_attention_heads * attention_head_size
        self.query_key = nn.Linear(hidden_size, all_head, bias=False)
        self.value = nn.Linear(hidden_size, all_head, bias=False)

    @classmethod
    def from_config(cls, config, backend: Optional[str] = None) -> "LSHSelfAttention":
        return cls(config.hidden_size, config.num_attention_heads, config.attention_head_size,
                   num_hashes=config.num_hashes, num_buckets=config.num_buckets,
                   lsh_attn_chunk_length=config.lsh_attn_chunk_length,
                   lsh_num_chunks_before=config.lsh_num_chunks_before,
                   lsh_num_chunks_after=config.lsh_num_chunks_after, is_decoder=config.is_decoder,
                   hash_seed=config.hash_seed,
                   lsh_attention_probs_dropout_prob=config.lsh_attention_probs_dropout_prob,
                   max_position_embeddings=config.max_position_embeddings, backend=backend)

    def forward(self, hidden_states: Tensor, key_padding_mask: Optional[Tensor] = None,
                attention_mask: Optional[Tensor] = None, num_hashes: Optional[int] = None) -> Tensor:
        """key_padding_mask (B, N) bool, True = padding; or transformers' attention_mask (1 = keep)."""
        return self.forward_and_sort(hidden_states, key_padding_mask, attention_mask, num_hashes)[0]

    def forward_and_sort(self, hidden_states: Tensor, key_padding_mask: Optional[Tensor] = None,
                         attention_mask: Optional[Tensor] = None, num_hashes: Optional[int] = None,
                         sort: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """:meth:`forward` also returning the bucket sort order, int64 (B, H, R * N padded) (see
        :func:`pyattn.lsh.lsh_attention_and_sort`); given ``sort`` from an earlier call on the same
        input, hashing is skipped and that order reused (a reversible recomputation)."""
        if attention_mask is not None:
            if key_padding_mask is not None:
                raise ValueError("give key_padding_mask (True = pad) or attention_mask (1 = keep), not both")
            key_padding_mask = attention_mask == 0
        B, N, _ = hidden_states.shape
        H, D = self.num_attention_heads, self.attention_head_size
        qk = self.query_key(hidden_states).view(B, N, H, D).transpose(1, 2)
        v = self.value(hidden_states).view(B, N, H, D).transpose(1, 2)
        n_buckets = self.num_buckets
        if n_buckets is None and N > self.chunk_length:
            padded = -(-N // self.chunk_length) * self.chunk_length
            n_buckets = default_n_buckets(padded, self.chunk_length, self.max_position_embeddings)
        out, _, sort = lsh_attention_and_sort(
            qk, v, n_hashes=num_hashes or self.num_hashes, n_buckets=n_buckets, chunk_length=self.chunk_length,
            chunks_before=self.num_chunks_before, chunks_after=self.num_chunks_after, causal=self.is_decoder,
            key_padding_mask=key_padding_mask, seed=self.hash_seed, dropout_p=self.dropout if self.training else 0.0,
            backend=self.backend, sort=sort)
        return out.transpose(1, 2).reshape(B, N, H * D), sort

    def extra_repr(self) -> str:
        return (f"heads={self.num_attention_heads}, head_size={self.attention_head_size}, "
                f"num_hashes={self.num_hashes}, num_buckets={self.num_buckets}, chunk_length={self.chunk_length}, "
                f"chunks_before={self.num_chunks_before}, chunks_after={self.num_chunks_after}, "
                f"causal={self.is_decoder}")
