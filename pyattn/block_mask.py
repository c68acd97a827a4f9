"""The attention engine's block schedule: which key blocks each query block visits.

A :class:`BlockMask` follows FlexAttention's ``BlockMask`` field names, so users who know one know
the other. For each (batch or 1, head or 1, query block) it lists the key blocks to visit, split in

* *full* blocks (``full_kv_num_blocks`` / ``full_kv_indices``): every element is visible; the
  kernels run their mask-free path on them;
* *partial* blocks (``kv_num_blocks`` / ``kv_indices``): an element mask applies, given as packed
  bits in ``mask_bits`` (1 bit per (query, key) element, never a float tensor).

plus the transposed lists (per key block, the query blocks: ``q_num_blocks`` / ``q_indices`` and
``full_q_*``) that the dK/dV pass walks. Index lists are int32, sorted ascending, padded with
zeros past the count. Causal / window bands and key padding are applied element-wise by the
kernels on top of the schedule (they need no bits).

Shapes (``Bm`` in {1, B}, ``Hm`` in {1, H}, ``nqb = ceil(Nq / BLOCK_Q)``, ``nkb = ceil(Nk / BLOCK_KV)``)::

    kv_num_blocks, full_kv_num_blocks    (Bm, Hm, nqb)          int32
    kv_indices, full_kv_indices          (Bm, Hm, nqb, nkb)     int32
    q_num_blocks, full_q_num_blocks      (Bm, Hm, nkb)          int32
    q_indices, full_q_indices            (Bm, Hm, nkb, nqb)     int32
    mask_bits                            (Bm, Hm, Nq, ceil(Nk / 8)) uint8 or None;
                                         bit (j % 8) of byte j // 8 of row i = element (i, j) visible

Every builder is vectorised and runs on the device it is given (q's device): no Python loop over
blocks, no device synchronisation except the one-time validation of hand-made index lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_block_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"{name} must be one of {SUPPORTED_BLOCK_SIZES}, got {value}")
    return value


def _lists_from_bools(blocks: Tensor) -> Tuple[Tensor, Tensor]:
    """bool (..., n) -> (count int32 (...,), indices int32 (..., n): the True positions ascending, then 0)."""
    count = blocks.sum(-1, dtype=torch.int32)
    n = blocks.shape[-1]
    # stable sort of the keys (0 for True, 1 for False) puts the True positions first, in order
    order = torch.sort((~blocks).to(torch.int8), dim=-1, stable=True).indices.to(torch.int32)
    pos = torch.arange(n, device=blocks.device, dtype=torch.int32)
    order = torch.where(pos < count.unsqueeze(-1), order, torch.zeros((), dtype=torch.int32, device=blocks.device))
    return count.contiguous(), order.contiguous()


def _bools_from_lists(count: Tensor, indices: Tensor, n: int) -> Tensor:
    """Inverse of :func:`_lists_from_bools`: bool (..., n)."""
    out = torch.zeros(*indices.shape[:-1], n, dtype=torch.bool, device=indices.device)
    valid = torch.arange(indices.shape[-1], device=indices.device) < count.unsqueeze(-1)
    out.scatter_(-1, indices.long().clamp(0, max(n - 1, 0)) * valid, valid)
    # index 0 may have been written by padding entries: recompute it from the list itself
    first = ((indices == 0) & valid).any(-1)
    out[..., 0] = first
    return out


def pack_bits(mask: Tensor) -> Tensor:
    """bool (..., Nk) -> uint8 (..., ceil(Nk / 8)), bit (j % 8) of byte j // 8 = mask[..., j]."""
    nk = mask.shape[-1]
    nbytes = _cdiv(nk, 8)
    pad = nbytes * 8 - nk
    if pad:
        mask = torch.nn.functional.pad(mask, (0, pad))
    m = mask.reshape(*mask.shape[:-1], nbytes, 8)
    out = m[..., 0].to(torch.uint8)
    for b in range(1, 8):
        out |= m[..., b].to(torch.uint8) << b
    return out.contiguous()


def unpack_bits(bits: Tensor, nk: int) -> Tensor:
    """Inverse of :func:`pack_bits`: bool (..., nk)."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    m = (bits.unsqueeze(-1) >> shifts) & 1
    return m.flatten(-2)[..., :nk].bool()  # flatten, not reshape(-1): also for 0 rows


@dataclass(frozen=True, eq=False)
class BlockMask:
    """A block schedule (see the module doc for the fields' shapes). Build it with the
    ``from_*`` constructors or :mod:`pyattn.layouts`; it is immutable and can be cached per model."""

    kv_num_blocks: Tensor
    kv_indices: Tensor
    full_kv_num_blocks: Tensor
    full_kv_indices: Tensor
    q_num_blocks: Tensor
    q_indices: Tensor
    full_q_num_blocks: Tensor
    full_q_indices: Tensor
    block_size: Tuple[int, int]
    seq_lengths: Tuple[int, int]
    mask_bits: Optional[Tensor] = None

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_block_bools(cls, full: Tensor, partial: Optional[Tensor] = None, *, block_size=(64, 64),
                         seq_lengths: Tuple[int, int], mask_bits: Optional[Tensor] = None) -> "BlockMask":
        """From bool block tables (Bm, Hm, nqb, nkb): ``full`` blocks and ``partial`` ones (whose
        elements ``mask_bits`` decides). A block in both counts as partial."""
        bq, bk = block_size
        nq, nk = seq_lengths
        if partial is None:
            partial = torch.zeros_like(full)
        full = full & ~partial
        kvn, kvi = _lists_from_bools(partial)
        fkvn, fkvi = _lists_from_bools(full)
        qn, qi = _lists_from_bools(partial.transpose(-1, -2))
        fqn, fqi = _lists_from_bools(full.transpose(-1, -2))
        # lists made here are valid by construction: skip the (synchronising) validation
        out = cls.__new__(cls)
        fields = dict(kv_num_blocks=kvn, kv_indices=kvi, full_kv_num_blocks=fkvn, full_kv_indices=fkvi,
                      q_num_blocks=qn, q_indices=qi, full_q_num_blocks=fqn, full_q_indices=fqi,
                      block_size=(int(bq), int(bk)), seq_lengths=(int(nq), int(nk)), mask_bits=mask_bits)
        for name, value in fields.items():
            object.__setattr__(out, name, value)
        return out

    @classmethod
    def from_dense(cls, layout: Tensor, *, block_size=64, seq_lengths: Optional[Tuple[int, int]] = None) -> "BlockMask":
        """From a block layout: bool or 0/1 integer, (nqb, nkb), (H, nqb, nkb) (DeepSpeed's layout
        tensors) or (B, H, nqb, nkb). Every listed block is fully visible. ``seq_lengths`` defaults
        to whole blocks (nqb * block, nkb * block)."""
        if not isinstance(layout, Tensor):
            raise TypeError(f"layout must be a torch.Tensor, got {type(layout).__name__}")
        if layout.dim() not in (2, 3, 4):
            raise ValueError(f"layout must be (nqb, nkb), (H, nqb, nkb) or (B, H, nqb, nkb), got shape {tuple(layout.shape)}")
        if layout.dtype != torch.bool:
            if layout.dtype.is_floating_point or layout.dtype.is_complex:
                raise TypeError(f"layout must be bool or an integer 0/1 tensor, got {layout.dtype}")
            layout = layout != 0
        while layout.dim() < 4:
            layout = layout.unsqueeze(0)
        bq, bk = _pair(block_size)
        nqb, nkb = layout.shape[-2:]
        if seq_lengths is None:
            seq_lengths = (nqb * bq, nkb * bk)
        nq, nk = seq_lengths
        if _cdiv(nq, bq) != nqb or _cdiv(nk, bk) != nkb:
            raise ValueError(f"layout has {nqb} x {nkb} blocks but seq_lengths {tuple(seq_lengths)} with block size "
                             f"{(bq, bk)} need {_cdiv(nq, bq)} x {_cdiv(nk, bk)}")
        return cls.from_block_bools(layout.contiguous(), block_size=(bq, bk), seq_lengths=(nq, nk))

    @classmethod
    def from_bool_mask(cls, mask: Tensor, *, block_size=64, always_bits: bool = False) -> "BlockMask":
        """From an element mask bool (Bm, Hm, Nq, Nk) (True = visible; broadcast dims may be
        expanded with stride 0 and stay size-1 in the schedule). Blocks with no visible element
        are skipped, blocks with all visible are full, the rest partial with their elements as bits
        (1/8 byte per element; no float tensor is made). ``always_bits`` keeps the bits even when
        no block is partial, which avoids a device synchronisation (per-call use)."""
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be bool, got {mask.dtype}")
        if mask.dim() != 4:
            raise ValueError(f"mask must be 4-D (B, H, Nq, Nk), got shape {tuple(mask.shape)}")
        bq, bk = _pair(block_size)
        # keep broadcast (stride-0) batch / head dims size-1
        if mask.shape[0] > 1 and mask.stride(0) == 0:
            mask = mask[:1]
        if mask.shape[1] > 1 and mask.stride(1) == 0:
            mask = mask[:, :1]
        Bm, Hm, nq, nk = mask.shape
        nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
        anys, alls = [], []
        rows_per_chunk = max(bq, (1 << 22) // max(1, Bm * Hm * nk) // bq * bq)
        for r0 in range(0, nq, rows_per_chunk):  # bounded bool temporaries (a few block rows at a time)
            chunk = mask[:, :, r0:r0 + rows_per_chunk]
            rows = chunk.shape[2]
            cqb = _cdiv(rows, bq)
            pads = (0, nkb * bk - nk, 0, cqb * bq - rows)
            # elements past the sequence ends count as invisible for "any" and visible for "all"
            lo = torch.nn.functional.pad(chunk, pads, value=False).reshape(Bm, Hm, cqb, bq, nkb, bk)
            anys.append(lo.any(5).any(3))
            hi = torch.nn.functional.pad(chunk, pads, value=True).reshape(Bm, Hm, cqb, bq, nkb, bk)
            alls.append(hi.all(5).all(3))
        anyb = torch.cat(anys, 2) if anys else torch.zeros(Bm, Hm, 0, nkb, dtype=torch.bool, device=mask.device)
        allb = torch.cat(alls, 2) if alls else anyb
        partial = anyb & ~allb
        bits = pack_bits(mask) if (always_bits or bool(partial.any())) else None
        return cls.from_block_bools(allb, partial, block_size=(bq, bk), seq_lengths=(nq, nk), mask_bits=bits)

    # ---------------------------------------------------------------- properties
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """(Bm, Hm, Nq, Nk): the attention shape this schedule describes (Bm/Hm may be 1 = broadcast)."""
        Bm, Hm = self.full_kv_num_blocks.shape[:2]
        return (int(Bm), int(Hm), *self.seq_lengths)

    @property
    def num_blocks(self) -> Tuple[int, int]:
        return tuple(self.full_kv_indices.shape[-2:])

    @property
    def device(self) -> torch.device:
        return self.full_kv_indices.device

    def block_table(self) -> Tuple[Tensor, Tensor]:
        """(full, partial) bool (Bm, Hm, nqb, nkb)."""
        nkb = self.num_blocks[1]
        return (_bools_from_lists(self.full_kv_num_blocks, self.full_kv_indices, nkb),
                _bools_from_lists(self.kv_num_blocks, self.kv_indices, nkb))

    @property
    def density(self) -> float:
        """Fraction of the (Nq, Nk) elements inside visited blocks (averaged over Bm, Hm)."""
        full, partial = self.block_table()
        visited = (full | partial)
        bq, bk = self.block_size
        nq, nk = self.seq_lengths
        qn = torch.clamp(nq - torch.arange(visited.shape[-2], device=visited.device) * bq, max=bq)
        kn = torch.clamp(nk - torch.arange(visited.shape[-1], device=visited.device) * bk, max=bk)
        area = (qn[:, None] * kn[None, :]).to(torch.float64)
        total = float(nq * nk) * visited.shape[0] * visited.shape[1]
        return float((visited.to(torch.float64) * area).sum()) / max(total, 1.0)

    def to_dense_mask(self, Nq: Optional[int] = None, Nk: Optional[int] = None) -> Tensor:
        """bool (Bm, Hm, Nq, Nk): the element mask this schedule means (True = visible)."""
        nq, nk = self.seq_lengths
        Nq = nq if Nq is None else Nq
        Nk = nk if Nk is None else Nk
        if (Nq, Nk) != (nq, nk):
            raise ValueError(f"this layout was built for (Nq, Nk) = {(nq, nk)}, got {(Nq, Nk)}")
        full, partial = self.block_table()
        bq, bk = self.block_size
        vis = (full | partial).repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
        if self.mask_bits is not None:
            part = partial.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :nq, :nk]
            bits = unpack_bits(self.mask_bits, nk)
            vis = torch.where(part, bits, vis)
        return vis

    def __repr__(self) -> str:
        Bm, Hm, nq, nk = self.shape
        nqb, nkb = self.num_blocks
        return (f"BlockMask(shape=(B={Bm}, H={Hm}, Nq={nq}, Nk={nk}), block_size={self.block_size}, "
                f"blocks={nqb}x{nkb}, density={self.density:.2%}, "
                f"partial_blocks={int(self.kv_num_blocks.sum())}, bits={'yes' if self.mask_bits is not None else 'no'})")

    def plot(self, path, *, max_heads: int = 16) -> None:
        """Write a PNG of the block pattern, one panel per head (of batch 0): full blocks dark,
        partial blocks light."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        full, partial = self.block_table()
        img = (full.to(torch.float32) + 0.5 * partial.to(torch.float32))[0].cpu()
        heads = min(img.shape[0], max_heads)
        cols = min(heads, 4)
        rows = _cdiv(heads, cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
        for a in axes.flat:
            a.axis("off")
        for h in range(heads):
            ax = axes.flat[h]
            ax.imshow(img[h].numpy(), cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
            ax.set_title(f"head {h}" if img.shape[0] > 1 else "all heads", fontsize=9)
        fig.suptitle(f"{self.seq_lengths[0]}x{self.seq_lengths[1]}, block {self.block_size}, "
                     f"density {self.density:.1%}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    # ---------------------------------------------------------------- validation
    def __post_init__(self):
        _check_block_size("block_size[0]", self.block_size[0])
        _check_block_size("block_size[1]", self.block_size[1])
        nq, nk = self.seq_lengths
        bq, bk = self.block_size
        nqb, nkb = _cdiv(nq, bq), _cdiv(nk, bk)
        Bm, Hm = self.full_kv_num_blocks.shape[:2] if self.full_kv_num_blocks.dim() == 3 else (None, None)
        expect = {"kv_num_blocks": (Bm, Hm, nqb), "full_kv_num_blocks": (Bm, Hm, nqb),
                  "kv_indices": (Bm, Hm, nqb, nkb), "full_kv_indices": (Bm, Hm, nqb, nkb),
                  "q_num_blocks": (Bm, Hm, nkb), "full_q_num_blocks": (Bm, Hm, nkb),
                  "q_indices": (Bm, Hm, nkb, nqb), "full_q_indices": (Bm, Hm, nkb, nqb)}
        for name, shp in expect.items():
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != torch.int32:
                raise TypeError(f"BlockMask.{name} must be an int32 tensor, got "
                                f"{t.dtype if isinstance(t, Tensor) else type(t).__name__}")
            if tuple(t.shape) != shp:
                raise ValueError(f"BlockMask.{name} must have shape {shp} for seq_lengths {(nq, nk)} and block size "
                                 f"{(bq, bk)}, got {tuple(t.shape)}")
            if not t.is_contiguous():
                object.__setattr__(self, name, t.contiguous())
        for cnt, idx, bound in (("kv_num_blocks", "kv_indices", nkb), ("full_kv_num_blocks", "full_kv_indices", nkb),
                                ("q_num_blocks", "q_indices", nqb), ("full_q_num_blocks", "full_q_indices", nqb)):
            c, i = getattr(self, cnt), getattr(self, idx)
            if c.numel() and (int(c.min()) < 0 or int(c.max()) > bound):
                raise ValueError(f"BlockMask.{cnt} must be in [0, {bound}], got values in [{int(c.min())}, {int(c.max())}]")
            if i.numel() and (int(i.min()) < 0 or int(i.max()) >= bound):
                raise ValueError(f"BlockMask.{idx} holds a block index out of range [0, {bound}): "
                                 f"values in [{int(i.min())}, {int(i.max())}]")
        if self.mask_bits is not None:
            mb = self.mask_bits
            if mb.dtype != torch.uint8 or mb.dim() != 4 or tuple(mb.shape[2:]) != (nq, _cdiv(nk, 8)) \
                    or mb.shape[0] not in (1, Bm) or mb.shape[1] not in (1, Hm):
                raise ValueError(f"BlockMask.mask_bits must be uint8 ({Bm}|1, {Hm}|1, {nq}, {_cdiv(nk, 8)}), got "
                                 f"{mb.dtype} {tuple(mb.shape)}")
        elif int(self.kv_num_blocks.sum()) > 0:
            raise ValueError("BlockMask has partial blocks (kv_num_blocks > 0) but no mask_bits for their elements")


def _pair(block_size) -> Tuple[int, int]:
    if isinstance(block_size, (tuple, list)):
        if len(block_size) != 2:
            raise ValueError(f"block_size must be an int or a (BLOCK_Q, BLOCK_KV) pair, got {block_size!r}")
        return _check_block_size("block_size", block_size[0]), _check_block_size("block_size", block_size[1])
    b = _check_block_size("block_size", block_size)
    return b, b


def from_mask_fn(mask_fn: Callable, B: Optional[int], H: Optional[int], Nq: int, Nk: int, *, block_size=64,
                 device=None) -> BlockMask:
    """Schedule of a FlexAttention-style ``mask_fn(b, h, q_idx, kv_idx) -> bool`` evaluated vectorised
    on index tensors b (B,1,1,1), h (1,H,1,1), q_idx (1,1,rows,1), kv_idx (1,1,1,Nk) in row chunks.
    ``B`` / ``H`` None means the mask does not depend on them (broadcast). Blocks the mask fully
    covers are full; mixed blocks are partial with their elements stored as packed bits."""
    if not callable(mask_fn):
        raise TypeError(f"mask_fn must be callable, got {type(mask_fn).__name__}")
    device = torch.device(device) if device is not None else torch.device("cpu")
    bq, bk = _pair(block_size)
    Bm, Hm = B or 1, H or 1
    b = torch.arange(Bm, device=device).view(Bm, 1, 1, 1)
    h = torch.arange(Hm, device=device).view(1, Hm, 1, 1)
    kv = torch.arange(Nk, device=device).view(1, 1, 1, Nk)
    rows = max(bq, (1 << 22) // max(1, Bm * Hm * Nk) // bq * bq)
    chunks = []
    for r0 in range(0, Nq, rows):
        qi = torch.arange(r0, min(Nq, r0 + rows), device=device).view(1, 1, -1, 1)
        m = mask_fn(b, h, qi, kv)
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"mask_fn must return a bool tensor, got {got}")
        chunks.append(m.expand(Bm, Hm, qi.shape[2], Nk))
    mask = torch.cat(chunks, 2) if chunks else torch.zeros(Bm, Hm, 0, Nk, dtype=torch.bool, device=device)
    return BlockMask.from_bool_mask(mask, block_size=(bq, bk))
