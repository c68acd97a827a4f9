"""Public attention API: ``attention``, ``varlen_attention`` and ``sdpa``.

All three are front ends of one engine (pyattn/ops/attention.py): they validate the inputs,
turn masks into the engine's arguments (band, key padding, additive bias, ALiBi, dropout seed)
and pick a backend.
"""
from __future__ import annotations

import typing
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _dispatch
from ._autocast import autocast_inputs
from ._validate import (FLOAT_DTYPES, InputError, InputTypeError, check_backend_arg, check_probability,
                        check_same_device, check_same_dtype, check_tensor)
from .ops.attention import _NO_BLOCK_SCHEDULE, MAX_HEAD_DIM, attention_forward

_ALL_FLOATS = FLOAT_DTYPES + (torch.float64,)


def _unit_last_stride(t: Tensor) -> Tensor:
    """Kernels take any strides but need contiguous head dims; copy only when that fails."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _check_qkv(q, k, v, *, packed: bool):
    rank = 3 if packed else 4
    layout = "(total, H, D)" if packed else "(B, H, N, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, dtypes=_ALL_FLOATS)
        if t.dim() != rank:
            raise InputError(f"{name} must be {rank}-D {layout}, got shape {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        check_same_dtype(name, t, "q", q)
        check_same_device(name, t, "q", q)
    hdim = 1 if packed else 1
    H, Hkv = q.shape[hdim], k.shape[hdim]
    D = q.shape[-1]
    if k.shape[-1] != D:
        raise InputError(f"k head dim {k.shape[-1]} must equal q head dim {D}")
    if v.shape[-1] != D:
        raise InputError(f"v head dim {v.shape[-1]} must equal q head dim {D} (use pyattn.sdpa for a different value dim)")
    if v.shape[:-1] != k.shape[:-1]:
        raise InputError(f"v must have the shape of k in all but the last dim: k {tuple(k.shape)}, v {tuple(v.shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise InputError(f"the number of query heads ({H}) must be a multiple of the number of key/value heads ({Hkv})")
    if not packed and k.shape[0] != q.shape[0]:
        raise InputError(f"k batch size {k.shape[0]} must equal q batch size {q.shape[0]}")
    if not 1 <= D <= MAX_HEAD_DIM and q.dtype != torch.float64:
        raise InputError(f"head dim must be in [1, {MAX_HEAD_DIM}], got {D}")


def _check_window(window) -> Tuple[int, int]:
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise InputTypeError(f"window must be a (left, right) pair, got {window!r}")
    out = []
    for side, w in zip(("left", "right"), window):
        if w is None:
            out.append(-1)
            continue
        if isinstance(w, bool) or not isinstance(w, int):
            raise InputTypeError(f"window {side} size must be an int or None, got {type(w).__name__}")
        if w < 0:
            raise InputError(f"window {side} size must be >= 0 (None = unbounded), got {w}")
        out.append(w)
    return out[0], out[1]


def _check_dropout(dropout_p) -> float:
    return check_probability("dropout_p", dropout_p)


def _check_scale(scale, D: int) -> float:
    if scale is None:
        return D ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InputTypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def _check_generator(generator, q: Tensor) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    gdev = torch.device(generator.device)
    if gdev.type != q.device.type or (gdev.index is not None and q.device.index is not None
                                      and gdev.index != q.device.index):
        raise ValueError(f"generator is on {gdev} but q is on {q.device}; pass a generator of q's device "
                         f"(torch.Generator(device=q.device))")


def _dropout_seed(dropout_p: float, generator: Optional[torch.Generator], q: Tensor) -> Optional[Tensor]:
    """The dropout seed: an int64 scalar replayed in the backward. Drawn from ``generator`` on its own
    device (it must be q's), else from torch's default CPU generator (seeded by torch.manual_seed)."""
    _check_generator(generator, q)
    if dropout_p == 0.0:
        return None
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, generator=generator, device=device)


def _broadcast_bias(name: str, t: Tensor, B: int, H: int, Nq: int, Nk: int, q: Tensor) -> Tensor:
    check_same_device(name, t, "q", q)
    if t.dim() > 4:
        raise InputError(f"{name} must be broadcastable to (B, H, Nq, Nk) = {(B, H, Nq, Nk)}, got shape {tuple(t.shape)}")
    try:
        return t.expand(B, H, Nq, Nk)
    except RuntimeError:
        raise InputError(f"{name} must be broadcastable to (B, H, Nq, Nk) = {(B, H, Nq, Nk)}, "
                         f"got shape {tuple(t.shape)}") from None


def _bias_4d(t: Tensor, B: int, H: int, Nq: int, Nk: int, q: Tensor) -> Tensor:
    """``bias`` checked against (B, H, Nq, Nk) and viewed as 4-D with its broadcast dims kept at size 1,
    so that the backward reduces its gradient to that shape without a (B, H, Nq, Nk) buffer."""
    _broadcast_bias("bias", t, B, H, Nq, Nk, q)
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))


def _mask_to_bias(attn_mask: Tensor, B, H, Nq, Nk, q: Tensor) -> Tensor:
    if attn_mask.dtype == torch.bool:
        m = _broadcast_bias("attn_mask", attn_mask, B, H, Nq, Nk, q)
        zero = torch.zeros((), dtype=q.dtype, device=q.device)
        return torch.where(m, zero, torch.tensor(float("-inf"), dtype=q.dtype, device=q.device))
    if attn_mask.dtype not in _ALL_FLOATS:
        raise InputTypeError(f"attn_mask must be bool (True = attend) or a float additive mask, got {attn_mask.dtype}")
    return _broadcast_bias("attn_mask", attn_mask, B, H, Nq, Nk, q)


def _check_alibi(alibi_slopes, B, H, q) -> Optional[Tensor]:
    if alibi_slopes is None:
        return None
    check_tensor("alibi_slopes", alibi_slopes, dtypes=_ALL_FLOATS)
    check_same_device("alibi_slopes", alibi_slopes, "q", q)
    if tuple(alibi_slopes.shape) not in ((H,), (B, H)):
        raise InputError(f"alibi_slopes must have shape (H,) = ({H},) or (B, H) = ({B}, {H}), got {tuple(alibi_slopes.shape)}")
    return alibi_slopes.to(torch.float32).expand(B, H)


def _key_padding(key_padding_mask: Optional[Tensor], B: int, Nk: int,
                 q: Tensor) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """The public ``key_padding_mask`` (PyTorch's meaning) -> (keep-mask, additive (B, Nk) bias).

    The internal ops (pyattn/ops, kernels, reference) take a keep-mask: True = attend to that key.
    """
    if key_padding_mask is None:
        return None, None
    check_tensor("key_padding_mask", key_padding_mask, ndim=2, dtypes=(torch.bool,) + _ALL_FLOATS)
    check_same_device("key_padding_mask", key_padding_mask, "q", q)
    if tuple(key_padding_mask.shape) != (B, Nk):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({B}, {Nk}), got {tuple(key_padding_mask.shape)}")
    if key_padding_mask.dtype == torch.bool:
        return ~key_padding_mask, None  # True = padding (ignored) -> True = keep
    return None, key_padding_mask  # float: added to the scores, as torch.nn.MultiheadAttention does


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: Optional[float] = None,
              key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None,
              bias: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
              window: Optional[Tuple[Optional[int], Optional[int]]] = None, dropout_p: float = 0.0,
              causal_alignment: str = "bottom_right", return_lse: bool = False,
              generator: Optional[torch.Generator] = None,
              backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Fused softmax attention (FlashAttention-2: tiled, online softmax, O(N) memory).

    Args:
        q: (B, H, Nq, D); k, v: (B, Hkv, Nk, D) with H a multiple of Hkv (MHA, GQA, MQA). Any
            strides: a (B, N, H, D) tensor viewed with ``.transpose(1, 2)`` is used without a copy.
            fp32, fp16 or bf16; D in [1, 256].
        causal: query i sees keys j <= i + (Nk - Nq) (bottom-right aligned, the KV-cache
            convention; ``causal_alignment="top_left"`` gives SDPA's j <= i)::

                Nq=2, Nk=5, bottom_right     Nq=2, Nk=5, top_left
                q0: x x x x .                q0: x . . . .
                q1: x x x x x                q1: x x . . .

        scale: defaults to 1/sqrt(D).
        key_padding_mask: (B, Nk), PyTorch's meaning (as in ``torch.nn.MultiheadAttention``):
            bool with **True = padding, that key is ignored**; or a float mask added to the scores
            of every query (``-inf`` = ignored). A BERT / Hugging Face ``attention_mask``
            (1 = real token) is passed as ``key_padding_mask=attention_mask == 0``. A bool mask
            costs nothing extra (the kernels read it per key); a float one becomes an additive bias.
        attn_mask: bool (True = attend) or additive float, broadcastable to (B, H, Nq, Nk).
        bias: additive float broadcastable to (B, H, Nq, Nk); gets a gradient when it requires grad,
            reduced to the bias's own shape. A bias shared by the batch ((1, H, Nq, Nk), (Nq, Nk), ...)
            gets it one batch element at a time, with no (B, H, Nq, Nk) buffer (not with dropout).
        alibi_slopes: (H,) or (B, H): adds -slope * |i + Nk - Nq - j|.
        window: (left, right) sliding window around the (aligned) diagonal; None on a side = unbounded.
            Key blocks outside the band are never visited: cost is O(N * window).
        dropout_p: dropout on the attention probabilities (training); the mask is a counter-based
            hash of a seed drawn from torch's RNG, replayed exactly in the backward.
        return_lse: also return the fp32 log-sum-exp (B, H, Nq) (-inf for rows that see no key).
        generator: optional ``torch.Generator`` on q's device (another device: ValueError) from which
            the dropout seed is drawn; None: torch's default CPU generator (``torch.manual_seed``).
            Unused without dropout.
        backend: "triton", "cuda", "cpu", "reference" or None (fastest that fits; env PYATTN_BACKEND).

    Returns:
        out (B, H, Nq, D) in q's dtype (rows that see no key are 0), and lse if requested.

    Special values: NaN and +-inf in q, k, v or bias propagate as in the materialised formula
    below, on every backend: a NaN or inf in a query row makes that row NaN (inf - inf in the
    softmax), a NaN key makes every row that sees it NaN, an inf in v gives inf in its channel,
    a bias entry of NaN or +inf makes its row NaN and -inf hides the key. Rows that see no key
    (causal or window band, key padding, boolean masks) are 0 whatever their query holds; a float
    bias or float mask adds, so NaN + -inf is still NaN. A NaN in v at a key the row does not see
    may reach the row (0 * NaN) when that key shares a tile with visible ones.

    Equivalent PyTorch (no mask)::

        out = torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v

    With a bool ``key_padding_mask`` (True = padding), as SDPA's keep-mask::

        F.scaled_dot_product_attention(q, k, v, attn_mask=~key_padding_mask[:, None, None, :])
    """
    check_backend_arg(backend)
    q, k, v = autocast_inputs(q, k, v)
    _check_qkv(q, k, v, packed=False)
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    wl, wr = _check_window(window)
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    if causal_alignment not in ("bottom_right", "top_left"):
        raise ValueError(f"causal_alignment must be 'bottom_right' or 'top_left', got {causal_alignment!r}")
    p = _check_dropout(dropout_p)
    sc = _check_scale(scale, D)
    keep, kpm_bias = _key_padding(key_padding_mask, B, Nk, q)
    full_bias = None
    if bias is not None:
        check_tensor("bias", bias, dtypes=_ALL_FLOATS)
        full_bias = _bias_4d(bias, B, H, Nq, Nk, q)
    if kpm_bias is not None:
        kb = _broadcast_bias("key_padding_mask", kpm_bias[:, None, None, :], B, H, Nq, Nk, q)
        full_bias = kb if full_bias is None else full_bias + kb
    bool_mask = None
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
        if attn_mask.dtype == torch.bool and full_bias is None and alibi_slopes is None:
            bool_mask = _broadcast_bias("attn_mask", attn_mask, B, H, Nq, Nk, q)  # a view
        else:
            mask_bias = _mask_to_bias(attn_mask, B, H, Nq, Nk, q)
            full_bias = mask_bias if full_bias is None else full_bias + mask_bias
    slopes = _check_alibi(alibi_slopes, B, H, q)
    name = _dispatch.select_backend("attention", "attention", q.device, backend, (q.dtype, D))
    if bool_mask is not None and name not in _NO_BLOCK_SCHEDULE:
        # a boolean mask costs bits, not floats: a block schedule (skipped / full / partial blocks)
        # plus the packed mask bits of the partial blocks
        from .block_mask import BlockMask
        from .block_sparse import run_schedule
        layout = BlockMask.from_bool_mask(bool_mask, block_size=64, always_bits=True)
        out, lse = run_schedule(q, k, v, layout, keep, sc, wl, wr, causal_alignment == "bottom_right", p,
                                _dropout_seed(p, generator, q), name)
        return (out, lse) if return_lse else out
    if bool_mask is not None:
        full_bias = _mask_to_bias(attn_mask, B, H, Nq, Nk, q)
    out, lse = attention_forward(_unit_last_stride(q), _unit_last_stride(k), _unit_last_stride(v),
                                 full_bias, slopes, keep, None, None, Nq, Nk, sc, wl, wr,
                                 causal_alignment == "bottom_right", p, _dropout_seed(p, generator, q), name)
    return (out, lse) if return_lse else out


def _check_cu_seqlens(name: str, cu: Tensor, total: int, q: Tensor) -> int:
    """Checks the cumulative lengths (one host copy of the S + 1 ints); returns the longest length."""
    check_tensor(name, cu, ndim=1, dtypes=(torch.int32,))
    check_same_device(name, cu, "q", q)
    if cu.numel() < 2:
        raise InputError(f"{name} must have at least 2 entries (S + 1), got {cu.numel()}")
    c = cu.cpu()
    if int(c[0]) != 0:
        raise InputError(f"{name} must start at 0, got {int(c[0])}")
    if bool((c[1:] < c[:-1]).any()):
        raise InputError(f"{name} must be non-decreasing, got {c.tolist()[:16]}")
    if int(c[-1]) != total:
        raise InputError(f"{name}[-1] must equal the number of packed tokens {total}, got {int(c[-1])}")
    return int((c[1:] - c[:-1]).max())


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     window: Optional[Tuple[Optional[int], Optional[int]]] = None, scale: Optional[float] = None,
                     dropout_p: float = 0.0, alibi_slopes: Optional[Tensor] = None, return_lse: bool = False,
                     generator: Optional[torch.Generator] = None,
                     backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Attention over packed variable-length sequences (no padding is computed).

    Args:
        q: (total_q, H, D); k, v: (total_k, Hkv, D) — sequences concatenated along dim 0.
        cu_seqlens_q, cu_seqlens_k: int32 (S + 1,) cumulative lengths starting at 0: sequence s
            owns rows cu[s]:cu[s+1]. ``pyattn.unpad`` builds them from a padding mask.
        max_seqlen_q, max_seqlen_k: host ints, at least the longest sequence length in
            cu_seqlens_q / cu_seqlens_k (smaller: ValueError; the GPU kernels size their grids from them).
        causal, window, scale, dropout_p, alibi_slopes ((H,) or (S, H)), generator: as in
            :func:`attention`, applied within each sequence (causal is bottom-right aligned per sequence).

    Returns:
        out (total_q, H, D), and lse (H, total_q) if requested.
    """
    check_backend_arg(backend)
    q, k, v = autocast_inputs(q, k, v)
    _check_qkv(q, k, v, packed=True)
    total_q, H, D = q.shape
    total_k = k.shape[0]
    longest_q = _check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, q)
    longest_k = _check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, total_k, q)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise InputError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, "
                         f"got {cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    for name, val in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if isinstance(val, bool) or not isinstance(val, int):
            raise InputTypeError(f"{name} must be an int, got {type(val).__name__}")
    # the GPU kernels size their grids from these: a value below the longest sequence would skip rows
    for name, val, longest, cu_name in (("max_seqlen_q", max_seqlen_q, longest_q, "cu_seqlens_q"),
                                        ("max_seqlen_k", max_seqlen_k, longest_k, "cu_seqlens_k")):
        if val < longest:
            raise InputError(f"{name} must be >= the longest sequence in {cu_name} ({longest}), got {val}")
    S = cu_seqlens_q.numel() - 1
    wl, wr = _check_window(window)
    if causal:
        wr = 0 if wr < 0 else min(wr, 0)
    p = _check_dropout(dropout_p)
    sc = _check_scale(scale, D)
    slopes = _check_alibi(alibi_slopes, S, H, q) if alibi_slopes is not None else None
    name = _dispatch.select_backend("varlen_attention", "attention", q.device, backend, (q.dtype, D))
    q4 = _unit_last_stride(q).transpose(0, 1).unsqueeze(0)  # (1, H, total_q, D) view, no copy
    k4 = _unit_last_stride(k).transpose(0, 1).unsqueeze(0)
    v4 = _unit_last_stride(v).transpose(0, 1).unsqueeze(0)
    out, lse = attention_forward(q4, k4, v4, None, slopes, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                 int(max_seqlen_k), sc, wl, wr, True, p, _dropout_seed(p, generator, q), name)
    out = out[0].transpose(0, 1)
    return (out, lse[0]) if return_lse else out


def _broadcast_batch(query: Tensor, key: Tensor, value: Tensor, inner: int) -> Tuple[int, ...]:
    """The broadcast batch dims of query, key and value (all but their last ``inner`` dims)."""
    try:
        return tuple(torch.broadcast_shapes(query.shape[:-inner], key.shape[:-inner], value.shape[:-inner]))
    except RuntimeError:
        raise InputError(f"the batch dims of query {tuple(query.shape[:-inner])}, key {tuple(key.shape[:-inner])} "
                         f"and value {tuple(value.shape[:-inner])} must broadcast") from None


try:  # torch >= 2.2: mask descriptions that SDPA takes through __torch_function__
    from torch.nn.attention.bias import CausalBias, CausalVariant
except ImportError:  # pragma: no cover - older torch
    CausalBias = CausalVariant = None

_DEFAULT_TORCH_FUNCTION = torch.Tensor.__torch_function__.__func__


def _own_torch_function(t: Tensor) -> bool:
    """True for a Tensor subclass with its own ``__torch_function__`` (not Tensor's, not disabled)."""
    if type(t) in (Tensor, torch.nn.Parameter):
        return False
    tf = getattr(type(t), "__torch_function__", None)
    return getattr(tf, "__func__", tf) not in (_DEFAULT_TORCH_FUNCTION, torch._C._disabled_torch_function_impl)


def _sdpa_mask(attn_mask, is_causal: bool, L: int, S: int) -> Tuple[Optional[Tensor], bool, str]:
    """(attn_mask, is_causal, causal_alignment) for the engine, from SDPA's attn_mask / is_causal.

    A ``torch.nn.attention.bias.CausalBias`` is a description, not a mask (its storage is never
    read): ``causal_upper_left`` is ``is_causal=True``; ``causal_lower_right`` is causal attention
    aligned to the bottom-right corner (query i sees keys j <= i + S - L; when L > S the first
    L - S rows see no key and are 0).
    """
    if CausalBias is not None and isinstance(attn_mask, CausalBias):
        if is_causal:
            raise InputError("attn_mask is a CausalBias, which is already causal; is_causal must be False "
                             "(CausalBias should not be used with causal=True)")
        if (attn_mask.seq_len_q, attn_mask.seq_len_kv) != (L, S):
            raise InputError(f"attn_mask is a CausalBias for (L, S) = ({attn_mask.seq_len_q}, {attn_mask.seq_len_kv}) "
                             f"but query and key give (L, S) = ({L}, {S})")
        if attn_mask.variant == CausalVariant.UPPER_LEFT:
            return None, True, "top_left"
        if attn_mask.variant == CausalVariant.LOWER_RIGHT:
            return None, True, "bottom_right"
        raise InputError(f"attn_mask is a CausalBias with an unknown variant {attn_mask.variant!r}")
    if attn_mask is None:
        return None, bool(is_causal), "top_left"
    if not isinstance(attn_mask, Tensor):
        raise InputTypeError(f"attn_mask must be a torch.Tensor, a CausalBias or None, got {type(attn_mask).__name__}")
    if _own_torch_function(attn_mask):
        # it declined to handle pyattn.sdpa (we are called back with its __torch_function__
        # disabled); its storage need not be the mask it stands for (CausalBias's is not)
        raise InputTypeError(f"attn_mask is a {type(attn_mask).__module__}.{type(attn_mask).__qualname__}, a Tensor "
                             f"subclass with its own __torch_function__ that pyattn.sdpa does not know how to read; "
                             f"pass a plain bool/float tensor (e.g. attn_mask.as_subclass(torch.Tensor)) or a "
                             f"torch.nn.attention.bias.CausalBias")
    if attn_mask.is_nested:
        raise InputError("attn_mask must be a dense tensor, got a nested tensor")
    if is_causal:
        raise InputError("attn_mask must be None when is_causal=True (Explicit attn_mask should not be set when "
                         "is_causal=True); pass one or the other")
    return attn_mask, False, "top_left"


def sdpa(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
         is_causal: bool = False, scale: Optional[float] = None, enable_gqa: bool = False) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and semantics).

    query (..., Hq, L, E), key (..., Hkv, S, E), value (..., Hkv, S, Ev): any number of leading
    batch dims, broadcast between query, key and value as SDPA does; 3-D (N, L, E) and 2-D (L, E)
    inputs too. Hkv must equal Hq, be 1 (broadcast), or divide Hq with ``enable_gqa=True``.
    ``attn_mask``: bool (True = attend) or additive float, broadcastable to (..., Hq, L, S), or a
    ``torch.nn.attention.bias.CausalBias`` (``causal_upper_left`` / ``causal_lower_right``).
    ``is_causal`` is top-left aligned (query i sees keys j <= i) as in SDPA; it cannot be combined
    with an ``attn_mask``. Rows that see no key are 0.

    Errors: bad input raises ``pyattn.InputError`` / ``pyattn.InputTypeError``, which are
    ``ValueError`` / ``TypeError`` and also ``RuntimeError`` (what torch's SDPA raises).

    ``__torch_function__``: the call goes through torch's override protocol (``pyattn.sdpa`` is the
    function a subclass or a TorchFunctionMode sees). A Tensor subclass with its own
    ``__torch_function__`` that does not handle ``pyattn.sdpa`` is not read as a mask (error).

    TorchScript: a scripted module may call ``pyattn.sdpa``; the call runs in Python
    (``torch.jit.ignore``), so the scripted module works in this process (its errors arrive as
    TorchScript's RuntimeError quoting the InputError) but cannot be saved with ``torch.jit.save``.

    Differences from torch: dropout draws its own (equally distributed) mask; a float mask may
    have any float dtype; a CausalBias must match (L, S).

    Equivalent PyTorch::

        torch.nn.functional.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                                         is_causal, scale, enable_gqa)
    """
    return _sdpa_python(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


@torch.jit.ignore  # a scripted caller calls back into Python here
def _sdpa_python(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                 is_causal: bool, scale: Optional[float], enable_gqa: bool) -> Tensor:
    relevant = (query, key, value) if attn_mask is None or (CausalBias is not None and isinstance(
        attn_mask, CausalBias)) else (query, key, value, attn_mask)
    if torch.overrides.has_torch_function(relevant):
        return torch.overrides.handle_torch_function(
            sdpa, relevant, query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
            scale=scale, enable_gqa=enable_gqa)
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise InputError(f"{name} must be a dense tensor, got a nested tensor "
                             f"(pyattn.varlen_attention takes packed variable-length sequences)")
        if t.dim() < 2:
            raise InputError(f"{name} must have at least 2 dims (..., L, E), got shape {tuple(t.shape)}")
    query, key, value = autocast_inputs(query, key, value)  # as SDPA under torch.autocast
    for name, t in (("key", key), ("value", value)):
        check_same_dtype(name, t, "query", query)
        check_same_device(name, t, "query", query)
    if not (query.dim() == key.dim() == value.dim()):
        raise InputError(f"query, key and value must have the same number of dims, got shapes {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(value.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise InputError(f"key and value must have the same sequence length, got {key.shape[-2]} and {value.shape[-2]}")
    if key.shape[-1] != query.shape[-1]:
        raise InputError(f"key head dim {key.shape[-1]} must equal query head dim {query.shape[-1]}")
    attn_mask, is_causal, alignment = _sdpa_mask(attn_mask, is_causal, query.shape[-2], key.shape[-2])
    rank = query.dim()
    L, E = query.shape[-2:]
    S, Ev = key.shape[-2], value.shape[-1]
    if rank <= 3:
        # (N, L, E) / (L, E): no head dim; the mask broadcasts against (N, L, S) / (L, S)
        batch = _broadcast_batch(query, key, value, 2)
        Hq = Hkv = 1
        full_mask_shape = (*batch, L, S)
        query, key, value = query.unsqueeze(-3), key.unsqueeze(-3), value.unsqueeze(-3)
        if attn_mask is not None and isinstance(attn_mask, Tensor):
            try:
                attn_mask = attn_mask.expand(full_mask_shape).unsqueeze(-3)
            except RuntimeError:
                raise InputError(f"attn_mask must be broadcastable to {full_mask_shape}, got shape "
                                 f"{tuple(attn_mask.shape)}") from None
    else:
        batch = _broadcast_batch(query, key, value, 3)
        Hq, Hkv = query.shape[-3], key.shape[-3]
        if value.shape[-3] != Hkv:
            raise InputError(f"key and value must have the same number of heads, got {Hkv} and {value.shape[-3]}")
        if Hkv != Hq:
            if Hkv == 1:
                pass  # broadcast over the query heads (runs as MQA)
            elif not enable_gqa:
                raise InputError(f"query has {Hq} heads and key {Hkv}; pass enable_gqa=True for GQA")
            elif Hq % Hkv != 0:
                raise InputError(f"enable_gqa=True needs the query heads ({Hq}) to be a multiple of the key heads ({Hkv})")
    B = 1
    for b in batch:
        B *= b
    out_shape = (*batch, Hq, L, Ev) if rank > 3 else (*batch, L, Ev)
    Hkv = key.shape[-3]

    def to4(t: Tensor, heads: int) -> Tensor:
        t = t.expand(*batch, heads, *t.shape[-2:])
        return t.reshape(B, heads, *t.shape[-2:])  # a view when the batch dims merge (always for 4-D)

    query, key, value = to4(query, Hq), to4(key, Hkv), to4(value, Hkv)
    if attn_mask is not None and isinstance(attn_mask, Tensor) and len(batch) != 1:
        try:
            attn_mask = attn_mask.expand(*batch, Hq, L, S)
        except RuntimeError:
            raise InputError(f"attn_mask must be broadcastable to {(*batch, Hq, L, S)}, got shape "
                             f"{tuple(attn_mask.shape)}") from None
        attn_mask = attn_mask.reshape(B, Hq, L, S)
    if B == 0 or L == 0 or S == 0 or Hq == 0:
        # nothing to attend to: SDPA returns zeros (rows that see no key are 0)
        return query.new_zeros(out_shape)
    sc = E ** -0.5 if scale is None else scale
    if Ev != E:  # zero-pad the narrower side: scores and outputs are unchanged
        width = max(E, Ev)
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # noqa: E731
        query, key, value = pad(query), pad(key), pad(value)
    out = attention(query, key, value, causal=is_causal, causal_alignment=alignment, scale=sc, attn_mask=attn_mask,
                    dropout_p=dropout_p)
    return out[..., :Ev].reshape(out_shape)


# TorchScript types sdpa and the call into _sdpa_python from their annotations: give it real
# types, not the strings that ``from __future__ import annotations`` leaves
sdpa.__annotations__ = typing.get_type_hints(sdpa)
_sdpa_python.__annotations__ = typing.get_type_hints(_sdpa_python)
