"""Classic block-sparse attention layouts, returned as :class:`pyattn.BlockMask` schedules.

Parameter names follow DeepSpeed's ``SparsityConfig`` family so that configs port unchanged
(``num_heads``, ``block``, ``different_layout_per_head``, ``attention``, ``num_local_blocks``, ...);
``from_deepspeed`` reads a DeepSpeed ``sparse_attention`` JSON section. Differences: the sequence
length need not be a multiple of ``block`` (the last block is partial), random blocks come from an
explicit ``seed`` (every data-parallel rank builds the same layout), and the default block is 64.

Every builder computes the (heads, nb, nb) block table with vectorised index arithmetic on
``device`` (pass q's device) and returns ``BlockMask.from_dense(table)``. With
``different_layout_per_head=False`` the layout has one head that broadcasts over all heads.
``attention="unidirectional"`` keeps only blocks on or below the block diagonal; pass
``causal=True`` to :func:`pyattn.block_sparse_attention` for the element-wise causal mask inside
the diagonal blocks.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from .block_mask import BlockMask, from_mask_fn as _from_mask_fn

__all__ = ["dense", "fixed", "strided", "variable", "bigbird", "longformer", "bslongformer", "sliding_window",
           "from_dense", "from_mask_fn", "from_deepspeed"]


def _num_blocks(seq_len: int, block: int) -> int:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    return -(-seq_len // block)


def _block(block: int, block_size: Optional[int]) -> int:
    return block if block_size is None else block_size


def _check_attention(attention: str) -> bool:
    if attention not in ("unidirectional", "bidirectional"):
        raise ValueError(f"attention must be 'unidirectional' or 'bidirectional', got {attention!r}")
    return attention == "bidirectional"


def _check_count(name: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _grid(nb: int, device):
    idx = torch.arange(nb, device=device)
    return idx.view(nb, 1), idx.view(1, nb)  # rows r, cols c


def _finish(table: Tensor, seq_len: int, block: int) -> BlockMask:
    """table bool (Hm, nb, nb) -> BlockMask."""
    return BlockMask.from_dense(table.unsqueeze(0), block_size=block, seq_lengths=(seq_len, seq_len))


def _random_blocks(heads: int, nb: int, count: int, eligible: Tensor, seed: int, device) -> Tensor:
    """bool (heads, nb, nb): per row ``count`` distinct random eligible columns (all if fewer)."""
    if count == 0:
        return torch.zeros(heads, nb, nb, dtype=torch.bool, device=device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    scores = torch.rand(heads, nb, nb, generator=gen, device=device)
    scores = torch.where(eligible, scores, torch.full((), -1.0, device=device))
    pick = scores.topk(min(count, nb), dim=-1).indices
    chosen = torch.zeros(heads, nb, nb, dtype=torch.bool, device=device).scatter_(-1, pick, True)
    return chosen & eligible


def dense(num_heads: int, seq_len: int, block: int = 64, *, block_size: Optional[int] = None,
          device=None) -> BlockMask:
    """Every block (DeepSpeed DenseSparsityConfig)."""
    block = _block(block, block_size)
    nb = _num_blocks(seq_len, block)
    return _finish(torch.ones(1, nb, nb, dtype=torch.bool, device=device), seq_len, block)


def fixed(num_heads: int, seq_len: int, block: int = 64, different_layout_per_head: bool = False,
          num_local_blocks: int = 4, num_global_blocks: int = 1, attention: str = "bidirectional",
          horizontal_global_attention: bool = False, num_different_global_patterns: int = 1, *,
          block_size: Optional[int] = None, device=None) -> BlockMask:
    """Sparse Transformer "fixed" pattern (Child et al. 2019; DeepSpeed FixedSparsityConfig).

    Local: blocks attend within their window of ``num_local_blocks`` blocks. Global: the last
    ``num_global_blocks`` of each window (shifted per head when ``num_different_global_patterns``
    > 1) are attended by every row (unidirectional: by the rows from the window on); with
    ``horizontal_global_attention`` those rows also attend everything.
    """
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    L = _check_count("num_local_blocks", num_local_blocks, 1)
    G = _check_count("num_global_blocks", num_global_blocks, 1)
    P = _check_count("num_different_global_patterns", num_different_global_patterns, 1)
    if L % G != 0:
        raise ValueError(f"num_local_blocks ({L}) must be divisible by num_global_blocks ({G})")
    if P > L // G:
        raise ValueError(f"num_different_global_patterns ({P}) must be <= num_local_blocks // num_global_blocks ({L // G})")
    if P > 1 and not different_layout_per_head:
        raise ValueError("num_different_global_patterns > 1 needs different_layout_per_head=True")
    if horizontal_global_attention and not bidir:
        raise ValueError("horizontal_global_attention needs attention='bidirectional'")
    nb = _num_blocks(seq_len, block)
    heads = num_heads if different_layout_per_head else 1
    r, c = _grid(nb, device)
    local = (r // L) == (c // L)
    if not bidir:
        local = local & (c <= r)
    col = torch.arange(nb, device=device)
    end = nb - nb % L
    tables = []
    for h in range(heads):
        first = L - (1 + h % P) * G
        rel = col - first
        start = first + torch.div(rel, L, rounding_mode="floor") * L  # start of the global group of a column
        gcol = (rel >= 0) & (rel % L < G) & (start < end)
        if end < nb:
            s = min(end + first, nb - G)
            tail = (col >= s) & (col < s + G)
            gcol = gcol | tail
            start = torch.where(tail, torch.full_like(start, s), start)
        t = local | (gcol.view(1, nb) & (r >= start.view(1, nb) if not bidir else torch.ones_like(local)))
        if horizontal_global_attention:
            t = t | gcol.view(nb, 1)
        tables.append(t)
    return _finish(torch.stack(tables), seq_len, block)


def strided(num_heads: int, seq_len: int, block: int = 64, num_local_blocks: int = 4,
            attention: str = "unidirectional", *, block_size: Optional[int] = None, device=None) -> BlockMask:
    """Sparse Transformer "strided" pattern (Child et al. 2019): each block row attends the
    previous ``num_local_blocks`` blocks (local) and every ``num_local_blocks``-th block before it
    (stride); bidirectional mirrors both."""
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    L = _check_count("num_local_blocks", num_local_blocks, 1)
    nb = _num_blocks(seq_len, block)
    r, c = _grid(nb, device)
    d = r - c
    t = (d.abs() < L) | (d % L == 0)
    if not bidir:
        t = t & (d >= 0)
    return _finish(t.unsqueeze(0), seq_len, block)


def variable(num_heads: int, seq_len: int, block: int = 64, different_layout_per_head: bool = False,
             num_random_blocks: int = 0, local_window_blocks: Sequence[int] = (4,),
             global_block_indices: Sequence[int] = (0,), global_block_end_indices: Optional[Sequence[int]] = None,
             attention: str = "bidirectional", horizontal_global_attention: bool = False, *, seed: int = 0,
             block_size: Optional[int] = None, device=None) -> BlockMask:
    """DeepSpeed VariableSparsityConfig: local windows of the given sizes (the last size repeats),
    global blocks (``global_block_indices``, or ranges ``[start, end)`` with
    ``global_block_end_indices``) and ``num_random_blocks`` random blocks per row (``seed``)."""
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    _check_count("num_random_blocks", num_random_blocks)
    if horizontal_global_attention and not bidir:
        raise ValueError("horizontal_global_attention needs attention='bidirectional'")
    windows = [int(w) for w in local_window_blocks]
    if not windows or any(w < 1 for w in windows):
        raise ValueError(f"local_window_blocks must be a non-empty list of positive ints, got {local_window_blocks!r}")
    starts = list(global_block_indices)
    ends = list(global_block_end_indices) if global_block_end_indices is not None else [s + 1 for s in starts]
    if len(ends) != len(starts):
        raise ValueError(f"global_block_end_indices ({len(ends)}) must have as many entries as global_block_indices ({len(starts)})")
    if any(e <= s for s, e in zip(starts, ends)):
        raise ValueError("every global_block_end_indices entry must be greater than its global_block_indices entry")
    nb = _num_blocks(seq_len, block)
    heads = num_heads if different_layout_per_head else 1
    r, c = _grid(nb, device)
    # window id of every block: the listed sizes, then the last size repeated
    bounds = [0]
    for w in windows:
        bounds.append(bounds[-1] + w)
    if bounds[-1] < nb:
        extra = torch.arange(bounds[-1] + windows[-1], nb + windows[-1], windows[-1]).tolist()
        bounds.extend(extra)
    bnd = torch.tensor(bounds[1:], device=device)
    win = torch.searchsorted(bnd, torch.arange(nb, device=device), right=True)
    t = win.view(nb, 1) == win.view(1, nb)
    if not bidir:
        t = t & (c <= r)
    col = torch.arange(nb, device=device)
    for s, e in zip(starts, ends):
        if s >= nb:
            continue
        g = (col >= s) & (col < min(e, nb))
        t = t | (g.view(1, nb) & ((r >= s) if not bidir else True))
        if horizontal_global_attention:
            t = t | g.view(nb, 1)
    t = t.unsqueeze(0).expand(heads, nb, nb)
    eligible = torch.ones(heads, nb, nb, dtype=torch.bool, device=device)
    t = t | _random_blocks(heads, nb, num_random_blocks, eligible, seed, device)
    return _finish(t, seq_len, block)


def bigbird(num_heads: int, seq_len: int, block: int = 64, different_layout_per_head: bool = False,
            num_random_blocks: int = 1, num_sliding_window_blocks: int = 3, num_global_blocks: int = 1,
            attention: str = "bidirectional", *, seed: int = 0, block_size: Optional[int] = None,
            device=None) -> BlockMask:
    """BigBird (Zaheer et al. 2020; DeepSpeed BigBirdSparsityConfig): a sliding window of
    ``num_sliding_window_blocks`` blocks, the first ``num_global_blocks`` block rows and columns,
    and ``num_random_blocks`` random blocks per row drawn from ``seed`` (unidirectional: from the
    blocks at or before the row)."""
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    R = _check_count("num_random_blocks", num_random_blocks)
    W = _check_count("num_sliding_window_blocks", num_sliding_window_blocks, 1)
    G = _check_count("num_global_blocks", num_global_blocks)
    nb = _num_blocks(seq_len, block)
    if R > nb:
        raise ValueError(f"num_random_blocks ({R}) must be <= the number of blocks ({nb})")
    if G > nb:
        raise ValueError(f"num_global_blocks ({G}) must be <= the number of blocks ({nb})")
    heads = num_heads if different_layout_per_head else 1
    r, c = _grid(nb, device)
    t = ((r - c).abs() <= W // 2) | (r < G) | (c < G)
    eligible = torch.ones(nb, nb, dtype=torch.bool, device=device) if bidir else (c <= r)
    t = t.unsqueeze(0) | _random_blocks(heads, nb, R, eligible.expand(heads, nb, nb), seed, device)
    if not bidir:
        t = t & (c <= r)
    return _finish(t, seq_len, block)


def longformer(num_heads: int, seq_len: int, block: int = 64, different_layout_per_head: bool = False,
               num_sliding_window_blocks: int = 3, global_block_indices: Sequence[int] = (0,),
               global_block_end_indices: Optional[Sequence[int]] = None, attention: str = "bidirectional", *,
               block_size: Optional[int] = None, device=None) -> BlockMask:
    """Longformer (Beltagy et al. 2020; DeepSpeed BSLongformerSparsityConfig): a sliding window of
    ``num_sliding_window_blocks`` blocks plus global block rows and columns."""
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    W = _check_count("num_sliding_window_blocks", num_sliding_window_blocks, 1)
    starts = list(global_block_indices)
    ends = list(global_block_end_indices) if global_block_end_indices is not None else [s + 1 for s in starts]
    if len(ends) != len(starts):
        raise ValueError(f"global_block_end_indices ({len(ends)}) must have as many entries as global_block_indices ({len(starts)})")
    nb = _num_blocks(seq_len, block)
    r, c = _grid(nb, device)
    t = (r - c).abs() <= W // 2
    col = torch.arange(nb, device=device)
    for s, e in zip(starts, ends):
        if s < nb:
            g = (col >= s) & (col < min(e, nb))
            t = t | g.view(1, nb) | g.view(nb, 1)
    if not bidir:
        t = t & (c <= r)
    return _finish(t.unsqueeze(0), seq_len, block)


bslongformer = longformer


def sliding_window(num_heads: int, seq_len: int, block: int = 64, num_sliding_window_blocks: int = 3,
                   attention: str = "unidirectional", *, block_size: Optional[int] = None, device=None) -> BlockMask:
    """DeepSpeed LocalSlidingWindowSparsityConfig: block row r attends blocks
    [r - W // 2, r + W // 2] (unidirectional: [r - W // 2, r]), W = ``num_sliding_window_blocks``."""
    block = _block(block, block_size)
    bidir = _check_attention(attention)
    W = _check_count("num_sliding_window_blocks", num_sliding_window_blocks, 1)
    nb = _num_blocks(seq_len, block)
    r, c = _grid(nb, device)
    t = (c >= r - W // 2) & ((c <= r + W // 2) if bidir else (c <= r))
    return _finish(t.unsqueeze(0), seq_len, block)


def from_dense(layout: Tensor, seq_len: Optional[int] = None, block: int = 64, *, block_size: Optional[int] = None,
               seq_lengths=None) -> BlockMask:
    """From a block table (nb, nb), (H, nb, nb) (a DeepSpeed ``make_layout`` result) or (B, H, nqb, nkb)."""
    block = _block(block, block_size)
    if seq_lengths is None and seq_len is not None:
        seq_lengths = (seq_len, seq_len)
    return BlockMask.from_dense(layout, block_size=block, seq_lengths=seq_lengths)


def from_mask_fn(mask_fn: Callable, B: Optional[int], H: Optional[int], Nq: int, Nk: int, block: int = 64, *,
                 block_size: Optional[int] = None, device=None) -> BlockMask:
    """From ``mask_fn(b, h, q_idx, kv_idx) -> bool tensor`` (a FlexAttention mask_mod), evaluated
    vectorised; mixed blocks keep their elements as packed bits. See :func:`pyattn.block_mask.from_mask_fn`."""
    return _from_mask_fn(mask_fn, B, H, Nq, Nk, block_size=_block(block, block_size), device=device)


_DEEPSPEED_MODES = {
    "dense": (dense, ()),
    "fixed": (fixed, ("different_layout_per_head", "num_local_blocks", "num_global_blocks", "attention",
                      "horizontal_global_attention", "num_different_global_patterns")),
    "variable": (variable, ("different_layout_per_head", "num_random_blocks", "local_window_blocks",
                            "global_block_indices", "global_block_end_indices", "attention",
                            "horizontal_global_attention")),
    "bigbird": (bigbird, ("different_layout_per_head", "num_random_blocks", "num_sliding_window_blocks",
                          "num_global_blocks", "attention")),
    "bslongformer": (longformer, ("different_layout_per_head", "num_sliding_window_blocks", "global_block_indices",
                                  "global_block_end_indices", "attention")),
}


def from_deepspeed(config: dict, num_heads: int, seq_len: int, *, seed: int = 0, device=None) -> BlockMask:
    """From a DeepSpeed ``sparse_attention`` config section, e.g.
    ``{"mode": "fixed", "block": 16, "num_local_blocks": 4, "num_global_blocks": 1, ...}``.
    Keys another mode would read are ignored, as DeepSpeed does; ``seed`` drives random blocks."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (the 'sparse_attention' section), got {type(config).__name__}")
    mode = config.get("mode", "fixed")
    if mode not in _DEEPSPEED_MODES:
        raise ValueError(f"config['mode'] must be one of {sorted(_DEEPSPEED_MODES)}, got {mode!r}")
    fn, keys = _DEEPSPEED_MODES[mode]
    kwargs = {k: config[k] for k in keys if k in config}
    if mode in ("variable", "bigbird"):
        kwargs["seed"] = seed
    return fn(num_heads, seq_len, int(config.get("block", 16)), device=device, **kwargs)
