"""``pyattn.decode_attention``: KV-cache decoding attention (split-K flash-decoding, GQA-grouped).

Two torch ops (semantics: pyattn/reference/decode.py):

* ``pyattn::decode_kv_append`` writes ``k_new`` / ``v_new`` into the caches at ``cache_seqlens``
  (declares ``k_cache`` and ``v_cache`` as mutated; the only in-place write of the API);
* ``pyattn::decode_attention_fwd`` attends a few queries per sequence to its cache: each
  (sequence, kv head) walks its keys in ``num_splits`` slices whose partial results are combined
  by their log-sum-exp; the query heads sharing a kv head are processed together.

Inference only: neither op has a backward.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _dispatch
from .._validate import FLOAT_DTYPES, check_backend_arg, check_same_device, check_same_dtype, check_tensor
from ..reference.decode import append_kv, decode_attention_reference
from ..attention import _check_window

MAX_HEAD_DIM = 256
_ALL_FLOATS = FLOAT_DTYPES + (torch.float64,)


@_dispatch.register_input_check("decode")
def _input_reason(backend: str, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    if backend == "reference":
        return None
    if dtype == torch.float64:
        return "float64 is supported by the reference backend only"
    if head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} > {MAX_HEAD_DIM}"
    return None


# --------------------------------------------------------------------------------------------
# backend implementations
def _append_impl(backend, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table):
    if backend == "cpu":
        torch.ops.pyattn_cpu.decode_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    elif backend == "cuda":
        torch.ops.pyattn_cuda.decode_append(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)
    else:  # triton and reference: one indexed copy per cache (torch index_put_, any device)
        append_kv(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


def _forward_impl(backend, q, k_cache, v_cache, cache_seqlens, block_table, alibi, scale, wl, wr, n_app, splits):
    if backend == "cpu":
        return torch.ops.pyattn_cpu.decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, alibi, scale, wl, wr,
                                               n_app, splits)
    if backend == "cuda":
        return torch.ops.pyattn_cuda.decode_fwd(q, k_cache, v_cache, cache_seqlens, block_table, alibi, scale, wl, wr,
                                                n_app, splits)
    if backend == "triton":
        from ..kernels import decode as tk
        return tk.decode_forward(q, k_cache, v_cache, cache_seqlens, block_table, alibi, scale, wl, wr, n_app, splits)
    if backend == "reference":
        compute = torch.float64 if q.dtype == torch.float64 else torch.float32
        out, lse = decode_attention_reference(q, k_cache, v_cache, cache_seqlens, block_table=block_table,
                                              alibi_slopes=alibi, scale=scale, window_left=wl, window_right=wr,
                                              n_appended=n_app, compute_dtype=compute)
        return out.contiguous(), lse.contiguous()
    raise ValueError(f"unknown backend {backend!r}")


# --------------------------------------------------------------------------------------------
# custom ops (opaque to torch.compile; no autograd: inference only)
@torch.library.custom_op("pyattn::decode_kv_append", mutates_args=("k_cache", "v_cache"))
def decode_kv_append(k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, cache_seqlens: Tensor,
                     block_table: Optional[Tensor], backend: str) -> None:
    """k_cache/v_cache[..., cache_seqlens[b] + t, :] = k_new/v_new[b, :, t] (through block_table when paged)."""
    _append_impl(backend, k_cache, v_cache, k_new, v_new, cache_seqlens, block_table)


@decode_kv_append.register_fake
def _(k_cache, v_cache, k_new, v_new, cache_seqlens, block_table, backend):
    return None


@torch.library.custom_op("pyattn::decode_attention_fwd", mutates_args=())
def decode_attention_fwd(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor,
                         block_table: Optional[Tensor], alibi_slopes: Optional[Tensor], scale: float,
                         window_left: int, window_right: int, n_appended: int, num_splits: int,
                         backend: str) -> Tuple[Tensor, Tensor]:
    """q (B, H, Nq, D), caches (B|pages, Hkv, len|page, D) -> (out (B, H, Nq, D), lse fp32 (B, H, Nq))."""
    out, lse = _forward_impl(backend, q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale,
                             window_left, window_right, n_appended, num_splits)
    return out.contiguous(), lse.contiguous()


@decode_attention_fwd.register_fake
def _(q, k_cache, v_cache, cache_seqlens, block_table, alibi_slopes, scale, window_left, window_right, n_appended,
      num_splits, backend):
    B, H, Nq, D = q.shape
    return q.new_empty((B, H, Nq, D)), q.new_empty((B, H, Nq), dtype=torch.float32)


# --------------------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _workers(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, torch.get_num_threads())


def choose_num_splits(batch: int, kv_heads: int, capacity: int, device: torch.device) -> int:
    """Splits of each sequence's keys: enough (sequence, kv head, split) items to keep every core
    (4 items each, for balance under ragged lengths) or SM (2 each) busy, but no split shorter
    than 256 (CPU) / 128 (GPU) keys of the cache capacity, and at most 64. Uses shapes only (no sync)."""
    workers = _workers(device)
    per_worker, min_keys = (2, 128) if device.type == "cuda" else (4, 256)
    items = max(1, batch * kv_heads)
    want = -(-per_worker * workers // items)
    return int(max(1, min(want, capacity // min_keys, 64)))


def _check_int_tensor(name: str, t, ndim: int, ref: Tensor) -> None:
    check_tensor(name, t, ndim=ndim, dtypes=(torch.int32,))
    check_same_device(name, t, "q", ref)


def _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table, alibi_slopes, scale, num_splits):
    check_tensor("q", q, ndim=4, dtypes=_ALL_FLOATS)
    B, H, Nq, D = q.shape
    paged = block_table is not None
    layout = "(num_pages, Hkv, page_size, D)" if paged else "(B, Hkv, max_len, D)"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        check_tensor(name, t, dtypes=_ALL_FLOATS)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D {layout}, got shape {tuple(t.shape)}")
        check_same_dtype(name, t, "q", q)
        check_same_device(name, t, "q", q)
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a unit stride in its last (head) dim, got strides {t.stride()}")
    if v_cache.shape != k_cache.shape:
        what = "page size" if paged and v_cache.shape[2] != k_cache.shape[2] else "shape"
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)} ({what} mismatch), "
                         f"got {tuple(v_cache.shape)}")
    Hkv = k_cache.shape[1]
    if k_cache.shape[3] != D:
        raise ValueError(f"k_cache head dim {k_cache.shape[3]} must equal q head dim {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"the number of query heads ({H}) must be a multiple of the number of cache heads ({Hkv})")
    if not 1 <= D <= MAX_HEAD_DIM and q.dtype != torch.float64:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D}")
    _check_int_tensor("cache_seqlens", cache_seqlens, 1, q)
    if cache_seqlens.shape[0] != B:
        raise ValueError(f"cache_seqlens must have shape (B,) = ({B},), got {tuple(cache_seqlens.shape)}")
    if paged:
        _check_int_tensor("block_table", block_table, 2, q)
        if block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (B, max_pages) with B = {B}, got {tuple(block_table.shape)}")
        page_size = k_cache.shape[2]
        if page_size < 1:
            raise ValueError(f"k_cache page size (dim 2) must be >= 1, got {page_size}")
        capacity = block_table.shape[1] * page_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"k_cache batch size {k_cache.shape[0]} must equal q batch size {B} "
                             "(pass block_table for a paged cache)")
        capacity = k_cache.shape[2]
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new must be given together")
    n_app = 0
    if k_new is not None:
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            check_tensor(name, t, ndim=4, dtypes=_ALL_FLOATS)
            check_same_dtype(name, t, "q", q)
            check_same_device(name, t, "q", q)
            if tuple(t.shape) != (B, Hkv, Nq, D):
                raise ValueError(f"{name} must have shape (B, Hkv, Nq, D) = {(B, Hkv, Nq, D)}, got {tuple(t.shape)}")
        n_app = Nq
    slopes = None
    if alibi_slopes is not None:
        check_tensor("alibi_slopes", alibi_slopes, dtypes=_ALL_FLOATS)
        check_same_device("alibi_slopes", alibi_slopes, "q", q)
        if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
            raise ValueError(f"alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({B}, {H}), "
                             f"got {tuple(alibi_slopes.shape)}")
        slopes = alibi_slopes.to(torch.float32).expand(B, H).contiguous()
    if scale is None:
        sc = D ** -0.5
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    else:
        sc = float(scale)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    if torch.is_grad_enabled():
        for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k_new", k_new), ("v_new", v_new),
                        ("alibi_slopes", alibi_slopes)):
            if t is not None and t.requires_grad:
                raise ValueError(f"decode_attention is inference only (no backward), but {name} requires grad; "
                                 "call it under torch.no_grad() or torch.inference_mode(), or detach it")
    if not torch.compiler.is_compiling():
        _check_values(cache_seqlens, block_table, k_cache, capacity, n_app)
    return capacity, n_app, slopes, sc


def _check_values(cache_seqlens, block_table, k_cache, capacity, n_app):
    """Checks that read the integer tensors (host copies of B and B x pages int32 values)."""
    lens = cache_seqlens.cpu()
    if lens.numel() == 0:
        return
    if int(lens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {lens.tolist()[:16]}")
    total = lens.to(torch.int64) + n_app
    worst = int(total.argmax())
    if int(total[worst]) > capacity:
        what = "max_pages_per_seq * page_size" if block_table is not None else "k_cache.shape[2]"
        extra = f" + {n_app} new tokens" if n_app else ""
        raise ValueError(f"cache_seqlens[{worst}] = {int(lens[worst])}{extra} exceeds the cache capacity "
                         f"{capacity} ({what})")
    if block_table is not None:
        page_size = k_cache.shape[2]
        pages_used = (total + page_size - 1) // page_size  # (B,)
        bt = block_table.cpu()
        used = torch.arange(bt.shape[1])[None, :] < pages_used[:, None]
        bad = used & ((bt < 0) | (bt >= k_cache.shape[0]))
        if bool(bad.any()):
            b, i = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"block_table[{b}, {i}] = {int(bt[b, i])} is out of range: k_cache has "
                             f"{k_cache.shape[0]} pages (indices 0..{k_cache.shape[0] - 1})")


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     k_new: Optional[Tensor] = None, v_new: Optional[Tensor] = None,
                     block_table: Optional[Tensor] = None, causal: bool = True,
                     window: Optional[Tuple[Optional[int], Optional[int]]] = None,
                     alibi_slopes: Optional[Tensor] = None, scale: Optional[float] = None,
                     num_splits: Optional[int] = None, return_lse: bool = False,
                     backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention of a few new queries per sequence against its key/value cache (inference only).

    Args:
        q: (B, H, Nq, D), small Nq (1 for plain decoding, a few for speculative decoding); any
            strides. fp32, fp16 or bf16, D in [1, 256].
        k_cache, v_cache: contiguous cache (B, Hkv, max_len, D), or paged cache
            (num_pages, Hkv, page_size, D) with ``block_table``; q's dtype; unit last stride.
            H must be a multiple of Hkv (MHA, GQA, MQA).
        cache_seqlens: (B,) int32, valid keys per sequence (ragged batches; nothing beyond is read).
        k_new, v_new: optional (B, Hkv, Nq, D). Written **in place** into the caches at positions
            ``cache_seqlens[b] .. cache_seqlens[b] + Nq - 1`` before attending (the only in-place
            write); the sequence then has ``cache_seqlens[b] + Nq`` keys. ``cache_seqlens`` itself is
            not modified: the caller advances it.
        block_table: (B, max_pages_per_seq) int32: key j of sequence b lives in page
            ``block_table[b, j // page_size]`` at slot ``j % page_size``. ``pyattn.PagedKVCache`` builds it.
        causal: the Nq queries are the last Nq positions of the sequence (bottom-right aligned):
            query i of a sequence with L keys sees keys j <= L - Nq + i.
        window: (left, right) band around each query's position, as in :func:`pyattn.attention`.
        alibi_slopes: (H,) or (B, H): adds -slope * |L - Nq + i - j|.
        scale: defaults to 1/sqrt(D).
        num_splits: slices of each sequence's keys, combined by log-sum-exp; None chooses from the
            batch size, kv heads, cache capacity and core / SM count.
        return_lse: also return the fp32 log-sum-exp (B, H, Nq) (-inf for rows that see no key).
        backend: "triton", "cuda", "cpu", "reference" or None (fastest that fits; env PYATTN_BACKEND).

    Returns:
        out (B, H, Nq, D) in q's dtype (rows that see no key are 0), and lse if requested.

    Equivalent PyTorch (contiguous cache, no new tokens, Nq = 1)::

        for b in range(B):
            L = int(cache_seqlens[b])
            k = k_cache[b, :, :L].repeat_interleave(H // Hkv, 0)
            v = v_cache[b, :, :L].repeat_interleave(H // Hkv, 0)
            out[b] = torch.softmax(q[b] @ k.transpose(-1, -2) * scale, -1) @ v
    """
    check_backend_arg(backend)
    capacity, n_app, slopes, sc = _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new, block_table,
                                            alibi_slopes, scale, num_splits)
    wl, wr = _check_window(window)
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    B, H, Nq, D = q.shape
    name = _dispatch.select_backend("decode_attention", "decode", q.device, backend, (q.dtype, D))
    splits = num_splits if num_splits is not None else choose_num_splits(B, k_cache.shape[1], capacity, q.device)
    q = _unit_last_stride(q)
    direct = _dispatch.direct_call_ok(q, k_cache, v_cache, cache_seqlens, block_table, k_new, v_new, slopes)
    if k_new is not None:
        kn, vn = _unit_last_stride(k_new), _unit_last_stride(v_new)
        if direct:
            _append_impl(name, k_cache, v_cache, kn, vn, cache_seqlens, block_table)
        else:
            decode_kv_append(k_cache, v_cache, kn, vn, cache_seqlens, block_table, name)
    args = (q, k_cache, v_cache, cache_seqlens, block_table, slopes, sc, wl, wr, n_app, int(splits), name)
    if direct:
        out, lse = _forward_impl(name, *args[:-1])
    else:
        out, lse = decode_attention_fwd(*args)
    return (out, lse) if return_lse else out
