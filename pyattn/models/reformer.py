"""Reformer (Kitaev et al. 2020) language model built from pyattn ops.

Pieces: axial position embeddings, reversible residual layers ``y1 = x1 + Attn(x2)``,
``y2 = x2 + FFN(y1)`` whose backward rebuilds each layer's inputs from its outputs (activation
memory does not grow with depth), LSH attention (``pyattn.lsh_attention``) and chunked local
attention (``pyattn.block_sparse_attention`` through :class:`pyattn.nn.LocalSelfAttention`) mixed
per layer by ``attn_layers``, and a chunked feed-forward. Module and parameter names follow
transformers' ``ReformerModelWithLMHead``, so its state dicts load unchanged.

Shapes: B batch, N tokens, E hidden size, H heads, D head size, F feed-forward size, V vocab.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..nn.local import LocalSelfAttention
from ..nn.lsh import LSHSelfAttention
from ._lm import CausalLMOutput

_ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "silu": F.silu, "swish": F.silu,
                "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _prob(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")


@dataclass
class ReformerConfig:
    """Field names and defaults are transformers' ``ReformerConfig`` (except ``is_decoder``: True,
    as ``ReformerModelWithLMHead`` requires); ``reversible`` and ``backend`` are pyattn's."""

    vocab_size: int = 320
    hidden_size: int = 256
    num_attention_heads: int = 12
    attention_head_size: int = 64
    attn_layers: Tuple[str, ...] = ("local", "lsh", "local", "lsh", "local", "lsh")
    feed_forward_size: int = 512
    hidden_act: str = "relu"
    hidden_dropout_prob: float = 0.05
    layer_norm_eps: float = 1e-12
    num_hashes: int = 1
    num_buckets: Optional[Union[int, List[int]]] = None
    lsh_attn_chunk_length: int = 64
    lsh_num_chunks_before: int = 1
    lsh_num_chunks_after: int = 0
    lsh_attention_probs_dropout_prob: float = 0.0
    hash_seed: Optional[int] = None
    local_attn_chunk_length: int = 64
    local_num_chunks_before: int = 1
    local_num_chunks_after: int = 0
    local_attention_probs_dropout_prob: float = 0.05
    is_decoder: bool = True
    axial_pos_embds: bool = True
    axial_pos_shape: Tuple[int, ...] = (64, 64)
    axial_pos_embds_dim: Tuple[int, ...] = (64, 192)
    axial_norm_std: float = 1.0
    max_position_embeddings: int = 4096
    chunk_size_feed_forward: int = 0
    chunk_size_lm_head: int = 0
    pad_token_id: int = 0
    initializer_range: float = 0.02
    reversible: bool = True  # False: plain residual autograd (same numbers, activations kept per layer)
    backend: Optional[str] = None  # pyattn backend for the attention ops (None: dispatch picks)

    def __post_init__(self):
        self.attn_layers = tuple(self.attn_layers)
        self.axial_pos_shape = tuple(self.axial_pos_shape)
        self.axial_pos_embds_dim = tuple(self.axial_pos_embds_dim)
        if isinstance(self.num_buckets, (list, tuple)):
            self.num_buckets = list(self.num_buckets)
        for name in ("vocab_size", "hidden_size", "num_attention_heads", "attention_head_size", "feed_forward_size",
                     "num_hashes", "lsh_attn_chunk_length", "local_attn_chunk_length", "max_position_embeddings"):
            _int(name, getattr(self, name), 1)
        for name in ("lsh_num_chunks_before", "lsh_num_chunks_after", "local_num_chunks_before",
                     "local_num_chunks_after", "chunk_size_feed_forward", "chunk_size_lm_head", "pad_token_id"):
            _int(name, getattr(self, name), 0)
        for name in ("hidden_dropout_prob", "lsh_attention_probs_dropout_prob", "local_attention_probs_dropout_prob"):
            _prob(name, getattr(self, name))
        if not self.attn_layers or any(t not in ("lsh", "local") for t in self.attn_layers):
            raise ValueError(f"attn_layers must be a non-empty list of 'lsh' / 'local', got {list(self.attn_layers)}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(_ACTIVATIONS)}, got {self.hidden_act!r}")
        nb = self.num_buckets
        factors = nb if isinstance(nb, list) else [nb] if nb is not None else []
        if isinstance(nb, list) and not nb:
            raise ValueError("num_buckets as a list must hold at least one factor, got []")
        if any(isinstance(f, bool) or not isinstance(f, int) or f < 2 or f % 2 for f in factors):
            raise ValueError(f"num_buckets must be None, an even int >= 2 or a list of them, got {nb!r}")
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id must be < vocab_size ({self.vocab_size}), got {self.pad_token_id}")
        if self.axial_pos_embds:
            if len(self.axial_pos_shape) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                                     for s in self.axial_pos_shape):
                raise ValueError(f"axial_pos_shape must be two positive ints, got {list(self.axial_pos_shape)}")
            if len(self.axial_pos_embds_dim) != 2 or sum(self.axial_pos_embds_dim) != self.hidden_size:
                raise ValueError(f"axial_pos_embds_dim must be two ints summing to hidden_size ({self.hidden_size}), "
                                 f"got {list(self.axial_pos_embds_dim)}")
        for kind in ("local", "lsh"):
            after = getattr(self, f"{kind}_num_chunks_after")
            if self.is_decoder and kind in self.attn_layers and after:
                raise ValueError(f"{kind}_num_chunks_after must be 0 when is_decoder (causal), got {after}")

    @property
    def num_hidden_layers(self) -> int:
        return len(self.attn_layers)

    def chunk_lengths(self) -> Tuple[int, int]:
        """(least common multiple, minimum) of the chunk lengths of the attention types in use."""
        lengths = {{"lsh": self.lsh_attn_chunk_length, "local": self.local_attn_chunk_length}[t]
                   for t in self.attn_layers}
        lcm = 1
        for length in lengths:
            lcm = lcm * length // math.gcd(lcm, length)
        return lcm, min(lengths)

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "ReformerConfig":
        """From a transformers ``config.json`` dict (``model_type`` "reformer")."""
        if d.get("model_type", "reformer") != "reformer":
            raise ValueError(f"config model_type must be 'reformer', got {d.get('model_type')!r}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_hf_config(cls, config, **overrides) -> "ReformerConfig":
        """From a ``transformers.ReformerConfig`` object."""
        return cls.from_hf_dict(config.to_dict(), **overrides)


# ------------------------------------------------------------------ embeddings
class AxialPositionEmbeddings(nn.Module):
    """Position p = (i, j) with p = i * s1 + j gets cat(W0[i], W1[j]): (s0 + s1) rows instead of
    s0 * s1. ``weights.0`` (s0, 1, d0), ``weights.1`` (1, s1, d1), d0 + d1 = E (transformers' layout).
    In training, dropout drops whole axis-1 columns of the table (transformers' dropout2d)."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.axial_pos_shape = config.axial_pos_shape
        self.dropout = config.hidden_dropout_prob
        self.weights = nn.ParameterList()
        for axis, dim in enumerate(config.axial_pos_embds_dim):
            shape = [1] * len(self.axial_pos_shape)
            shape[axis] = self.axial_pos_shape[axis]
            self.weights.append(nn.Parameter(torch.ones(*shape, dim)))

    def forward(self, position_ids: Tensor) -> Tensor:
        """position_ids (B, N) -> (B, N, E)."""
        B = position_ids.shape[0]
        s0, s1 = self.axial_pos_shape
        if int(position_ids.max()) >= s0 * s1:
            raise ValueError(f"positions must be < prod(axial_pos_shape) = {s0 * s1}, got {int(position_ids.max())}")
        table = torch.cat([w.expand(1, s0, s1, w.shape[-1]) for w in self.weights], -1)  # (1, s0, s1, E)
        if self.training and self.dropout > 0:
            table = F.dropout2d(table.expand(B, -1, -1, -1).transpose(2, 1), self.dropout, True).transpose(2, 1)
        table = table.reshape(table.shape[0], s0 * s1, -1)
        idx = position_ids.unsqueeze(-1).expand(B, -1, table.shape[-1])
        return table.expand(B, -1, -1).gather(1, idx)


class PositionEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, position_ids: Tensor) -> Tensor:
        return F.dropout(self.embedding(position_ids), self.dropout, self.training)


class ReformerEmbeddings(nn.Module):
    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = (AxialPositionEmbeddings(config) if config.axial_pos_embds
                                    else PositionEmbeddings(config))

    def forward(self, input_ids: Tensor, position_ids: Tensor) -> Tensor:
        x = F.dropout(self.word_embeddings(input_ids), self.dropout, self.training)
        return x + self.position_embeddings(position_ids)


# ------------------------------------------------------------------ layer: f = attention, g = feed-forward
class _Dense(nn.Module):
    """Holds ``dense`` (transformers' module nesting, so the parameter names match)."""

    def __init__(self, n_in: int, n_out: int, bias: bool):
        super().__init__()
        self.dense = nn.Linear(n_in, n_out, bias=bias)


class ReformerAttention(nn.Module):
    """f(x) = dropout(output.dense(self_attention(layer_norm(x)))): (B, N, E) -> (B, N, E)."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.dropout = config.hidden_dropout_prob
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        cls = LSHSelfAttention if kind == "lsh" else LocalSelfAttention
        self.self_attention = cls.from_config(config, backend=config.backend)
        self.output = _Dense(config.num_attention_heads * config.attention_head_size, config.hidden_size, False)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor]) -> Tensor:
        return self.forward_and_sort(x, key_padding_mask)[0]

    def forward_and_sort(self, x: Tensor, key_padding_mask: Optional[Tensor],
                         sort: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """f(x) and, for LSH attention, its bucket sort order (int64 (B, H, R * N), None for local
        attention); given ``sort`` (from the forward), a recomputation reuses it instead of hashing."""
        h = self.layer_norm(x)
        if isinstance(self.self_attention, LSHSelfAttention):
            h, sort = self.self_attention.forward_and_sort(h, key_padding_mask=key_padding_mask, sort=sort)
        else:
            h = self.self_attention(h, key_padding_mask=key_padding_mask)
        return F.dropout(self.output.dense(h), self.dropout, self.training), sort


class ChunkFeedForward(nn.Module):
    """g(x) = dropout(W2 act(dropout(W1 layer_norm(x)))), position-wise, run ``chunk_size`` tokens
    at a time (0 = all at once): the (B, chunk, F) intermediate is the largest tensor."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size_feed_forward
        self.dropout = config.hidden_dropout_prob
        self.act = _ACTIVATIONS[config.hidden_act]
        self.layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dense = _Dense(config.hidden_size, config.feed_forward_size, True)
        self.output = _Dense(config.feed_forward_size, config.hidden_size, True)

    def forward_chunk(self, x: Tensor) -> Tensor:
        h = F.dropout(self.dense.dense(self.layer_norm(x)), self.dropout, self.training)
        return F.dropout(self.output.dense(self.act(h)), self.dropout, self.training)

    def slices(self, n: int) -> List[slice]:
        step = self.chunk_size if self.chunk_size > 0 else max(n, 1)
        return [slice(i, min(i + step, n)) for i in range(0, n, step)]

    def forward(self, x: Tensor) -> Tensor:
        parts = [self.forward_chunk(x[:, s]) for s in self.slices(x.shape[1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class ReformerLayer(nn.Module):
    """One reversible layer: (x1, x2) -> (y1, y2) = (x1 + f(x2), x2 + g(y1))."""

    def __init__(self, config: ReformerConfig, kind: str):
        super().__init__()
        self.attention = ReformerAttention(config, kind)
        self.feed_forward = ChunkFeedForward(config)

    def forward(self, x1: Tensor, x2: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        y1 = x1 + self.attention(x2, key_padding_mask)
        return y1, x2 + self.feed_forward(y1)


# ------------------------------------------------------------------ reversible stack
def _rng_state(device: torch.device):
    """torch's CPU RNG state, plus the device's when on CUDA: dropout seeds and rotations drawn
    without a seed come from these, so replaying them reproduces the forward exactly."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


class _Replay:
    """Context that runs its body from a recorded RNG state and restores the current one after."""

    def __init__(self, state, device: torch.device):
        self.state, self.device = state, device

    def __enter__(self):
        self.fork = torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else [])
        self.fork.__enter__()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state(self.state[1], self.device)

    def __exit__(self, *exc):
        return self.fork.__exit__(*exc)


def _params(module: nn.Module) -> List[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


class _ReversibleFunction(torch.autograd.Function):
    """Runs the layers without storing activations; backward walks them in reverse, rebuilding
    x2 = y2 - g(y1) and x1 = y1 - f(x2) from the outputs (each f / g recomputed once under its
    recorded RNG state, LSH layers with the bucket order of the forward) and returns the
    parameters' gradients as outputs of the function (so ``torch.autograd.grad`` and gradient
    hooks see them). Kept per layer: two RNG states and, for LSH layers, the int64 sort order
    (B, H, R * N): O(N), no activation."""

    @staticmethod
    def forward(ctx, x1, x2, layers, key_padding_mask, *params):
        saved = []
        for layer in layers:
            s_f = _rng_state(x1.device)
            fx, sort = layer.attention.forward_and_sort(x2, key_padding_mask)
            x1 = x1 + fx
            s_g = _rng_state(x1.device)
            x2 = x2 + layer.feed_forward(x1)
            saved.append((s_f, s_g, sort))
        ctx.layers, ctx.saved, ctx.kpm = layers, saved, key_padding_mask
        ctx.index = {id(p): i for i, p in enumerate(params)}
        ctx.save_for_backward(x1, x2)
        return x1, x2

    @staticmethod
    def backward(ctx, dy1, dy2):
        y1, y2 = ctx.saved_tensors
        grads: List[Optional[Tensor]] = [None] * len(ctx.index)

        def add(ps, gs):
            for p, g in zip(ps, gs):
                if g is not None:
                    i = ctx.index[id(p)]
                    grads[i] = g if grads[i] is None else grads[i] + g

        dev = y1.device
        for layer, (s_f, s_g, sort) in zip(reversed(ctx.layers), reversed(ctx.saved)):
            ff, gp = layer.feed_forward, _params(layer.feed_forward)
            slices = ff.slices(y1.shape[1])
            gy, dy1_parts = [], []
            with _Replay(s_g, dev):  # g is position-wise: recompute and differentiate one chunk at a time
                for s in slices:
                    with torch.enable_grad():
                        yc = (y1 if len(slices) == 1 else y1[:, s]).detach().requires_grad_()
                        out = ff.forward_chunk(yc)
                        g = torch.autograd.grad(out, [yc] + gp, dy2 if len(slices) == 1 else dy2[:, s],
                                                allow_unused=True)
                    gy.append(out.detach())
                    dy1_parts.append(g[0])
                    add(gp, g[1:])
            x2 = y2 - (gy[0] if len(gy) == 1 else torch.cat(gy, 1))
            dy1 = dy1 + (dy1_parts[0] if len(dy1_parts) == 1 else torch.cat(dy1_parts, 1))
            del gy, dy1_parts
            fp = _params(layer.attention)
            with _Replay(s_f, dev), torch.enable_grad():
                xc = x2.detach().requires_grad_()
                out, _ = layer.attention.forward_and_sort(xc, ctx.kpm, sort)
                g = torch.autograd.grad(out, [xc] + fp, dy1, allow_unused=True)
            add(fp, g[1:])
            y1, y2, dy2 = y1 - out.detach(), x2, dy2 + g[0]
        return (dy1, dy2, None, None, *grads)


class ReformerEncoder(nn.Module):
    """(B, N, E) -> (B, N, 2E): x1 = x2 = x through the layers, then LayerNorm(cat(y1, y2))."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.reversible = config.reversible
        self.dropout = config.hidden_dropout_prob
        self.layers = nn.ModuleList(ReformerLayer(config, kind) for kind in config.attn_layers)
        self.layer_norm = nn.LayerNorm(2 * config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None,
                reversible: Optional[bool] = None) -> Tensor:
        reversible = self.reversible if reversible is None else reversible
        if reversible and torch.is_grad_enabled():
            y1, y2 = _ReversibleFunction.apply(x, x, self.layers, key_padding_mask, *_params(self.layers))
        else:
            y1, y2 = x, x
            for layer in self.layers:
                y1, y2 = layer(y1, y2, key_padding_mask)
        return F.dropout(self.layer_norm(torch.cat([y1, y2], -1)), self.dropout, self.training)


class ReformerModel(nn.Module):
    """input_ids (B, N) -> hidden states (B, N, 2E). Sequences longer than the shortest chunk and
    not a multiple of the chunk lengths' least common multiple are padded with ``pad_token_id``
    and masked (as transformers does in evaluation; here also in training), then cut back."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.config = config
        self.embeddings = ReformerEmbeddings(config)
        self.encoder = ReformerEncoder(config)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                reversible: Optional[bool] = None) -> Tensor:
        cfg = self.config
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids must be an int64/int32 tensor, got "
                            f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be 2-D (B, N), got shape {tuple(input_ids.shape)}")
        if attention_mask is not None:
            if key_padding_mask is not None:
                raise ValueError("give key_padding_mask (True = pad) or attention_mask (1 = keep), not both")
            key_padding_mask = attention_mask == 0
        B, N = input_ids.shape
        if key_padding_mask is not None and tuple(key_padding_mask.shape) != (B, N):
            raise ValueError(f"key_padding_mask must have shape (B, N) = {(B, N)}, got {tuple(key_padding_mask.shape)}")
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(N, device=dev).expand(B, N)
        lcm, shortest = cfg.chunk_lengths()
        Np = -(-N // lcm) * lcm if (N % lcm and N > shortest) else N
        if Np > cfg.max_position_embeddings:
            raise ValueError(f"sequence length {Np} (input_ids padded to a multiple of {lcm}) must be <= "
                             f"max_position_embeddings ({cfg.max_position_embeddings})")
        if Np != N:
            pad = Np - N
            input_ids = torch.cat([input_ids, input_ids.new_full((B, pad), cfg.pad_token_id)], 1)
            position_ids = torch.cat([position_ids, torch.arange(N, Np, device=dev).expand(B, pad)], 1)
            base = key_padding_mask if key_padding_mask is not None else torch.zeros(B, N, dtype=torch.bool,
                                                                                      device=dev)
            key_padding_mask = torch.cat([base, torch.ones(B, pad, dtype=torch.bool, device=dev)], 1)
        h = self.encoder(self.embeddings(input_ids, position_ids), key_padding_mask, reversible)
        return h[:, :N] if Np != N else h


class ReformerOnlyLMHead(nn.Module):
    """(B, N, 2E) -> (B, N, V) by ``decoder``, ``chunk_size`` tokens at a time (0 = all). ``bias``
    is a buffer kept for checkpoint compatibility: transformers' forward does not use it either."""

    def __init__(self, config: ReformerConfig):
        super().__init__()
        self.chunk_size = config.chunk_size_lm_head
        self.decoder = nn.Linear(2 * config.hidden_size, config.vocab_size, bias=True)
        self.register_buffer("bias", torch.zeros(config.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        if self.chunk_size <= 0 or h.shape[1] <= self.chunk_size:
            return self.decoder(h)
        return torch.cat([self.decoder(c) for c in h.split(self.chunk_size, 1)], 1)


class ReformerLM(nn.Module):
    """Reformer causal language model (transformers' ``ReformerModelWithLMHead``).

    ``forward(input_ids (B, N), labels=None, attention_mask=None | key_padding_mask=None)`` ->
    :class:`CausalLMOutput` with logits (B, N, V) and, given labels, the next-token cross-entropy
    (labels -100 ignored). :meth:`from_pretrained` loads a transformers checkpoint directory and
    gives its logits (eval mode; LSH layers need ``hash_seed`` for both sides to draw the same
    rotations). Training runs the reversible stack (``config.reversible``): the layers' activations
    are rebuilt in backward instead of stored.

    Deviations from transformers: dropout inside attention uses pyattn's counter-based masks;
    sequences that need padding to the chunk multiple are padded in training too (transformers
    raises); LSH ``num_buckets=None`` is resolved per call (transformers keeps the first call's).
    """

    def __init__(self, config: ReformerConfig):
        super().__init__()
        if not isinstance(config, ReformerConfig):
            raise TypeError(f"config must be a pyattn.models.ReformerConfig, got {type(config).__name__} "
                            "(ReformerConfig.from_hf_config converts a transformers one)")
        if not config.is_decoder:
            raise ValueError("ReformerLM is a causal LM: config.is_decoder must be True, got False")
        self.config = config
        self.reformer = ReformerModel(config)
        self.lm_head = ReformerOnlyLMHead(config)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, AxialPositionEmbeddings):
            for w in m.weights:
                nn.init.normal_(w, std=self.config.axial_norm_std)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, position_ids: Optional[Tensor] = None,
                reversible: Optional[bool] = None) -> CausalLMOutput:
        h = self.reformer(input_ids, attention_mask, key_padding_mask, position_ids, reversible)
        logits = self.lm_head(h)
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, "
                                 f"got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(logits=logits, loss=loss)

    @classmethod
    def from_hf_state_dict(cls, state_dict, config: ReformerConfig) -> "ReformerLM":
        """A model with ``state_dict`` (transformers' ``ReformerModelWithLMHead`` names) loaded;
        every missing, unexpected or mis-shaped key is named in the ValueError."""
        model = cls(config)
        own = model.state_dict()
        missing = sorted(own.keys() - state_dict.keys())
        unexpected = sorted(state_dict.keys() - own.keys())
        shapes = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}" for k, v in own.items()
                  if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
        if missing or unexpected or shapes:
            raise ValueError(f"state dict does not match the {config.num_hidden_layers}-layer ReformerLM "
                             f"(attn_layers {list(config.attn_layers)}): missing keys {missing[:8]}, "
                             f"unexpected keys {unexpected[:8]}, shape mismatches {shapes[:8]}")
        model.load_state_dict(state_dict)
        dtype = next(iter(state_dict.values())).dtype
        return model.to(dtype if dtype.is_floating_point else torch.float32)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "ReformerLM":
        """Load a local transformers ``ReformerModelWithLMHead`` directory (config.json and
        safetensors / pytorch_model.bin; no network). ``overrides`` set config fields (``backend``...)."""
        from .hf_loading import read_hf_state_dict

        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise ValueError(f"no config.json in {str(path)!r}")
        config = ReformerConfig.from_hf_dict(json.loads(cfg_file.read_text()), **overrides)
        return cls.from_hf_state_dict(read_hf_state_dict(path), config)


__all__ = ["ReformerConfig", "ReformerLM", "ReformerModel", "ReformerLayer", "AxialPositionEmbeddings",
           "ChunkFeedForward"]
