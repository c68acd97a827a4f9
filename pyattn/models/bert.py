"""BERT (Devlin et al. 2019) on pyattn ops, and the modules RoBERTa, ALBERT and ELECTRA reuse.

The encoder runs on the packed real tokens of a batch (see ``_packing.Packing``): embeddings are
looked up for the T real tokens only, every layer works on (T, H) and attention is
``pyattn.varlen_attention``, so nothing is computed for padding. Outputs are padded back to
(B, N, ...) with zeros at the padding (transformers leaves values there that depend on nothing).

Attention goes through pyattn's ops (any backend, ``config.backend``); LayerNorm, GELU and the
linear layers are ``torch.nn`` modules (pyattn has no LayerNorm op). Parameter names are pyattn's
own (Q, K and V in one ``qkv`` matrix: one GEMM); ``checkpoint.py`` maps Hugging Face names.

Equivalent plain PyTorch of one encoder layer (post-LayerNorm), x (B, N, H)::

    q, k, v = (x @ Wqkv.T + bqkv).view(B, N, 3, heads, D).permute(2, 0, 3, 1, 4)
    a = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])
    x = LN1(x + (a.transpose(1, 2).reshape(B, N, H) @ Wo.T + bo))
    x = LN2(x + gelu(x @ W1.T + b1) @ W2.T + b2)
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._validate import check_probability
from ..attention import attention, varlen_attention
from ._lm import check_token_ids
from ._packing import Packing

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "relu": F.relu,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class BertConfig:
    """BERT hyper-parameters; field names are those of Hugging Face's ``BertConfig``.

    Extra fields used by the other families: ``embedding_size`` (E; None = hidden_size; E != H
    adds an E -> H projection after the embeddings: ALBERT, ELECTRA), ``num_hidden_groups``
    (None = one layer per depth; k = k distinct layers shared across the depth: ALBERT),
    ``positions_from_padding`` (RoBERTa: positions count real tokens from pad_token_id + 1),
    ``head_act`` (activation of the MLM head transform; None = hidden_act), ``backend``
    (pyattn backend for every attention call; None = the fastest that fits).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    embedding_size: Optional[int] = None
    num_hidden_groups: Optional[int] = None
    positions_from_padding: bool = False
    head_act: Optional[str] = None
    num_labels: int = 2
    classifier_dropout: Optional[float] = None
    backend: Optional[str] = None

    model_type = "bert"  # class attribute (not a field): the Hugging Face model_type

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_position_embeddings"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            check_probability(name, getattr(self, name))
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                             f"({self.num_attention_heads})")
        for act in (self.hidden_act, self.head_act):
            if act is not None and act not in ACTIVATIONS:
                raise ValueError(f"hidden_act/head_act must be one of {sorted(ACTIVATIONS)}, got {act!r}")
        groups = self.num_hidden_groups
        if groups is not None and not 1 <= groups <= self.num_hidden_layers:
            raise ValueError(f"num_hidden_groups must be in [1, num_hidden_layers={self.num_hidden_layers}], "
                             f"got {groups}")

    @property
    def emb_size(self) -> int:
        return self.embedding_size or self.hidden_size

    @property
    def first_position(self) -> int:
        return self.pad_token_id + 1 if self.positions_from_padding else 0

    @classmethod
    def field_names(cls):
        return [f.name for f in fields(cls)]


@dataclass
class EncoderOutput:
    """What the models return; fields a model does not produce are None."""

    last_hidden_state: Optional[Tensor] = None  # (B, N, H), zeros at padding
    pooler_output: Optional[Tensor] = None  # (B, H)
    logits: Optional[Tensor] = None  # (B, N, V) MLM / (B, N) ELECTRA discriminator / (B, C) classifier
    sentence_logits: Optional[Tensor] = None  # (B, 2) next-sentence / sentence-order
    loss: Optional[Tensor] = None


# ------------------------------------------------------------------------------------------------
# input checks
# ------------------------------------------------------------------------------------------------

_check_ids = check_token_ids


def check_inputs(config: BertConfig, input_ids, attention_mask, token_type_ids) -> Optional[Tensor]:
    """Validate the inputs; returns the (B, N) bool keep-mask (None = no padding mask)."""
    _check_ids("input_ids", input_ids, config.vocab_size)
    B, N = input_ids.shape
    if N + config.first_position > config.max_position_embeddings:
        raise ValueError(f"input_ids has sequence length {N}, more than the position table allows "
                         f"(max_position_embeddings={config.max_position_embeddings}"
                         f"{f' - {config.first_position}' if config.first_position else ''})")
    if token_type_ids is not None:
        _check_ids("token_type_ids", token_type_ids, max(config.type_vocab_size, 1), (B, N))
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, N):
        raise ValueError(f"attention_mask must have shape (B, N) = {(B, N)} (1 keep / 0 pad), "
                         f"got {tuple(attention_mask.shape)}")
    if attention_mask.is_floating_point() or attention_mask.is_complex():
        if not torch.compiler.is_compiling() and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must hold 1 (keep) / 0 (pad), got other values")
    return attention_mask != 0


# ------------------------------------------------------------------------------------------------
# modules
# ------------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    """word + absolute position (+ token type) embeddings, LayerNorm, dropout, optional E -> H
    projection. Looked up for the packed real tokens only: ids (T,) -> (T, H)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        E = config.emb_size
        self.config = config
        self.word = nn.Embedding(config.vocab_size, E, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, E,
                                     padding_idx=config.pad_token_id if config.positions_from_padding else None)
        self.token_type = nn.Embedding(config.type_vocab_size, E) if config.type_vocab_size > 0 else None
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.project = nn.Linear(E, config.hidden_size) if E != config.hidden_size else None

    def positions(self, input_ids: Tensor) -> Tensor:
        """(B, N) absolute positions: 0..N-1 (BERT), or RoBERTa's count of non-pad tokens
        starting at pad_token_id + 1 (pad tokens get pad_token_id)."""
        B, N = input_ids.shape
        if not self.config.positions_from_padding:
            return torch.arange(N, device=input_ids.device).expand(B, N)
        real = (input_ids != self.config.pad_token_id).long()
        return torch.cumsum(real, 1) * real + self.config.pad_token_id

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor], packing: Packing) -> Tensor:
        ids = packing.unpad(input_ids)  # (T,)
        x = self.word(ids) + self.position(packing.unpad(self.positions(input_ids)))  # (T, E)
        if self.token_type is not None:
            types = packing.unpad(token_type_ids) if token_type_ids is not None else torch.zeros_like(ids)
            x = x + self.token_type(types)
        x = self.dropout(self.norm(x))
        return self.project(x) if self.project is not None else x  # (T, H)


class SelfAttention(nn.Module):
    """Multi-head self-attention on packed tokens: (T, H) -> (T, H), through pyattn ops.

    With padding (``packing.indices`` set) the sequences are separated by
    ``pyattn.varlen_attention``; a batch without padding runs ``pyattn.attention`` on the
    (B, heads, N, D) view of the same tokens (no copy).
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        H = config.hidden_size
        self.heads = config.num_attention_heads
        self.head_dim = H // self.heads
        self.dropout = config.attention_probs_dropout_prob
        self.backend = config.backend
        self.qkv = nn.Linear(H, 3 * H)
        self.out = nn.Linear(H, H)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        T = x.shape[0]
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(x).view(T, 3, self.heads, self.head_dim)  # (T, 3, heads, D)
        if packing.indices is None:  # dense batch: (B, heads, N, D) strided views
            B, N = packing.batch, packing.seqlen
            q, k, v = qkv.view(B, N, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
            o = attention(q, k, v, dropout_p=p, backend=self.backend)  # (B, heads, N, D)
            o = o.transpose(1, 2).reshape(T, self.heads * self.head_dim)
        else:
            q, k, v = qkv.unbind(1)  # (T, heads, D) each
            o = varlen_attention(q, k, v, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen,
                                 packing.max_seqlen, dropout_p=p, backend=self.backend)
            o = o.reshape(T, self.heads * self.head_dim)
        return self.out(o)


class FeedForward(nn.Module):
    """H -> I -> H with the configured activation (torch modules; pyattn's GLU op is for gated FFNs)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x: Tensor) -> Tensor:
        return self.down(self.act(self.up(x)))


class EncoderLayer(nn.Module):
    """Post-LayerNorm transformer layer: x = LN(x + attn(x)); x = LN(x + ffn(x)). (T, H) -> (T, H)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.attn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ffn = FeedForward(config)
        self.ffn_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        x = self.attn_norm(x + self.dropout(self.attn(x, packing)))
        return self.ffn_norm(x + self.dropout(self.ffn(x)))


class Encoder(nn.Module):
    """``num_hidden_layers`` layers; with ``num_hidden_groups`` = k only k distinct layers exist and
    depth i runs layer ``i * k // num_hidden_layers`` (ALBERT's cross-layer sharing)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        groups = config.num_hidden_groups or config.num_hidden_layers
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(groups))
        self.schedule = [i * groups // config.num_hidden_layers for i in range(config.num_hidden_layers)]

    def forward(self, x: Tensor, packing: Packing) -> Tensor:
        for i in self.schedule:
            x = self.layers[i](x, packing)
        return x


class Pooler(nn.Module):
    """tanh(dense(h[CLS])): (B, H) from each sequence's first real token."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, first: Tensor) -> Tensor:
        return torch.tanh(self.dense(first))


class MaskedLMHead(nn.Module):
    """dense (H -> E), activation, LayerNorm, then the decoder tied to the word embeddings
    (weight (V, E) shared, own bias (V,)): (T, H) -> (T, V)."""

    def __init__(self, config: BertConfig, word_embeddings: nn.Embedding):
        super().__init__()
        E = config.emb_size
        self.dense = nn.Linear(config.hidden_size, E)
        self.act = ACTIVATIONS[config.head_act or config.hidden_act]
        self.norm = nn.LayerNorm(E, eps=config.layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self._tied = (word_embeddings,)  # a tuple: not registered twice, the weight stays the embeddings'

    @property
    def decoder_weight(self) -> Tensor:
        return self._tied[0].weight

    def forward(self, h: Tensor) -> Tensor:
        return F.linear(self.norm(self.act(self.dense(h))), self.decoder_weight, self.bias)


def _init_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, 0.02) weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

class PreTrainedEncoder(nn.Module):
    """Base of every model class: checks the config type, loading and saving (checkpoint.py)."""

    config_class = BertConfig
    hf_architecture = "BertModel"

    def __init__(self, config):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"config must be a {self.config_class.__name__}, got {type(config).__name__}")
        self.config = config

    @classmethod
    def from_pretrained(cls, local_dir, **config_overrides):
        """Load a Hugging Face checkpoint directory (config.json + safetensors or torch weights)."""
        from .checkpoint import from_pretrained
        return from_pretrained(local_dir, model_class=cls, **config_overrides)

    def save_pretrained(self, local_dir) -> None:
        """Write config.json + model.safetensors in Hugging Face's layout."""
        from .checkpoint import save_pretrained
        save_pretrained(self, local_dir)


class BertModel(PreTrainedEncoder):
    """Embeddings + encoder (+ pooler).

    forward(input_ids (B, N), attention_mask (B, N) 1 keep / 0 pad, token_type_ids (B, N)) ->
    EncoderOutput(last_hidden_state (B, N, H), pooler_output (B, H) or None).
    """

    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config) if add_pooling_layer else None
        _init_weights(self)

    def encode(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
               token_type_ids: Optional[Tensor] = None):
        """-> (packed hidden states (T, H), Packing)."""
        keep = check_inputs(self.config, input_ids, attention_mask, token_type_ids)
        B, N = input_ids.shape
        packing = Packing.full(B, N, input_ids.device) if keep is None else Packing.from_mask(keep)
        h = self.embeddings(input_ids, token_type_ids, packing)
        return self.encoder(h, packing), packing

    def pool(self, h: Tensor, packing: Packing) -> Optional[Tensor]:
        return self.pooler(h.index_select(0, packing.first_token)) if self.pooler is not None else None

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None) -> EncoderOutput:
        h, packing = self.encode(input_ids, attention_mask, token_type_ids)
        return EncoderOutput(last_hidden_state=packing.pad(h), pooler_output=self.pool(h, packing))


def _mlm_loss(logits_packed: Tensor, labels: Optional[Tensor], packing: Packing) -> Optional[Tensor]:
    if labels is None:
        return None
    return F.cross_entropy(logits_packed.float(), packing.unpad(labels), ignore_index=-100)


class BertForMaskedLM(PreTrainedEncoder):
    """BERT + masked-LM head (decoder tied to the word embeddings).

    forward(..., labels (B, N) with -100 = not predicted) -> logits (B, N, V), loss. Logits are
    computed for the real tokens only.
    """

    hf_architecture = "BertForMaskedLM"
    base_model_class = BertModel

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.model = self.base_model_class(config, add_pooling_layer=False)
        self.mlm = MaskedLMHead(config, self.model.embeddings.word)
        _init_weights(self.mlm.dense), _init_weights(self.mlm.norm)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> EncoderOutput:
        h, packing = self.model.encode(input_ids, attention_mask, token_type_ids)
        logits = self.mlm(h)  # (T, V)
        return EncoderOutput(last_hidden_state=packing.pad(h), logits=packing.pad(logits),
                             loss=_mlm_loss(logits, labels, packing))


class BertForPreTraining(PreTrainedEncoder):
    """BERT + MLM head + next-sentence head on the pooled [CLS] (ALBERT: sentence order).

    forward(..., labels (B, N), next_sentence_label (B,)) -> logits (B, N, V),
    sentence_logits (B, 2), loss = MLM + sentence loss (when both labels are given).
    """

    hf_architecture = "BertForPreTraining"
    base_model_class = BertModel

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.model = self.base_model_class(config, add_pooling_layer=True)
        self.mlm = MaskedLMHead(config, self.model.embeddings.word)
        self.sentence = nn.Linear(config.hidden_size, 2)
        self.dropout = nn.Dropout(config.classifier_dropout if config.classifier_dropout is not None else 0.0)
        _init_weights(self.mlm.dense), _init_weights(self.mlm.norm), _init_weights(self.sentence)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                next_sentence_label=None) -> EncoderOutput:
        h, packing = self.model.encode(input_ids, attention_mask, token_type_ids)
        pooled = self.model.pool(h, packing)
        logits, sent = self.mlm(h), self.sentence(self.dropout(pooled))
        loss = None
        if labels is not None and next_sentence_label is not None:
            loss = _mlm_loss(logits, labels, packing) + F.cross_entropy(sent.float(), next_sentence_label.view(-1))
        return EncoderOutput(last_hidden_state=packing.pad(h), pooler_output=pooled, logits=packing.pad(logits),
                             sentence_logits=sent, loss=loss)


class BertForSequenceClassification(PreTrainedEncoder):
    """BERT + dropout + linear classifier on the pooled [CLS]: logits (B, num_labels); loss is
    cross-entropy (num_labels > 1) or MSE (num_labels == 1)."""

    hf_architecture = "BertForSequenceClassification"
    base_model_class = BertModel

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.model = self.base_model_class(config, add_pooling_layer=True)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        _init_weights(self.classifier)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> EncoderOutput:
        h, packing = self.model.encode(input_ids, attention_mask, token_type_ids)
        pooled = self.model.pool(h, packing)
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = (F.mse_loss(logits.squeeze(-1).float(), labels.float()) if self.config.num_labels == 1
                    else F.cross_entropy(logits.float(), labels.view(-1)))
        return EncoderOutput(last_hidden_state=packing.pad(h), pooler_output=pooled, logits=logits, loss=loss)


def num_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied and shared ones counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


__all__ = ["BertConfig", "EncoderOutput", "BertModel", "BertForMaskedLM", "BertForPreTraining",
           "BertForSequenceClassification", "Embeddings", "SelfAttention", "FeedForward", "EncoderLayer",
           "Encoder", "Pooler", "MaskedLMHead", "num_parameters"]
