"""Models and losses of the training tasks.

``mlm``: :class:`pyattn.models.BertForMaskedLM`; ``clm``: :class:`pyattn.models.llama.LlamaForCausalLM`
or :class:`pyattn.models.SparseTransformerLM`. All use the byte vocabulary of :mod:`.corpus`.
A loss is returned as (sum over predicted tokens, number of predicted tokens) so that the
trainer can normalise by the token count of the whole global batch (see :mod:`.loop`).
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.bert import BertConfig, BertForMaskedLM
from ..models.llama import LlamaConfig, LlamaForCausalLM
from ..models.sparse_transformer import SparseTransformerConfig, SparseTransformerLM
from .corpus import PAD_ID, VOCAB_SIZE

TASKS = ("mlm", "clm")
CLM_MODELS = ("llama", "sparse_transformer")


def build_model(args) -> nn.Module:
    """The model of ``args.task`` / ``args.model`` with the size arguments of the command line."""
    E, L, H, F_, N = args.hidden_size, args.layers, args.heads, args.intermediate_size, args.seq_len
    if args.task == "mlm":
        cfg = BertConfig(vocab_size=VOCAB_SIZE, hidden_size=E, num_hidden_layers=L, num_attention_heads=H,
                         intermediate_size=F_, max_position_embeddings=N, hidden_dropout_prob=args.dropout,
                         attention_probs_dropout_prob=args.dropout, pad_token_id=PAD_ID, type_vocab_size=1)
        return BertForMaskedLM(cfg)
    if args.model == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=E, num_hidden_layers=L, num_attention_heads=H,
                          num_key_value_heads=args.kv_heads or H, intermediate_size=F_,
                          max_position_embeddings=N, attention_dropout=args.dropout, tie_word_embeddings=True,
                          pad_token_id=PAD_ID, bos_token_id=None, eos_token_id=None)
        return LlamaForCausalLM(cfg)
    cfg = SparseTransformerConfig(vocab_size=VOCAB_SIZE, hidden_size=E, num_hidden_layers=L, num_attention_heads=H,
                                  intermediate_size=F_, max_position_embeddings=N, layout=args.layout,
                                  block=args.block, num_local_blocks=args.local_blocks, dropout=args.dropout)
    return SparseTransformerLM(cfg)


def layer_list(model: nn.Module) -> nn.ModuleList:
    """The repeated blocks of a model (the units FSDP2 shards one by one)."""
    for m in model.modules():
        if isinstance(m, nn.ModuleList):
            return m
    raise ValueError(f"{type(model).__name__} has no nn.ModuleList of layers")


def loss_sum(model: nn.Module, inputs: Tensor, labels: Tensor) -> Tuple[Tensor, int]:
    """(sum of the token cross-entropies (fp32 scalar), number of predicted tokens).

    mlm: labels -100 = not predicted; clm: labels[b, t] is the token after inputs[b, t]."""
    logits = model(inputs).logits
    loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((labels != -100).sum())
