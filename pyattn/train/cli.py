"""Command line of ``python -m pyattn.train``."""
from __future__ import annotations

import argparse
from typing import List, Optional

from .tasks import CLM_MODELS, TASKS

DESCRIPTION = """\
Train a small language model built from pyattn ops: masked-LM pretraining of a BERT (--task mlm) or
causal-LM training of the LLaMA-style decoder or the Sparse Transformer (--task clm --model ...).

Corpus: unless --corpus FILE is given, the source code of a fixed list of pure-Python modules of the
standard library of the running interpreter (no network, no data files; the bytes depend on the
Python version), byte-level tokens (vocabulary 258: 256 bytes, PAD, MASK); the last --val-fraction
is held out for evaluation.

Writes into --out: log.jsonl (loss per step, eval loss), loss.png, checkpoint/ (model.safetensors +
state.pt with optimizer, scheduler, RNG and data position; --resume continues it exactly).

Under torchrun the same command uses DistributedDataParallel (gloo on CPU, nccl on CUDA), or FSDP2
with --fsdp; --batch-size is per process, so N processes train on N times the global batch:
  torchrun --nproc_per_node 2 -m pyattn.train --task clm --model llama [--fsdp]
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pyattn.train", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default="clm", help="mlm: BERT masked LM; clm: causal LM (default)")
    p.add_argument("--model", choices=CLM_MODELS, default="llama", help="the causal LM of --task clm")
    g = p.add_argument_group("model size")
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--layers", type=int, default=2)
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--kv-heads", type=int, default=None, help="llama: key/value heads (GQA); default --heads")
    g.add_argument("--intermediate-size", type=int, default=256)
    g.add_argument("--dropout", type=float, default=0.0)
    g.add_argument("--layout", choices=("fixed", "strided"), default="fixed", help="sparse_transformer layout")
    g.add_argument("--block", type=int, default=32, help="sparse_transformer layout block size")
    g.add_argument("--local-blocks", type=int, default=2, help="sparse_transformer num_local_blocks")
    g = p.add_argument_group("data")
    g.add_argument("--corpus", default=None, help="a UTF-8 text file (default: the standard-library corpus)")
    g.add_argument("--val-fraction", type=float, default=0.05)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--batch-size", type=int, default=8, help="sequences per process and micro-batch")
    g.add_argument("--mask-prob", type=float, default=0.15, help="mlm: fraction of predicted tokens")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=300, help="length of the run (the LR schedule's horizon)")
    g.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step (checkpoint written); --resume continues the same run")
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--warmup", type=int, default=20)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (mlm and sparse_transformer)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard); needs torchrun")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    g = p.add_argument_group("output")
    g.add_argument("--out", default="pyattn-train-out", help="output folder")
    g.add_argument("--eval-every", type=int, default=50, help="steps between evaluations (0: never)")
    g.add_argument("--eval-batches", type=int, default=4)
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUT/checkpoint (or the given checkpoint folder)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--no-plot", action="store_true", help="do not write loss.png")
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    for name in ("hidden_size", "layers", "heads", "intermediate_size", "seq_len", "batch_size", "steps",
                 "grad_accum", "block", "local_blocks", "eval_batches"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    for name in ("warmup", "eval_every", "save_every"):
        if getattr(a, name) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(a, name)}")
    if a.stop_at is not None and not 1 <= a.stop_at <= a.steps:
        p.error(f"--stop-at must be in [1, --steps={a.steps}], got {a.stop_at}")
    if not 0.0 < a.val_fraction < 1.0:
        p.error(f"--val-fraction must be in (0, 1), got {a.val_fraction}")
    if a.lr <= 0:
        p.error(f"--lr must be > 0, got {a.lr}")
    if a.warmup == 0:
        a.warmup = 1
    return a


def main(argv: Optional[List[str]] = None):
    from .loop import train

    return train(parse_args(argv))
