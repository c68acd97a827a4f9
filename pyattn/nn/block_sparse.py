from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from ..block_mask import BlockMask
from ..block_sparse import block_sparse_attention


class BlockSparseSelfAttention(nn.Module):
    """Self-attention over the blocks of a fixed layout (a :class:`pyattn.BlockMask`, e.g.
    ``pyattn.layouts.bigbird(num_heads, seq_len)``), with packed q/k/v and output projections.

    x (B, N, embed_dim) -> (B, N, embed_dim); N must be the layout's sequence length.
    ``forward(x, key_padding_mask=None)``: key_padding_mask (B, N) bool, True = padding (PyTorch's meaning).
    """

    def __init__(self, embed_dim: int, num_heads: int, layout: BlockMask, num_kv_heads: Optional[int] = None, *,
                 bias: bool = True, dropout: float = 0.0, causal: bool = False, backend: Optional[str] = None,
                 device=None, dtype=None):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if not isinstance(layout, BlockMask):
            raise TypeError(f"layout must be a pyattn.BlockMask, got {type(layout).__name__}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        self.head_dim = embed_dim // num_heads
        self.layout, self.dropout, self.causal, self.backend = layout, dropout, causal, backend
        kv_dim = self.num_kv_heads * self.head_dim
        factory = dict(device=device, dtype=dtype)
        self.qkv_proj = nn.Linear(embed_dim, embed_dim + 2 * kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        B, N, _ = x.shape
        kv_dim = self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([self.embed_dim, kv_dim, kv_dim], dim=-1)
        q = q.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, N, D) views, no copy
        k = k.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, N, self.num_kv_heads, self.head_dim).transpose(1, 2)
        out = block_sparse_attention(q, k, v, self.layout, causal=self.causal, key_padding_mask=key_padding_mask,
                                     dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, dropout={self.dropout}, layout={self.layout!r}")
