"""The Transformer (Vaswani et al. 2017) encoder-decoder on pyattn ops, with greedy and beam search.

Source and target tokens are packed (padding dropped, see ``_packing.Packing``); encoder
self-attention, masked decoder self-attention and cross-attention are ``pyattn.varlen_attention``
calls. Decoding keeps a KV cache per decoder layer, (B * beams, heads, max_len, D), and attends
over it with plain ``pyattn.attention``; cross-attention keys/values are computed once per source.
Embeddings are shared between source, target and the output projection (scaled by sqrt(d_model));
positions are the paper's sinusoids. LayerNorm, ReLU and the linear layers are ``torch.nn``
modules (pyattn has no LayerNorm op).

Equivalent plain PyTorch of a decoder layer (post-LN, one padded batch)::

    x = LN1(x + MHA(x, x, x, causal mask & target padding))
    x = LN2(x + MHA(x, memory, memory, source padding))
    x = LN3(x + W2 relu(W1 x))
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..attention import attention, varlen_attention
from ._packing import Packing
from .bert import _check_ids


@dataclass
class TransformerConfig:
    """Transformer-base by default (one vocabulary shared by source and target)."""

    vocab_size: int = 32000
    d_model: int = 512
    num_heads: int = 8
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1
    attention_dropout: float = 0.0
    label_smoothing: float = 0.1
    max_len: int = 1024  # longest source or target sequence (the sinusoid table)
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    norm_first: bool = False  # False: the paper's post-LN; True: pre-LN with a final LayerNorm
    layer_norm_eps: float = 1e-5
    backend: Optional[str] = None  # pyattn backend for every attention call

    def __post_init__(self):
        if self.d_model % self.num_heads != 0:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of num_heads ({self.num_heads})")
        for name in ("pad_id", "bos_id", "eos_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ValueError(f"{name} must be in [0, vocab_size={self.vocab_size}), got {getattr(self, name)}")


@dataclass
class Seq2SeqOutput:
    logits: Tensor  # (B, L, V), zeros at target padding
    loss: Optional[Tensor] = None


@dataclass
class BeamSearchOutput:
    sequences: Tensor  # (B, L) best hypothesis per source, EOS-terminated, pad_id after
    scores: Tensor  # (B,) its length-normalised log-probability
    hypotheses: List[List[Tuple[float, List[int]]]]  # per source: the kept (score, tokens), best first


def sinusoidal_positions(n: int, d: int) -> Tensor:
    """(n, d): PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)."""
    pos = torch.arange(n, dtype=torch.float64)[:, None]
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float64) * (-math.log(10000.0) / d))
    pe = torch.zeros(n, d, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : d // 2]
    return pe.float()


class Attention(nn.Module):
    """Multi-head attention on packed tokens through pyattn ops.

    forward(x (Tq, d), cu_q, max_q, k, v (Tk, heads, D), cu_k, max_k, causal) -> (Tq, d);
    ``kv(m)`` projects (Tk, d) keys/values; ``cached`` is one decoding step over a KV cache.
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        d = config.d_model
        self.heads, self.head_dim = config.num_heads, d // config.num_heads
        self.dropout, self.backend = config.attention_dropout, config.backend
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def kv(self, m: Tensor) -> Tuple[Tensor, Tensor]:
        return (self.k(m).view(-1, self.heads, self.head_dim), self.v(m).view(-1, self.heads, self.head_dim))

    def forward(self, x, cu_q, max_q, k, v, cu_k, max_k, causal: bool = False) -> Tensor:
        q = self.q(x).view(-1, self.heads, self.head_dim)  # (Tq, heads, D)
        o = varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal,
                             dropout_p=self.dropout if self.training else 0.0, backend=self.backend)
        return self.o(o.reshape(x.shape[0], -1))

    def cached(self, x: Tensor, k_cache: Tensor, v_cache: Tensor, pos: int) -> Tensor:
        """x (S, d): the token at position ``pos`` of each of S sequences; caches (S, heads, max_len, D)
        get this token's key/value at ``pos``; attends over positions 0..pos."""
        S = x.shape[0]
        k, v = self.kv(x)
        k_cache[:, :, pos] = k
        v_cache[:, :, pos] = v
        q = self.q(x).view(S, self.heads, 1, self.head_dim)
        o = attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], backend=self.backend)
        return self.o(o.reshape(S, -1))


class FeedForward(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.up, self.down = nn.Linear(config.d_model, config.d_ff), nn.Linear(config.d_ff, config.d_model)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.dropout(F.relu(self.up(x))))


class _Sublayers(nn.Module):
    """Residual + dropout + LayerNorm around each sublayer, post-LN or pre-LN."""

    def __init__(self, config: TransformerConfig, n: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.LayerNorm(config.d_model, eps=config.layer_norm_eps) for _ in range(n))
        self.dropout = nn.Dropout(config.dropout)
        self.norm_first = config.norm_first

    def apply(self, i: int, x: Tensor, fn) -> Tensor:
        if self.norm_first:
            return x + self.dropout(fn(self.norms[i](x)))
        return self.norms[i](x + self.dropout(fn(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.attn, self.ffn, self.sub = Attention(config), FeedForward(config), _Sublayers(config, 2)

    def forward(self, x: Tensor, src: Packing) -> Tensor:  # (Ts, d) -> (Ts, d)
        def self_attn(h):
            k, v = self.attn.kv(h)
            return self.attn(h, src.cu_seqlens, src.max_seqlen, k, v, src.cu_seqlens, src.max_seqlen)
        x = self.sub.apply(0, x, self_attn)
        return self.sub.apply(1, x, self.ffn)


class DecoderLayer(nn.Module):
    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.self_attn, self.cross_attn = Attention(config), Attention(config)
        self.ffn, self.sub = FeedForward(config), _Sublayers(config, 3)

    def forward(self, x: Tensor, tgt: Packing, cross_kv: Tuple[Tensor, Tensor], src_cu: Tensor, src_max: int,
                cache: Optional[Tuple[Tensor, Tensor]] = None, pos: int = 0) -> Tensor:
        """x (Tt, d) packed target tokens; with ``cache`` one token per sequence at position ``pos``."""
        def self_attn(h):
            if cache is not None:
                return self.self_attn.cached(h, cache[0], cache[1], pos)
            k, v = self.self_attn.kv(h)
            return self.self_attn(h, tgt.cu_seqlens, tgt.max_seqlen, k, v, tgt.cu_seqlens, tgt.max_seqlen, causal=True)

        x = self.sub.apply(0, x, self_attn)
        x = self.sub.apply(1, x, lambda h: self.cross_attn(h, tgt.cu_seqlens, tgt.max_seqlen, *cross_kv, src_cu, src_max))
        return self.sub.apply(2, x, self.ffn)


def _positions(keep: Tensor) -> Tensor:
    """(B, N) position of each real token within its sequence (whatever the padding side)."""
    return torch.cumsum(keep.long(), 1) - 1


class TransformerSeq2Seq(nn.Module):
    """Encoder-decoder Transformer with shared embeddings and a tied output projection.

    forward(src_ids (B, S), tgt_ids (B, L) decoder input starting with bos_id, labels (B, L)
    next tokens with -100 = ignored, src_mask / tgt_mask (1 keep / 0 pad; default: ids != pad_id))
    -> Seq2SeqOutput(logits (B, L, V), label-smoothed cross-entropy loss).
    """

    def __init__(self, config: TransformerConfig):
        super().__init__()
        if not isinstance(config, TransformerConfig):
            raise TypeError(f"config must be a TransformerConfig, got {type(config).__name__}")
        self.config = config
        d = config.d_model
        self.embed = nn.Embedding(config.vocab_size, d, padding_idx=config.pad_id)
        self.register_buffer("pe", sinusoidal_positions(config.max_len, d), persistent=False)
        self.dropout = nn.Dropout(config.dropout)
        self.encoder = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_encoder_layers))
        self.decoder = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_decoder_layers))
        self.enc_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        self.dec_norm = nn.LayerNorm(d, eps=config.layer_norm_eps) if config.norm_first else nn.Identity()
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.embed.weight, std=d ** -0.5)
        with torch.no_grad():
            self.embed.weight[config.pad_id].zero_()

    # ---- inputs --------------------------------------------------------------------------------
    def _keep(self, name: str, ids: Tensor, mask: Optional[Tensor]) -> Tensor:
        _check_ids(name, ids, self.config.vocab_size)
        if ids.shape[1] > self.config.max_len:
            raise ValueError(f"{name} has length {ids.shape[1]} > max_len={self.config.max_len} (the position table)")
        if mask is None:
            return ids != self.config.pad_id
        mask_name = name.replace("ids", "mask")
        if not isinstance(mask, Tensor):
            raise TypeError(f"{mask_name} must be a torch.Tensor, got {type(mask).__name__}")
        if tuple(mask.shape) != tuple(ids.shape):
            raise ValueError(f"{mask_name} must have the shape of {name} {tuple(ids.shape)}, got {tuple(mask.shape)}")
        return mask != 0

    def _embed(self, ids: Tensor, keep: Tensor, packing: Packing) -> Tensor:
        x = self.embed(packing.unpad(ids)) * math.sqrt(self.config.d_model)
        return self.dropout(x + self.pe[packing.unpad(_positions(keep))].to(x.dtype))  # (T, d)

    # ---- encoder / decoder on packed tokens --------------------------------------------------------
    def encode(self, src_ids: Tensor, src_mask: Optional[Tensor] = None) -> Tuple[Tensor, Packing]:
        """-> memory (Ts, d) packed source states, source Packing."""
        keep = self._keep("src_ids", src_ids, src_mask)
        src = Packing.from_mask(keep)
        x = self._embed(src_ids, keep, src)
        for layer in self.encoder:
            x = layer(x, src)
        return self.enc_norm(x), src

    def cross_kv(self, memory: Tensor) -> List[Tuple[Tensor, Tensor]]:
        """Per decoder layer, the cross-attention keys/values (Ts, heads, D) of the memory."""
        return [layer.cross_attn.kv(memory) for layer in self.decoder]

    def decode(self, x: Tensor, tgt: Packing, cross: List[Tuple[Tensor, Tensor]], src: Packing,
               caches=None, pos: int = 0) -> Tensor:
        """x (Tt, d) embedded target tokens -> (Tt, V) logits."""
        for i, layer in enumerate(self.decoder):
            x = layer(x, tgt, cross[i], src.cu_seqlens, src.max_seqlen, caches[i] if caches else None, pos)
        return F.linear(self.dec_norm(x), self.embed.weight)

    def forward(self, src_ids: Tensor, tgt_ids: Tensor, labels: Optional[Tensor] = None,
                src_mask: Optional[Tensor] = None, tgt_mask: Optional[Tensor] = None) -> Seq2SeqOutput:
        memory, src = self.encode(src_ids, src_mask)
        keep = self._keep("tgt_ids", tgt_ids, tgt_mask)
        if keep.shape[0] != src.batch:
            raise ValueError(f"tgt_ids batch size {keep.shape[0]} must equal src_ids batch size {src.batch}")
        tgt = Packing.from_mask(keep)
        logits = self.decode(self._embed(tgt_ids, keep, tgt), tgt, self.cross_kv(memory), src)  # (Tt, V)
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(tgt_ids.shape):
                raise ValueError(f"labels must have the shape of tgt_ids {tuple(tgt_ids.shape)}, got {tuple(labels.shape)}")
            loss = F.cross_entropy(logits.float(), tgt.unpad(labels), ignore_index=-100,
                                   label_smoothing=self.config.label_smoothing)
        return Seq2SeqOutput(tgt.pad(logits), loss)

    # ---- decoding ----------------------------------------------------------------------------------
    def _start(self, src_ids, src_mask, repeat: int):
        """Encode once; repeat each source ``repeat`` times (beams) as packed tokens."""
        memory, src = self.encode(src_ids, src_mask)
        if repeat > 1:
            lengths = (src.cu_seqlens[1:] - src.cu_seqlens[:-1]).long()
            start = src.cu_seqlens[:-1].long()
            # rows of source b, repeated for each beam: [b0 rows, b0 rows, ..., b1 rows, ...]
            rows = torch.cat([torch.arange(int(start[b]), int(start[b] + lengths[b]), device=memory.device)
                              .repeat(repeat) for b in range(src.batch)])
            memory = memory.index_select(0, rows)
            reps = lengths.repeat_interleave(repeat)
            cu = torch.zeros(reps.numel() + 1, dtype=torch.int32, device=memory.device)
            cu[1:] = torch.cumsum(reps, 0)
            src = Packing(src.batch * repeat, src.seqlen, cu, src.max_seqlen, None)
        return self.cross_kv(memory), src

    def _step_logprobs(self, prefix: Tensor, cross, src: Packing, caches) -> Tensor:
        """prefix (S, t) tokens so far (bos first) -> (S, V) fp32 log-probabilities of the next token
        (pad and bos excluded). With ``caches`` only the last token is run."""
        S, t = prefix.shape
        if caches is not None:
            x = self.embed(prefix[:, -1]) * math.sqrt(self.config.d_model) + self.pe[t - 1].to(self.embed.weight.dtype)
            logits = self.decode(x, Packing.full(S, 1, prefix.device), cross, src, caches, pos=t - 1)
        else:
            tgt = Packing.full(S, t, prefix.device)
            keep = torch.ones_like(prefix, dtype=torch.bool)
            logits = self.decode(self._embed(prefix, keep, tgt), tgt, cross, src)[t - 1:: t]
        logits = logits.float()
        logits[:, [self.config.pad_id, self.config.bos_id]] = float("-inf")
        return torch.log_softmax(logits, -1)

    def _new_caches(self, S: int, max_len: int, device, dtype):
        c = self.config
        shape = (S, c.num_heads, max_len, c.d_model // c.num_heads)
        return [(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))
                for _ in self.decoder]

    def _max_len(self, max_len: Optional[int]) -> int:
        max_len = self.config.max_len if max_len is None else max_len
        if isinstance(max_len, bool) or not isinstance(max_len, int) or not 1 <= max_len <= self.config.max_len:
            raise ValueError(f"max_len must be an int in [1, {self.config.max_len}], got {max_len!r}")
        return max_len

    @torch.no_grad()
    def greedy(self, src_ids: Tensor, src_mask: Optional[Tensor] = None, max_len: Optional[int] = None,
               use_cache: bool = True) -> Tensor:
        """(B, S) -> (B, <= max_len) argmax tokens (bos not included), pad_id after each EOS."""
        max_len = self._max_len(max_len)
        c = self.config
        cross, src = self._start(src_ids, src_mask, 1)
        B = src.batch
        prefix = torch.full((B, 1), c.bos_id, dtype=torch.long, device=src_ids.device)
        caches = self._new_caches(B, max_len, src_ids.device, self.embed.weight.dtype) if use_cache else None
        ended = torch.zeros(B, dtype=torch.bool, device=src_ids.device)
        for _ in range(max_len):
            nxt = self._step_logprobs(prefix, cross, src, caches).argmax(-1)
            nxt = torch.where(ended, torch.full_like(nxt, c.pad_id), nxt)
            prefix = torch.cat([prefix, nxt[:, None]], 1)
            ended |= nxt == c.eos_id
            if bool(ended.all()):
                break
        return prefix[:, 1:]

    @torch.no_grad()
    def beam_search(self, src_ids: Tensor, src_mask: Optional[Tensor] = None, num_beams: int = 4,
                    max_len: Optional[int] = None, length_penalty: float = 0.6,
                    use_cache: bool = True) -> BeamSearchOutput:
        """Beam search with GNMT's length penalty: a hypothesis of n tokens (EOS included) scores
        sum(log p) / ((5 + n) / 6) ** length_penalty. Every EOS continuation of a live beam becomes a
        finished hypothesis (the best ``num_beams`` are kept); a source stops early once no live beam
        can still beat its ``num_beams``-th finished one. At ``max_len`` live beams end unfinished."""
        from .beam import run_beam_search
        if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
            raise ValueError(f"num_beams must be a positive int, got {num_beams!r}")
        return run_beam_search(self, src_ids, src_mask, num_beams, self._max_len(max_len), float(length_penalty),
                               use_cache)


__all__ = ["TransformerConfig", "TransformerSeq2Seq", "Seq2SeqOutput", "BeamSearchOutput", "sinusoidal_positions"]
