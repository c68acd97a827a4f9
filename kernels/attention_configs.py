"""Launch configurations of the Triton attention kernels, one table per GPU architecture.

A configuration is (BLOCK_M, BLOCK_N, num_warps, num_stages) of one kernel ("fwd", "dkdv", "dq")
for a dtype class ("half" = fp16/bf16 on tensor cores, "fp32" = IEEE FMA dots) and a padded head
dim (<= 64, 128, 256). Every entry is checked statically, compiled exactly as the launcher
specialises it (16-byte aligned pointers, strides multiple of 16): no register spills, shared
memory within the architecture's limit, and on sm_90 the dots of forward, dq and dK/dV at
D <= 128 lower to wgmma (``python -m pyattn.tools.gpu_static_check --all``).

Architectures: sm_90 (Hopper, 227 KB shared memory per block: wgmma needs 64-row tiles per warp
group) and sm_80 (Ampere A100, 163 KB). Other devices use the sm_80 table when their shared memory
per block allows it and the reduced ``SMALL_SMEM`` table otherwise (sm_86/sm_89/sm_120: 99 KB).
Under the Triton interpreter every kernel uses one deterministic configuration.
"""
from __future__ import annotations

import contextlib
import os
from typing import Dict, NamedTuple, Optional, Tuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


_Table = Dict[Tuple[str, str, int], TileConfig]
C = TileConfig

# fp32 inputs use IEEE FMA dots (fp32 accuracy, no TF32); the same small tiles on every arch.
_FP32: _Table = {
    ("fwd", "fp32", 64): C(32, 32, 4, 2),
    ("fwd", "fp32", 128): C(32, 32, 4, 2),
    ("fwd", "fp32", 256): C(16, 32, 4, 2),
    ("dkdv", "fp32", 64): C(16, 32, 4, 2),
    ("dkdv", "fp32", 128): C(16, 32, 4, 2),
    ("dkdv", "fp32", 256): C(16, 16, 4, 2),
    ("dq", "fp32", 64): C(16, 32, 4, 2),
    ("dq", "fp32", 128): C(16, 32, 4, 2),
    ("dq", "fp32", 256): C(16, 16, 4, 2),
}

# Chosen with the static check (every variant: plain, each mask flag, all flags together, varlen).
# sm_80: mma.sync everywhere; the tiles are the largest without spills in the all-flags variant.
SM80: _Table = {
    ("fwd", "half", 64): C(64, 64, 4, 3),
    ("fwd", "half", 128): C(128, 32, 8, 3),
    ("fwd", "half", 256): C(64, 32, 8, 2),
    ("dkdv", "half", 64): C(32, 32, 4, 2),
    ("dkdv", "half", 128): C(32, 64, 8, 2),
    ("dkdv", "half", 256): C(16, 32, 8, 2),
    ("dq", "half", 64): C(32, 64, 4, 2),
    ("dq", "half", 128): C(32, 64, 8, 2),
    ("dq", "half", 256): C(32, 32, 8, 2),
    **_FP32,
}

# sm_90: wgmma needs 64 rows per warp group. Forward and dq lower every dot to wgmma at D <= 128
# (and at 256). dK/dV: BLOCK_N=64 puts dV += P^T dO and dK += dS^T Q on wgmma; S and dP (M = BLOCK_M)
# stay on mma.sync because BLOCK_M=64 spills at D 64/128 (>255 registers per thread) in this kernel.
SM90: _Table = {
    ("fwd", "half", 64): C(128, 64, 8, 3),
    ("fwd", "half", 128): C(128, 64, 8, 3),
    ("fwd", "half", 256): C(64, 64, 8, 2),
    ("dkdv", "half", 64): C(32, 64, 4, 2),
    ("dkdv", "half", 128): C(32, 64, 8, 2),
    ("dkdv", "half", 256): C(16, 32, 8, 2),
    ("dq", "half", 64): C(64, 64, 4, 2),
    ("dq", "half", 128): C(64, 64, 8, 2),
    ("dq", "half", 256): C(64, 32, 8, 2),
    **_FP32,
}

# devices with 99 KB of shared memory per block (sm_86, sm_89, sm_120): fewer stages.
SMALL_SMEM: _Table = {key: cfg._replace(num_stages=min(cfg.num_stages, 2)) for key, cfg in SM80.items()}

TABLES: Dict[int, _Table] = {80: SM80, 90: SM90, 86: SMALL_SMEM}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024, 86: 99 * 1024}
INTERPRET_CONFIG = C(32, 32, 4, 1)

_target_override: Optional[int] = None


@contextlib.contextmanager
def target_arch(table: int):
    """Pick configs of ``table`` (80, 86 or 90) whatever the tensors' device: the static check
    launches the kernels' Python side with CPU tensors and compiles for a chosen GPU."""
    global _target_override
    if table not in TABLES:
        raise ValueError(f"table must be one of {sorted(TABLES)}, got {table!r}")
    previous, _target_override = _target_override, table
    try:
        yield
    finally:
        _target_override = previous


def table_for(device: torch.device) -> int:
    """The config table (80, 86 or 90) for ``device``."""
    if _target_override is not None:
        return _target_override
    if device.type != "cuda":
        return 80
    major, _minor = torch.cuda.get_device_capability(device)
    if major in (9, 10):  # Hopper; datacenter Blackwell has the same shared memory per block
        return 90
    smem = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
    return 80 if smem >= SMEM_LIMIT[80] else 86


def launch_config(kernel: str, block_d: int, dtype: torch.dtype, device: torch.device) -> TileConfig:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``kernel`` in {"fwd", "dkdv", "dq"} for a
    padded head dim ``block_d`` and input ``dtype`` on ``device``."""
    if INTERPRET:
        return INTERPRET_CONFIG
    kind = "fp32" if dtype == torch.float32 else "half"
    return TABLES[table_for(device)][(kernel, kind, max(64, block_d))]
