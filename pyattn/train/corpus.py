"""The training text and its batches.

The default corpus needs no network and no data files: it is the source code of a fixed list of
pure-Python modules of the standard library of the running interpreter (``STDLIB_MODULES``; the ones
this Python lacks are skipped), concatenated in that order. Its exact bytes depend on the Python
version (``describe`` says which). ``--corpus FILE`` trains on any UTF-8 text file instead.

Tokens are bytes (ids 0-255) plus ``PAD_ID`` and ``MASK_ID``: vocabulary ``VOCAB_SIZE`` = 258.
The last ``val_fraction`` of the corpus is held out for evaluation.

Batches are windows at random offsets drawn from a ``torch.Generator`` whose state is part of a
checkpoint, so a resumed run sees the same data as an uninterrupted one. Every rank draws the whole
global batch and keeps its own rows, so the data of a step does not depend on the number of ranks.
"""
from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch
from torch import Tensor

PAD_ID, MASK_ID, VOCAB_SIZE = 256, 257, 258

STDLIB_MODULES = (
    "argparse", "ast", "bisect", "calendar", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "difflib", "dis", "email.message", "enum", "fnmatch", "fractions", "functools", "gettext",
    "glob", "heapq", "http.client", "inspect", "json.decoder", "json.encoder", "locale", "logging",
    "pathlib", "pprint", "random", "shlex", "shutil", "statistics", "string", "subprocess", "tarfile",
    "textwrap", "threading", "tokenize", "typing", "unittest.case", "urllib.parse", "uuid", "zipfile",
)


def stdlib_text() -> Tuple[str, int]:
    """The default corpus text and the number of modules it was built from."""
    parts = []
    for name in STDLIB_MODULES:
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None)
        if origin and origin.endswith(".py") and Path(origin).is_file():
            parts.append(f"# ---- {name} ----\n" + Path(origin).read_text(encoding="utf-8"))
    if not parts:
        raise RuntimeError("none of the standard-library modules of the default corpus was found; pass --corpus FILE")
    return "\n\n".join(parts), len(parts)


def encode(text: str) -> Tensor:
    """str -> (n,) int64 byte ids."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()


def decode(ids) -> str:
    return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


@dataclass
class Corpus:
    train: Tensor  # (n_train,) int64 byte ids
    val: Tensor  # (n_val,)
    description: str

    @classmethod
    def load(cls, path: Optional[str] = None, val_fraction: float = 0.05) -> "Corpus":
        if path is None:
            text, n = stdlib_text()
            desc = f"Python {sys.version.split()[0]} standard library source ({n} modules)"
        else:
            text = Path(path).read_text(encoding="utf-8")
            desc = str(path)
        ids = encode(text)
        n_val = max(int(len(ids) * val_fraction), 1)
        return cls(ids[:-n_val], ids[-n_val:], f"{desc}, {len(ids):,} bytes ({n_val:,} held out)")


def windows(data: Tensor, rows: int, length: int, gen: torch.Generator) -> Tensor:
    """(rows, length) windows of ``data`` at random offsets drawn from ``gen``."""
    if len(data) < length:
        raise ValueError(f"the corpus split has {len(data)} tokens, fewer than one window of {length}")
    starts = torch.randint(0, len(data) - length + 1, (rows,), generator=gen)
    return data[starts[:, None] + torch.arange(length)]


def clm_batch(data: Tensor, rows: int, seq_len: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Causal LM: inputs (rows, seq_len) and next-token labels (rows, seq_len)."""
    w = windows(data, rows, seq_len + 1, gen)
    return w[:, :-1], w[:, 1:]


def mlm_batch(data: Tensor, rows: int, seq_len: int, gen: torch.Generator,
              mask_prob: float = 0.15) -> Tuple[Tensor, Tensor]:
    """Masked LM (BERT's recipe): ``mask_prob`` of the tokens are predicted; of those 80% become
    MASK_ID, 10% a random byte, 10% stay. Labels are -100 where nothing is predicted."""
    ids = windows(data, rows, seq_len, gen)
    u = torch.rand(rows, seq_len, 3, generator=gen)
    rand_byte = torch.randint(0, 256, (rows, seq_len), generator=gen)
    chosen = u[..., 0] < mask_prob
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen & (u[..., 1] < 0.8), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (u[..., 1] >= 0.8) & (u[..., 2] < 0.5), rand_byte, inputs)
    return inputs, labels
