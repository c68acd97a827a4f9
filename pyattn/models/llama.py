"""A LLaMA-style decoder (Llama, Mistral, Qwen2 checkpoints) built from pyattn ops.

Pre-norm blocks: ``h = x + Attn(RMSNorm(x))``, ``y = h + SwiGLU(RMSNorm(h))`` with the second
norm fused with its residual add (``pyattn.rms_norm(..., residual=)``), rotary positions, GQA,
causal or sliding-window attention through ``pyattn.attention`` (generation: ``pyattn.varlen_attention``
for the prompts, ``pyattn.decode_attention`` over a ``pyattn.PagedKVCache`` per new token),
and the feed-forward through ``pyattn.glu_ffn``. Parameter names follow Hugging Face's
``LlamaForCausalLM`` except the stacked ``mlp.gate_up_proj`` (see :mod:`pyattn.models.hf_loading`).

Shapes: B batch, N tokens, E hidden size, H query heads, Hkv key/value heads, D head dim.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..attention import attention
from ..nn.glu import HF_ACTIVATIONS, GLUFeedForward
from ..nn.rms_norm import RMSNorm
from ._lm import CausalLMOutput, causal_lm_output, check_token_ids  # noqa: F401 (CausalLMOutput re-exported)


@dataclass
class LlamaConfig:
    """Covers Llama (1-3.x), Mistral and Qwen2 checkpoints; field names are Hugging Face's."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None  # {"rope_type": "linear"|"llama3", ...} or None
    qkv_bias: bool = False  # Llama's attention_bias; always True for Qwen2
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: Optional[int] = None  # Mistral/Qwen2: a key is visible when q - k < sliding_window
    layer_types: Optional[List[str]] = None  # Qwen2: "full_attention" | "sliding_attention" per layer
    tie_word_embeddings: bool = False
    pad_token_id: Optional[int] = None
    bos_token_id: Optional[int] = 1
    eos_token_id: Optional[object] = 2
    attention_dropout: float = 0.0
    backend: Optional[str] = None  # pyattn backend for every op (None: dispatch picks)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                                 f"({self.num_attention_heads}) when head_dim is not given")
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.hidden_act not in HF_ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {sorted(HF_ACTIVATIONS)}, got {self.hidden_act!r}")
        rope_type = (self.rope_scaling or {}).get("rope_type", (self.rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope_scaling type {rope_type!r} is not supported (supported: default, linear, llama3)")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types must have num_hidden_layers ({self.num_hidden_layers}) entries, "
                             f"got {len(self.layer_types)}")

    @classmethod
    def from_hf_dict(cls, d: dict, **overrides) -> "LlamaConfig":
        """From a Hugging Face ``config.json`` dict of a Llama, Mistral or Qwen2 model."""
        model_type = d.get("model_type", "llama")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"config model_type must be 'llama', 'mistral' or 'qwen2', got {model_type!r}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        rope = d.get("rope_parameters") or {}
        if "rope_theta" in rope:
            kw["rope_theta"] = rope["rope_theta"]
        scaling = d.get("rope_scaling") or ({k: v for k, v in rope.items() if k != "rope_theta"} if rope else None)
        if scaling and scaling.get("rope_type", scaling.get("type", "default")) == "default":
            scaling = None
        kw["rope_scaling"] = scaling
        if model_type == "qwen2":
            kw["qkv_bias"] = True
            if not d.get("use_sliding_window", False):
                kw["sliding_window"] = None
                kw["layer_types"] = None
        else:
            kw["qkv_bias"] = kw["o_bias"] = bool(d.get("attention_bias", False))
            kw.pop("layer_types", None)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """(D/2,) fp32 inverse frequencies, with the checkpoint's rope scaling applied."""
    D = config.head_dim
    inv = 1.0 / (config.rope_theta ** (torch.arange(0, D, 2, dtype=torch.int64).float() / D))
    sc = config.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / sc["factor"]
    elif kind == "llama3":
        factor, lo, hi = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = torch.where(medium, smoothed, scaled)
    return inv


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, N, H, D); cos, sin (B, N, 1, D) -> x rotated (the rotate-half convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class LlamaAttention(nn.Module):
    def __init__(self, config: LlamaConfig, window: Optional[int]):
        super().__init__()
        c = config
        self.config = c
        self.window = window
        H, Hkv, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, H * D, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.hidden_size, Hkv * D, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.hidden_size, Hkv * D, bias=c.qkv_bias)
        self.o_proj = nn.Linear(H * D, c.hidden_size, bias=c.o_bias)

    def _window(self):
        return None if self.window is None else (self.window - 1, 0)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (B, N, E) -> q (B, N, H, D), k and v (B, N, Hkv, D), rotary applied to q and k."""
        c = self.config
        B, N, _ = x.shape
        q = self.q_proj(x).view(B, N, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).view(B, N, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).view(B, N, c.num_key_value_heads, c.head_dim)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, layer: int = 0) -> Tensor:
        """x (B, N, E) -> (B, N, E). ``cache``: None (full causal forward) or the generation cache
        (:class:`pyattn.models.generation.PagedGenerationCache`) holding this call's earlier tokens."""
        B, N, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        p = self.config.attention_dropout if self.training else 0.0
        if cache is None:  # training / full forward: (B, N, H, D) views as (B, H, N, D), no copy
            out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True,
                            window=self._window(), dropout_p=p, backend=self.config.backend).transpose(1, 2)
        else:
            out = cache.attend(layer, q, k, v, self._window(), self.config.backend)
        return self.o_proj(out.reshape(B, N, -1))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        c = config
        sliding = c.sliding_window is not None and (c.layer_types is None or c.layer_types[layer_idx] == "sliding_attention")
        self.self_attn = LlamaAttention(c, c.sliding_window if sliding else None)
        self.mlp = GLUFeedForward(c.hidden_size, c.intermediate_size, HF_ACTIVATIONS[c.hidden_act], bias=c.mlp_bias,
                                  backend=c.backend)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend=c.backend)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, backend=c.backend)

    def forward(self, x, cos, sin, cache=None, layer=0):
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        y, h = self.post_attention_layernorm(a, residual=x)  # h = x + a, y = RMSNorm(h)
        return h + self.mlp(y)


class LlamaForCausalLM(nn.Module):
    """Decoder LM. ``forward(input_ids (B, N), labels=None)`` -> :class:`CausalLMOutput`.

    Equivalent Hugging Face model: ``transformers.LlamaForCausalLM`` (Mistral/Qwen2 with their
    configs); :meth:`from_pretrained` loads their checkpoints and gives the same logits.
    """

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, backend=config.backend)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self.apply(self._init)

    def _init(self, m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        """positions (B, N) int -> cos, sin (B, N, 1, D) in ``dtype``."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def check_ids(self, input_ids: Tensor) -> None:
        check_token_ids("input_ids", input_ids, self.config.vocab_size)

    def hidden_states(self, input_ids: Tensor, positions: Optional[Tensor] = None, cache=None) -> Tensor:
        B, N = input_ids.shape
        if positions is None:
            positions = torch.arange(N, device=input_ids.device).expand(B, N)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, cache, i)
        return self.norm(x)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None) -> CausalLMOutput:
        self.check_ids(input_ids)
        return causal_lm_output(self.lm_head(self.hidden_states(input_ids)), labels, input_ids)

    @classmethod
    def from_pretrained(cls, path, **overrides) -> "LlamaForCausalLM":
        """Load a local Hugging Face Llama/Mistral/Qwen2 checkpoint directory (no network)."""
        from .hf_loading import load_llama

        return load_llama(cls, path, **overrides)

    def generate(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
        """See :func:`pyattn.models.generation.generate`."""
        from .generation import generate

        return generate(self, input_ids, attention_mask, **kwargs)

