"""Ready architectures built on pyattn ops: the BERT family and the Transformer seq2seq."""
from .bert import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, BertModel,
                   EncoderOutput)
from .families import (AlbertConfig, AlbertForMaskedLM, AlbertForPreTraining, AlbertModel, ElectraConfig,
                       ElectraDiscriminator, ElectraForMaskedLM, ElectraForPreTraining, ElectraModel, RobertaConfig,
                       RobertaForMaskedLM, RobertaModel)
from .transformer import BeamSearchOutput, Seq2SeqOutput, TransformerConfig, TransformerSeq2Seq
from .reformer import ReformerConfig, ReformerLM
from .sparse_transformer import SparseTransformerConfig, SparseTransformerLM
from .checkpoint import from_hf_state_dict, from_pretrained, save_pretrained

__all__ = [
    "BertConfig", "BertModel", "BertForMaskedLM", "BertForPreTraining", "BertForSequenceClassification",
    "EncoderOutput",
    "RobertaConfig", "RobertaModel", "RobertaForMaskedLM",
    "AlbertConfig", "AlbertModel", "AlbertForMaskedLM", "AlbertForPreTraining",
    "ElectraConfig", "ElectraModel", "ElectraForMaskedLM", "ElectraDiscriminator", "ElectraForPreTraining",
    "TransformerConfig", "TransformerSeq2Seq", "Seq2SeqOutput", "BeamSearchOutput",
    "from_pretrained", "from_hf_state_dict", "save_pretrained",
    "ReformerConfig", "ReformerLM",
    "SparseTransformerConfig", "SparseTransformerLM",
]
