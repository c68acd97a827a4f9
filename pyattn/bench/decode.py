"""KV-cache decoding benchmark rows: pyattn.decode_attention (one query per sequence, GQA 32/8,
D = 128) against SDPA with ``enable_gqa`` on the same cache; paged rows against pyattn on the
contiguous cache holding the same keys. Decoding is memory-bound: the throughput column is the
K/V bytes read per second, and ``pct_of_copy_bw`` relates it to the copy bandwidth of the run.
"""
from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from .cases import Case, suite

H, HKV, D = 32, 8, 128
PAGE_SIZE = 64
BATCHES = (1, 8)
LENGTHS = (1024, 8192, 32768)

# Tensors of the row being timed. Rows are built lazily and one at a time: all rows together
# would hold several GB of caches.
_live: Dict[str, object] = {}


def _tensors(key: str, B: int, L: int, dtype: torch.dtype, device: torch.device, paged: bool) -> dict:
    if _live.get("key") != key:
        _live.clear()
        g = torch.Generator(device="cpu").manual_seed(0)
        q = torch.randn(B, H, 1, D, generator=g).to(device=device, dtype=dtype)
        k = torch.randn(B, HKV, L, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, HKV, L, D, generator=g).to(device=device, dtype=dtype)
        t = dict(q=q, k=k, v=v, lens=torch.full((B,), L, dtype=torch.int32, device=device))
        if paged:  # the same keys in scattered, out-of-order pages
            per_seq = L // PAGE_SIZE
            perm = torch.randperm(B * per_seq, generator=g)
            table = perm.view(B, per_seq).to(device=device, dtype=torch.int32)
            pages = lambda c: c.view(B, HKV, per_seq, PAGE_SIZE, D).permute(0, 2, 1, 3, 4).reshape(  # noqa: E731
                B * per_seq, HKV, PAGE_SIZE, D)
            kp = torch.empty_like(pages(k))
            vp = torch.empty_like(kp)
            kp[perm.to(device)] = pages(k)
            vp[perm.to(device)] = pages(v)
            t.update(kp=kp, vp=vp, table=table)
        _live.update(key=key, t=t)
    return _live["t"]


def _row(device: torch.device, B: int, L: int, dtype: torch.dtype, paged: bool) -> Case:
    import pyattn

    dname = str(dtype).replace("torch.", "")
    layout = f"paged{PAGE_SIZE}" if paged else "contiguous"
    key = f"{B}-{L}-{dname}-{layout}"
    get = lambda: _tensors(key, B, L, dtype, device, paged)  # noqa: E731

    def contiguous():
        t = get()
        return pyattn.decode_attention(t["q"], t["k"], t["v"], t["lens"])

    if paged:
        def run():
            t = get()
            return pyattn.decode_attention(t["q"], t["kp"], t["vp"], t["lens"], block_table=t["table"])

        impls = {"pyattn": run, "contiguous": contiguous}
    else:
        def sdpa():
            t = get()
            return F.scaled_dot_product_attention(t["q"], t["k"], t["v"], enable_gqa=True)

        impls = {"pyattn": contiguous, "sdpa": sdpa}
    kv_bytes = 2 * B * HKV * L * D * torch.empty((), dtype=dtype).element_size()
    cfg = f"B{B} H{H}/{HKV} D{D} L{L} {layout}"
    return Case("decode_attention", "fwd", cfg, dname, impls, work=kv_bytes, unit="GB/s")


@suite("decode")
def decode_cases(device: torch.device, quick: bool) -> List[Case]:
    if quick:
        return [_row(device, 1, 8192, torch.bfloat16, paged) for paged in (False, True)]
    return [_row(device, B, L, dtype, paged)
            for dtype in (torch.bfloat16, torch.float32) for B in BATCHES for L in LENGTHS for paged in (False, True)]
