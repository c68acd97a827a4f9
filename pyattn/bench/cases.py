"""Benchmark case registry: each op family contributes cases with its peers."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch


@dataclass
class Case:
    """One benchmark row: several implementations (``impls``) of the same computation.

    ``impls`` maps a name to a zero-argument callable; "pyattn" is the library, the others peers.
    ``work`` is the amount counted for the throughput column: FLOPs (unit "TFLOP/s") or bytes
    moved (unit "GB/s").
    """

    op: str
    mode: str  # "fwd" or "fwd+bwd"
    config: str
    dtype: str
    impls: Dict[str, Callable[[], object]]
    work: float
    unit: str
    notes: Dict[str, str] = field(default_factory=dict)
    peak_memory: Optional[Callable[[str], float]] = None


# family name -> builder(device, quick) -> list of Case
SUITES: Dict[str, Callable[[torch.device, bool], List[Case]]] = {}


def suite(name: str):
    def deco(fn):
        SUITES[name] = fn
        return fn

    return deco
