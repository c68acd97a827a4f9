"""Sparse Transformer language model (Child et al. 2019): a causal decoder whose self-attention
visits only the blocks of a "fixed" or "strided" layout, built from pyattn ops.

Pre-norm blocks ``h = x + Attn(Norm(x))``, ``y = h + FFN(Norm(h))`` with

- attention through :func:`pyattn.block_sparse_attention` on a unidirectional layout from
  :mod:`pyattn.layouts` plus the element-wise causal mask inside the diagonal blocks;
- the norm through :func:`pyattn.rms_norm` (the second one fused with its residual add) or
  ``nn.LayerNorm`` (``norm="layernorm"``);
- the feed-forward through :func:`pyattn.glu_ffn` (SwiGLU / GeGLU);
- learned absolute positions and the output projection tied to the token embeddings.

Under ``torch.autocast`` the residual stream and the feed-forward run in the autocast dtype.

Shapes: B batch, N tokens, E hidden size, H heads, D head dim, V vocabulary.

Equivalent dense computation (what the tests check): every layer's attention is
``softmax(q k^T / sqrt(D) masked to layout.to_dense_mask() & tril) v``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import layouts
from .._autocast import autocast_dtype
from .._validate import check_probability
from ..block_mask import BlockMask
from ..block_sparse import block_sparse_attention
from ..nn.glu import GLUFeedForward
from ..nn.rms_norm import RMSNorm
from ._lm import CausalLMOutput, causal_lm_output, check_token_ids

_LAYOUTS = ("fixed", "strided")
_NORMS = ("rmsnorm", "layernorm")
_FFN_ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")


@dataclass
class SparseTransformerConfig:
    """Hyper-parameters. ``layout`` is ``"fixed"`` or ``"strided"`` (see :mod:`pyattn.layouts`);
    ``block`` is the layout block size; ``num_local_blocks`` / ``num_global_blocks`` are the
    DeepSpeed-style layout parameters. ``ffn_activation`` is the GLU gate activation
    (``"silu"``: SwiGLU, ``"gelu"``: GeGLU)."""

    vocab_size: int = 258
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    max_position_embeddings: int = 1024
    layout: str = "fixed"
    block: int = 64
    num_local_blocks: int = 4
    num_global_blocks: int = 1
    norm: str = "rmsnorm"
    norm_eps: float = 1e-6
    ffn_activation: str = "silu"
    dropout: float = 0.0
    tie_word_embeddings: bool = True
    backend: Optional[str] = None  # pyattn backend for every op (None: dispatch picks)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "max_position_embeddings", "block", "num_local_blocks", "num_global_blocks"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                             f"({self.num_attention_heads})")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {self.layout!r}")
        if self.norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS}, got {self.norm!r}")
        if self.ffn_activation not in _FFN_ACTIVATIONS:
            raise ValueError(f"ffn_activation must be one of {_FFN_ACTIVATIONS}, got {self.ffn_activation!r}")
        check_probability("dropout", self.dropout)
        if self.layout == "fixed" and self.num_local_blocks % self.num_global_blocks:
            raise ValueError(f"num_local_blocks ({self.num_local_blocks}) must be divisible by num_global_blocks "
                             f"({self.num_global_blocks}) for the fixed layout")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


def build_layout(config: SparseTransformerConfig, seq_len: int, device=None) -> BlockMask:
    """The unidirectional block layout of ``config`` for ``seq_len`` tokens (one head, broadcast)."""
    c = config
    if c.layout == "fixed":
        return layouts.fixed(c.num_attention_heads, seq_len, c.block, num_local_blocks=c.num_local_blocks,
                             num_global_blocks=c.num_global_blocks, attention="unidirectional", device=device)
    return layouts.strided(c.num_attention_heads, seq_len, c.block, num_local_blocks=c.num_local_blocks,
                           attention="unidirectional", device=device)


class SparseSelfAttention(nn.Module):
    """x (B, N, E) -> (B, N, E): causal block-sparse self-attention over the layout given to forward."""

    def __init__(self, config: SparseTransformerConfig):
        super().__init__()
        self.config = config
        E = config.hidden_size
        self.qkv_proj = nn.Linear(E, 3 * E, bias=False)
        self.o_proj = nn.Linear(E, E, bias=False)

    def forward(self, x: Tensor, layout: BlockMask) -> Tensor:
        c = self.config
        B, N, E = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, 3, c.num_attention_heads, c.head_dim).unbind(2)
        p = c.dropout if self.training else 0.0
        # (B, N, H, D) viewed as (B, H, N, D): no copy
        out = block_sparse_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout, causal=True,
                                     dropout_p=p, backend=c.backend)
        return self.o_proj(out.transpose(1, 2).reshape(B, N, E))


class _LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with RMSNorm's ``forward(x, residual=None)`` interface."""

    def forward(self, x: Tensor, residual: Optional[Tensor] = None):
        if residual is None:
            return super().forward(x)
        h = x + residual
        return super().forward(h), h


def _norm(config: SparseTransformerConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.hidden_size, config.norm_eps, backend=config.backend)
    return _LayerNorm(config.hidden_size, eps=config.norm_eps)


class SparseTransformerBlock(nn.Module):
    def __init__(self, config: SparseTransformerConfig):
        super().__init__()
        self.attn_norm = _norm(config)
        self.attn = SparseSelfAttention(config)
        self.ffn_norm = _norm(config)
        self.ffn = GLUFeedForward(config.hidden_size, config.intermediate_size, config.ffn_activation,
                                  backend=config.backend)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, layout: BlockMask) -> Tensor:
        a = self.dropout(self.attn(self.attn_norm(x), layout))
        y, h = self.ffn_norm(a, residual=x)  # h = x + a, y = Norm(h)
        return h + self.dropout(self.ffn(y))  # under autocast glu_ffn casts y and its weights


class SparseTransformerLM(nn.Module):
    """Causal LM. ``forward(input_ids (B, N), labels=None)`` -> :class:`CausalLMOutput` with
    logits (B, N, V) and, given labels (B, N) (-100 = ignored), the next-token loss
    ``cross_entropy(logits[:, :-1], labels[:, 1:])``.

    The layout for each sequence length N <= ``max_position_embeddings`` is built once on the
    input's device and cached (:meth:`layout`); build it before ``torch.compile`` traces the model
    (``model.layout(N, device)``) and the compiled forward has no graph break.
    """

    def __init__(self, config: SparseTransformerConfig):
        super().__init__()
        if not isinstance(config, SparseTransformerConfig):
            raise TypeError(f"config must be a SparseTransformerConfig, got {type(config).__name__}")
        self.config = config
        E = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, E)
        self.embed_positions = nn.Embedding(config.max_position_embeddings, E)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(SparseTransformerBlock(config) for _ in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.lm_head = nn.Linear(E, config.vocab_size, bias=False)
        self._layouts: Dict[Tuple[int, str], BlockMask] = {}
        self.reset_parameters()
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_parameters(self) -> None:
        """GPT-2 style: normal(0, 0.02) projections and embeddings (output projections scaled by
        1/sqrt(2 * layers)), unit norms."""
        std = 0.02
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.ones_(p) if name.endswith("weight") else nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "ffn.down_proj")):
                nn.init.normal_(p, std=std / (2 * self.config.num_hidden_layers) ** 0.5)
            else:
                nn.init.normal_(p, std=std)

    def layout(self, seq_len: int, device) -> BlockMask:
        key = (seq_len, str(device))
        if key not in self._layouts:
            self._layouts[key] = build_layout(self.config, seq_len, device)
        return self._layouts[key]

    def check_ids(self, input_ids: Tensor) -> None:
        c = self.config
        check_token_ids("input_ids", input_ids, c.vocab_size)
        if input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must have N >= 1 tokens, got shape {tuple(input_ids.shape)}")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"input_ids has {input_ids.shape[1]} tokens, more than the context "
                             f"max_position_embeddings={c.max_position_embeddings}")

    def hidden_states(self, input_ids: Tensor) -> Tensor:
        """input_ids (B, N) -> final-norm hidden states (B, N, E)."""
        B, N = input_ids.shape
        layout = self.layout(N, input_ids.device)
        pos = torch.arange(N, device=input_ids.device)
        x = self.dropout(self.embed_tokens(input_ids) + self.embed_positions(pos))
        dt = autocast_dtype(x)
        if dt is not None:  # the residual stream in the autocast dtype, like the projections' outputs
            x = x.to(dt)
        for layer in self.layers:
            x = layer(x, layout)
        return self.norm(x)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> CausalLMOutput:
        self.check_ids(input_ids)
        return causal_lm_output(self.lm_head(self.hidden_states(input_ids)), labels, input_ids)

    def extra_repr(self) -> str:
        c = self.config
        return f"layout={c.layout!r}, block={c.block}, num_local_blocks={c.num_local_blocks}, norm={c.norm!r}"
