"""PagedKVCache.append_packed writes packed (varlen) keys/values exactly where append would."""
from __future__ import annotations

import pytest
import torch

import pyattn


def test_append_packed_matches_append_per_sequence():
    g = torch.Generator().manual_seed(0)
    lens = [7, 1, 19]
    k = torch.randn(sum(lens), 2, 8, generator=g)
    v = torch.randn(sum(lens), 2, 8, generator=g)
    cu = torch.tensor([0, 7, 8, 27], dtype=torch.int32)
    packed = pyattn.PagedKVCache(1, 12, 4, 2, 8, dtype=torch.float32)
    each = pyattn.PagedKVCache(1, 12, 4, 2, 8, dtype=torch.float32)
    sp = [packed.add_sequence(3) for _ in lens]  # sequence 0 already holds 3 tokens (pages in use)
    se = [each.add_sequence(3) for _ in lens]
    for c in (packed, each):
        c.advance(sp, 3)
    packed.append_packed(sp, k, v, cu)
    for b, sid in enumerate(se):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        each.append([sid], k[rows].transpose(0, 1)[None], v[rows].transpose(0, 1)[None])
    assert torch.equal(packed.block_table(sp), each.block_table(se))
    assert torch.equal(packed.k_pages[0], each.k_pages[0]) and torch.equal(packed.v_pages[0], each.v_pages[0])
    assert packed.k_pages[0].abs().sum() > 0
    with pytest.raises(ValueError, match="cu_seqlens"):
        packed.append_packed(sp, k, v, cu[:-1])
    with pytest.raises(ValueError, match="k and v"):
        packed.append_packed(sp, k[..., :4], v[..., :4], cu)
