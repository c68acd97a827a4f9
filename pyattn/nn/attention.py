"""Attention modules: ``MultiheadAttention`` (a drop-in for ``torch.nn.MultiheadAttention``) and
``GroupedQueryAttention`` (packed q/k/v projection, GQA/MQA, batch first)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import FLOAT_DTYPES, check_probability, check_same_dtype
from ..attention import attention

_MASK_DTYPES = (torch.bool,) + FLOAT_DTYPES + (torch.float64,)


def _check_mask_dtype(name: str, mask: Optional[Tensor]) -> None:
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype not in _MASK_DTYPES:
        raise TypeError(f"{name} must be bool or a float additive mask, got {str(mask.dtype).replace('torch.', '')}")


def _append_key(mask: Optional[Tensor]) -> Optional[Tensor]:
    """One more key column that every query may see (False in a bool mask, 0 in a float one)."""
    if mask is None:
        return None
    return torch.cat([mask, mask.new_zeros(*mask.shape[:-1], 1)], dim=-1)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """torch.nn.MultiheadAttention's masks as an additive float: bool True = not allowed -> -inf."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class MultiheadAttention(nn.MultiheadAttention):
    """Drop-in for ``torch.nn.MultiheadAttention`` whose attention runs on pyattn's fused kernels.

    It *is* a ``torch.nn.MultiheadAttention`` (a subclass): the same constructor, the same
    parameters (``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight`` when
    ``kdim``/``vdim`` differ from ``embed_dim``, ``in_proj_bias``, ``bias_k``, ``bias_v``,
    ``out_proj``) and initialisation, so ``load_state_dict`` works both ways. Only ``forward``
    differs, and only in how the attention is computed. The one extra argument is the keyword-only
    ``backend`` ("triton", "cuda", "cpu", "reference" or None = fastest that fits).

    ``forward(query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
    average_attn_weights=True, is_causal=False) -> (attn_output, attn_output_weights or None)``

    Shapes (N batch, L target, S source; ``batch_first=True`` puts N first; unbatched inputs drop N):
        query (L, N, embed_dim), key (S, N, kdim), value (S, N, vdim) -> attn_output (L, N, embed_dim);
        attn_output_weights (N, L, S) averaged over heads, or (N, num_heads, L, S).

    Masks, exactly as in torch:
        key_padding_mask: (N, S) or (S,) unbatched; bool **True = that key is ignored** (padding),
            or float, added to the scores.
        attn_mask: (L, S) or (N * num_heads, L, S); bool **True = that position is NOT allowed**
            (the opposite of ``F.scaled_dot_product_attention``'s and ``pyattn.attention``'s bool
            ``attn_mask``), or float, added to the scores.
        is_causal: a hint that ``attn_mask`` is the causal mask; like torch it requires ``attn_mask``.
            With ``need_weights=False`` and no ``key_padding_mask`` the mask is then not read and the
            kernels run their causal schedule (query i sees keys j <= i); otherwise ``attn_mask`` is used.

    The fast path is ``need_weights=False``: the fused kernel (O(N) memory, no (L, S) matrix), the
    masks passed as key padding / mask bits rather than dense floats. ``need_weights=True`` (torch's
    default) must return the (L, S) attention probabilities, which a fused kernel never forms: that
    path is the plain PyTorch computation torch uses (matmul, softmax, dropout, matmul; not the fused
    kernel, so its cost is O(L * S) memory) and returns its weights. Dropout (training only) follows
    torch in both paths but draws its own mask. Difference from torch: a query row that sees no key
    gives 0 output and 0 weights, where torch gives NaN. Head dims above 256 are not supported.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, bias: bool = True,
                 add_bias_kv: bool = False, add_zero_attn: bool = False, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, batch_first: bool = False, device=None, dtype=None, *,
                 backend: Optional[str] = None) -> None:
        for name, val in (("embed_dim", embed_dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        check_probability("dropout", dropout)
        super().__init__(embed_dim, num_heads, dropout=dropout, bias=bias, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim, batch_first=batch_first,
                         device=device, dtype=dtype)
        self.backend = backend

    # ---- input checks (torch's _mha_shape_check, with ValueError / TypeError) ----
    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask) -> bool:
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got shape {tuple(query.shape)}")
        batched = query.dim() == 3
        for name, t in (("key", key), ("value", value)):
            if t.dim() != query.dim():
                raise ValueError(f"{name} must be {query.dim()}-D like query, got shape {tuple(t.shape)}")
        w = self.in_proj_weight if self._qkv_same_embed_dim else self.q_proj_weight
        for name, t, width in (("query", query, self.embed_dim), ("key", key, self.kdim), ("value", value, self.vdim)):
            if t.shape[-1] != width:
                raise ValueError(f"{name} must have {width} features in its last dim, got shape {tuple(t.shape)}")
            check_same_dtype(name, t, "in_proj_weight" if self._qkv_same_embed_dim else "q_proj_weight", w)
        if key.shape[:-1] != value.shape[:-1]:
            raise ValueError(f"key and value must agree in all but the last dim, got {tuple(key.shape)} and "
                             f"{tuple(value.shape)}")
        bdim = (1 if not self.batch_first else 0) if batched else None
        N = query.shape[bdim] if batched else 1
        if batched and key.shape[bdim] != N:
            raise ValueError(f"key batch size {key.shape[bdim]} must equal query batch size {N}")
        sdim = (0 if not self.batch_first else 1) if batched else 0
        L, S = query.shape[sdim], key.shape[sdim]
        _check_mask_dtype("key_padding_mask", key_padding_mask)
        _check_mask_dtype("attn_mask", attn_mask)
        if key_padding_mask is not None:
            want = (N, S) if batched else (S,)
            if tuple(key_padding_mask.shape) != want:
                raise ValueError(f"key_padding_mask must have shape {'(N, S)' if batched else '(S,)'} = {want}, "
                                 f"got {tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            ok = ((L, S), (N * self.num_heads, L, S))
            if tuple(attn_mask.shape) not in ok:
                raise ValueError(f"attn_mask must have shape (L, S) = {ok[0]} or (N * num_heads, L, S) = {ok[1]}, "
                                 f"got {tuple(attn_mask.shape)}")
        return batched

    def _project(self, query: Tensor, key: Tensor, value: Tensor, same: Tuple[bool, bool]):
        """(N, L, E), (N, S, kdim), (N, S, vdim) -> q, k, v (N, *, E). ``same``: (q is k is v, k is v)."""
        b = self.in_proj_bias
        bq, bk, bv = b.chunk(3) if b is not None else (None, None, None)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, bq), F.linear(key, self.k_proj_weight, bk),
                    F.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if same[0]:  # self-attention: one matmul
            return F.linear(query, w, b).chunk(3, dim=-1)
        wq, wk, wv = w.chunk(3)
        q = F.linear(query, wq, bq)
        if same[1]:  # key is value: one matmul for both (rows E: of the packed weight)
            E = self.embed_dim
            return (q, *F.linear(key, w[E:], None if b is None else b[E:]).chunk(2, dim=-1))
        return q, F.linear(key, wk, bk), F.linear(value, wv, bv)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Optional[Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[Tensor, Optional[Tensor]]:
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask)
        same = (query is key and key is value, key is value)
        if is_causal and attn_mask is None:
            raise ValueError("is_causal=True is a hint that attn_mask is the causal mask and needs attn_mask "
                             "(as in torch.nn.MultiheadAttention); e.g. "
                             "nn.Transformer.generate_square_subsequent_mask(L)")
        # torch: the causal hint replaces the mask only on the SDPA path without key padding
        causal = is_causal and key_padding_mask is None and not need_weights
        if causal:
            attn_mask = None
        if not batched:
            query, key, value = query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0)
            key_padding_mask = None if key_padding_mask is None else key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        N, L, E = query.shape
        H, hd = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value, same)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(N, 1, E)], dim=1)
            v = torch.cat([v, self.bias_v.expand(N, 1, E)], dim=1)
            attn_mask, key_padding_mask = _append_key(attn_mask), _append_key(key_padding_mask)
        # (N, L, H, hd) views as (N, H, L, hd): the kernels read them without a copy
        q = q.view(N, L, H, hd).transpose(1, 2)
        k = k.view(N, k.shape[1], H, hd).transpose(1, 2)
        v = v.view(N, v.shape[1], H, hd).transpose(1, 2)
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(N, H, 1, hd)], dim=2)
            v = torch.cat([v, v.new_zeros(N, H, 1, hd)], dim=2)
            attn_mask, key_padding_mask = _append_key(attn_mask), _append_key(key_padding_mask)
        S = k.shape[2]
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.view(N, H, L, S)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = self._attention_with_weights(q, k, v, key_padding_mask, attn_mask, p)
        else:
            if attn_mask is not None and attn_mask.dtype == torch.bool:
                attn_mask = ~attn_mask  # pyattn.attention's bool attn_mask: True = attend (SDPA's meaning)
            out = attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, dropout_p=p,
                            causal=causal, causal_alignment="top_left", backend=self.backend)
        out = self.out_proj(out.transpose(1, 2).reshape(N, L, E))
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    @staticmethod
    def _attention_with_weights(q, k, v, key_padding_mask, attn_mask, p):
        """The need_weights=True path: plain PyTorch (not the fused kernel), as torch computes it.
        q (N, H, L, hd), k/v (N, H, S, hd) -> out (N, H, L, hd), weights (N, H, L, S)."""
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if attn_mask is not None:
            scores = scores + _additive(attn_mask, q.dtype)
        if key_padding_mask is not None:
            scores = scores + _additive(key_padding_mask, q.dtype)[:, None, None, :]
        weights = torch.softmax(scores, dim=-1)
        # a row that sees no key: 0, not torch's NaN
        weights = torch.where(torch.isneginf(scores).all(-1, keepdim=True), 0.0, weights)
        if p > 0.0:
            weights = F.dropout(weights, p=p)
        return weights @ v, weights

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, backend={self.backend}")


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with a packed q/k/v projection and an output projection; GQA / MQA.

    x (B, N, embed_dim) -> (B, N, embed_dim) (batch first). ``num_kv_heads`` < ``num_heads`` gives
    GQA/MQA. ``forward(x, context=None, key_padding_mask=None, attn_mask=None, bias=None)``: with
    ``context`` (B, M, embed_dim) it is cross-attention (queries from x, keys/values from context).
    The masks are those of :func:`pyattn.attention`: ``key_padding_mask`` (B, M) bool with
    **True = padding** (PyTorch's meaning) or float additive; ``attn_mask`` bool True = attend
    (SDPA's meaning) or float additive. Not a drop-in for ``torch.nn.MultiheadAttention``; that is
    :class:`MultiheadAttention`.
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
