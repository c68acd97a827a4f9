"""``python -m pyattn.train``: masked-LM pretraining of a small BERT and causal-LM training of the
LLaMA-style decoder or the Sparse Transformer, on one process or under ``torchrun`` (DDP, FSDP2).

Modules: :mod:`.corpus` (text and batches), :mod:`.tasks` (models and losses), :mod:`.distributed`
(process group, DDP / FSDP2 wrapping), :mod:`.state` (checkpoints), :mod:`.loop` (the training
loop), :mod:`.cli` (arguments).
"""
from .cli import main, parse_args

__all__ = ["main", "parse_args"]
