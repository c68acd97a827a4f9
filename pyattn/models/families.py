"""RoBERTa, ALBERT and ELECTRA as configurations of the BERT modules in bert.py.

* RoBERTa (Liu et al. 2019): positions count the real tokens from ``pad_token_id + 1``, a single
  token type, GELU in the MLM head.
* ALBERT (Lan et al. 2020): factorised embeddings (E < H, projected to H), cross-layer sharing
  (``num_hidden_groups`` distinct layers), sentence-order prediction head in pre-training.
* ELECTRA (Clark et al. 2020): E-sized embeddings projected to H; pre-training is a small MLM
  generator whose samples replace the masked tokens and a discriminator that detects them
  (replaced-token detection), sharing the embeddings.

The classes differ from BERT's only in ``config_class``, the Hugging Face architecture name they
save as, and (ELECTRA) the discriminator head.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bert import (ACTIVATIONS, BertConfig, BertForMaskedLM, BertForPreTraining, BertModel, EncoderOutput,
                   PreTrainedEncoder, _init_weights)


@dataclass
class RobertaConfig(BertConfig):
    """roberta-base's shape by default."""

    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    positions_from_padding: bool = True
    head_act: Optional[str] = "gelu"

    model_type = "roberta"


@dataclass
class AlbertConfig(BertConfig):
    """albert-base-v2's shape by default: E = 128, H = 768, one shared layer."""

    vocab_size: int = 30000
    embedding_size: Optional[int] = 128
    num_hidden_groups: Optional[int] = 1
    hidden_act: str = "gelu_new"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    classifier_dropout: Optional[float] = 0.1

    model_type = "albert"


@dataclass
class ElectraConfig(BertConfig):
    """electra-small-discriminator's shape by default."""

    embedding_size: Optional[int] = 128
    hidden_size: int = 256
    num_attention_heads: int = 4
    intermediate_size: int = 1024
    head_act: Optional[str] = "gelu"

    model_type = "electra"


class RobertaModel(BertModel):
    config_class = RobertaConfig
    hf_architecture = "RobertaModel"


class RobertaForMaskedLM(BertForMaskedLM):
    config_class = RobertaConfig
    hf_architecture = "RobertaForMaskedLM"
    base_model_class = RobertaModel


class AlbertModel(BertModel):
    config_class = AlbertConfig
    hf_architecture = "AlbertModel"


class AlbertForMaskedLM(BertForMaskedLM):
    config_class = AlbertConfig
    hf_architecture = "AlbertForMaskedLM"
    base_model_class = AlbertModel


class AlbertForPreTraining(BertForPreTraining):
    """ALBERT + MLM head + sentence-order head (``sentence_logits``; label 1 = swapped)."""

    config_class = AlbertConfig
    hf_architecture = "AlbertForPreTraining"
    base_model_class = AlbertModel


class ElectraModel(BertModel):
    config_class = ElectraConfig
    hf_architecture = "ElectraModel"

    def __init__(self, config: ElectraConfig, add_pooling_layer: bool = False):
        super().__init__(config, add_pooling_layer=add_pooling_layer)


class ElectraForMaskedLM(BertForMaskedLM):
    """The ELECTRA generator: an MLM over E-sized tied embeddings."""

    config_class = ElectraConfig
    hf_architecture = "ElectraForMaskedLM"
    base_model_class = ElectraModel


class DiscriminatorHead(nn.Module):
    """dense (H -> H), activation, dense (H -> 1): (T, H) -> (T,) replaced-token logits."""

    def __init__(self, config: ElectraConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act = ACTIVATIONS[config.hidden_act]
        self.out = nn.Linear(config.hidden_size, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(self.act(self.dense(h))).squeeze(-1)


class ElectraDiscriminator(PreTrainedEncoder):
    """ELECTRA discriminator (Hugging Face's ``ElectraForPreTraining``): logits (B, N), > 0 means
    "replaced"; ``labels`` (B, N) 1 = replaced gives the replaced-token-detection loss."""

    config_class = ElectraConfig
    hf_architecture = "ElectraForPreTraining"

    def __init__(self, config: ElectraConfig):
        super().__init__(config)
        self.model = ElectraModel(config)
        self.head = DiscriminatorHead(config)
        _init_weights(self.head)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None) -> EncoderOutput:
        h, packing = self.model.encode(input_ids, attention_mask, token_type_ids)
        logits = self.head(h)  # (T,)
        loss = None
        if labels is not None:  # over the real tokens only
            loss = F.binary_cross_entropy_with_logits(logits.float(), packing.unpad(labels).float())
        return EncoderOutput(last_hidden_state=packing.pad(h), logits=packing.pad(logits), loss=loss)


def default_generator_config(config: ElectraConfig, divisor: int = 4) -> ElectraConfig:
    """The paper's generator: the discriminator's shape with H, heads and I divided by ``divisor``
    (same E, so the embeddings can be shared)."""
    heads = max(1, config.num_attention_heads // divisor)
    return dataclasses.replace(config, hidden_size=max(heads, config.hidden_size // divisor // heads * heads),
                               num_attention_heads=heads,
                               intermediate_size=max(1, config.intermediate_size // divisor))


@dataclass
class ElectraPreTrainingOutput:
    loss: Optional[Tensor]  # mlm_loss + rtd_weight * rtd_loss
    mlm_loss: Optional[Tensor]
    rtd_loss: Optional[Tensor]
    generator_logits: Tensor  # (B, N, V)
    logits: Tensor  # (B, N) discriminator logits on the corrupted input
    corrupted_ids: Tensor  # (B, N) input with the masked positions replaced by generator samples
    is_replaced: Tensor  # (B, N) bool


class ElectraForPreTraining(nn.Module):
    """Generator + discriminator with the replaced-token-detection objective.

    forward(masked_ids (B, N), labels (B, N): original token at masked positions, -100 elsewhere,
    attention_mask, token_type_ids). The generator's MLM predicts the masked tokens; its samples
    (no gradient through sampling) fill the masked positions; the discriminator classifies every
    real token as original / replaced (a sample equal to the original counts as original).
    loss = mlm_loss + rtd_weight * rtd_loss (rtd_weight = 50 in the paper). The word, position and
    token-type embeddings (and their LayerNorm) are one module shared by both networks.
    """

    def __init__(self, config: ElectraConfig, generator_config: Optional[ElectraConfig] = None,
                 rtd_weight: float = 50.0):
        super().__init__()
        generator_config = generator_config or default_generator_config(config)
        if generator_config.emb_size != config.emb_size or generator_config.vocab_size != config.vocab_size:
            raise ValueError("generator_config must have the discriminator's embedding_size and vocab_size "
                             f"(embeddings are shared), got E={generator_config.emb_size}, "
                             f"V={generator_config.vocab_size} vs E={config.emb_size}, V={config.vocab_size}")
        self.config, self.rtd_weight = config, rtd_weight
        self.discriminator = ElectraDiscriminator(config)
        self.generator = ElectraForMaskedLM(generator_config)
        self._share_embeddings()

    def _share_embeddings(self) -> None:
        disc, gen = self.discriminator.model.embeddings, self.generator.model.embeddings
        for name in ("word", "position", "token_type", "norm"):
            setattr(gen, name, getattr(disc, name))
        self.generator.mlm._tied = (disc.word,)

    def forward(self, input_ids: Tensor, labels: Optional[Tensor] = None, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, generator: Optional[torch.Generator] = None):
        gen = self.generator(input_ids, attention_mask, token_type_ids, labels=labels)
        masked = labels != -100 if labels is not None else torch.zeros_like(input_ids, dtype=torch.bool)
        with torch.no_grad():  # sample replacements at the masked positions (Gumbel-max, no gradient)
            u = torch.rand(gen.logits.shape, generator=generator, device=input_ids.device).clamp_(1e-9, 1.0)
            sampled = (gen.logits.float() - torch.log(-torch.log(u))).argmax(-1)
            corrupted = torch.where(masked, sampled, input_ids)
            original = torch.where(masked, labels, input_ids) if labels is not None else input_ids
            is_replaced = corrupted != original
        disc = self.discriminator(corrupted, attention_mask, token_type_ids)
        rtd = mlm = loss = None
        if labels is not None:
            real = attention_mask != 0 if attention_mask is not None else torch.ones_like(masked)
            rtd = F.binary_cross_entropy_with_logits(disc.logits[real].float(), is_replaced[real].float())
            mlm = gen.loss
            loss = mlm + self.rtd_weight * rtd
        return ElectraPreTrainingOutput(loss, mlm, rtd, gen.logits, disc.logits, corrupted, is_replaced)

    @classmethod
    def from_pretrained(cls, local_dir, rtd_weight: float = 50.0, **config_overrides):
        """``local_dir`` holds ``generator/`` and ``discriminator/`` Hugging Face checkpoints (as
        written by :meth:`save_pretrained`); the shared embeddings come from the discriminator."""
        from pathlib import Path
        gen = ElectraForMaskedLM.from_pretrained(Path(local_dir) / "generator", **config_overrides)
        disc = ElectraDiscriminator.from_pretrained(Path(local_dir) / "discriminator", **config_overrides)
        model = cls(disc.config, gen.config, rtd_weight)
        model.discriminator, model.generator = disc, gen
        model._share_embeddings()
        return model

    def save_pretrained(self, local_dir) -> None:
        from pathlib import Path
        self.generator.save_pretrained(Path(local_dir) / "generator")
        self.discriminator.save_pretrained(Path(local_dir) / "discriminator")
