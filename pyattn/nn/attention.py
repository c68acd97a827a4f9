from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..attention import attention


class MultiheadAttention(nn.Module):
    """Multi-head attention with a packed q/k/v projection and an output projection.

    x (B, N, embed_dim) -> (B, N, embed_dim). ``num_kv_heads`` < ``num_heads`` gives GQA/MQA.
    ``forward(x, context=None, key_padding_mask=None, attn_mask=None, bias=None)``: with
    ``context`` (B, M, embed_dim) it is cross-attention (queries from x, keys/values from context).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None, *, bias: bool = True,
                 dropout: float = 0.0, causal: bool = False, backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = embed_dim // num_heads
        self.dropout = dropout
        self.causal = causal
        self.backend = backend
        kv_dim = self.num_kv_heads * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, bias: Optional[Tensor] = None) -> Tensor:
        B, N, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        if context is None:
            q, k, v = self.qkv_proj(x).split([self.embed_dim, kv_dim, kv_dim], dim=-1)
        else:
            w_q, w_kv = self.qkv_proj.weight.split([self.embed_dim, 2 * kv_dim])
            b_q, b_kv = self.qkv_proj.bias.split([self.embed_dim, 2 * kv_dim]) if self.qkv_proj.bias is not None \
                else (None, None)
            q = nn.functional.linear(x, w_q, b_q)
            k, v = nn.functional.linear(context, w_kv, b_kv).split([kv_dim, kv_dim], dim=-1)
        M = k.shape[1]
        # (B, N, H, D) views transposed to (B, H, N, D): the kernels read them without a copy
        q = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, M, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, M, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, causal=self.causal, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                        bias=bias, dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, dropout={self.dropout}")
