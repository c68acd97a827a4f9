"""Hugging Face transformers integration: ``attn_implementation="pyattn"``.

Importing this module registers pyattn with transformers' public interfaces (idempotent, see
:func:`register`)::

    import pyattn.integrations.transformers  # noqa: F401  (registers "pyattn")
    model = AutoModel.from_pretrained(path, attn_implementation="pyattn")
    # or, on a loaded model:  model.set_attn_implementation("pyattn")

Every attention layer that goes through ``ALL_ATTENTION_FUNCTIONS`` (BERT, RoBERTa, Llama,
Mistral, Qwen2/3, ...) then runs :func:`pyattn.attention`, and generation steps (a few queries
against a much longer key/value cache, no padding) run :func:`pyattn.decode_attention`. Two
functions are registered:

* ``AttentionInterface["pyattn"]`` -> :func:`pyattn_attention_forward`, called by each attention
  layer as ``fn(module, query, key, value, attention_mask, dropout=, scaling=, **kwargs)`` with
  query (B, H, Nq, D), key/value (B, Hkv, Nk, D) and returning ``(out (B, Nq, H, D), None)``.
  GQA runs on the Hkv heads directly (no ``repeat_kv`` copy).
* ``AttentionMaskInterface["pyattn"]`` -> :func:`pyattn_mask`. transformers builds no mask at all
  for an implementation that has no mask function (padding would be silently ignored), so one is
  required. It returns exactly the boolean mask of the ``sdpa`` implementation (or ``None`` where
  ``sdpa`` relies on ``is_causal``), and tags it with its structure when the mask is recognisably
  "key padding AND a causal/sliding-window band": the attention function then passes
  ``key_padding_mask`` + ``causal``/``window`` to the kernels (which skip the key blocks outside
  the band) instead of a dense (B, 1, Nq, Nk) mask. Any other mask (packed sequences, custom 4-D
  masks, image-token overlays, ...) is passed on unchanged as ``attn_mask``, so results match
  ``sdpa`` in every case; only the speed differs.

Semantics follow transformers' ``sdpa_attention_forward`` exactly: with no mask, a layer with
``is_causal`` is causal (top-left aligned, as SDPA) when Nq > 1 and non-causal for a single query.
"""
from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

#: Oldest transformers with ``AttentionInterface`` and ``AttentionMaskInterface`` (masking_utils),
#: enough for the Llama / Mistral / Qwen families. BERT / RoBERTa-family models dispatch through
#: ``AttentionInterface`` only from transformers 5.0 (before, they pick from a fixed eager/sdpa table
#: and raise ``KeyError: 'pyattn'``). Tested on 4.57.6 and 5.24.0.
MIN_TRANSFORMERS_VERSION = "4.53.0"
BERT_MIN_TRANSFORMERS_VERSION = "5.0.0"
IMPLEMENTATION_NAME = "pyattn"


def _import_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError(
            "pyattn.integrations.transformers needs Hugging Face transformers "
            f">= {MIN_TRANSFORMERS_VERSION}: pip install 'transformers>={MIN_TRANSFORMERS_VERSION}'") from exc
    check_transformers_version(transformers.__version__)
    return transformers


def check_transformers_version(version: str) -> None:
    """Raise ImportError with an upgrade hint when ``version`` is older than the minimum supported."""
    from packaging.version import Version

    if Version(version) < Version(MIN_TRANSFORMERS_VERSION):
        raise ImportError(
            f"pyattn.integrations.transformers needs transformers >= {MIN_TRANSFORMERS_VERSION} (for "
            f"AttentionInterface and AttentionMaskInterface), found {version}: "
            f"pip install -U 'transformers>={MIN_TRANSFORMERS_VERSION}'")


_transformers = _import_transformers()
from packaging.version import Version as _Version  # noqa: E402
from transformers import masking_utils as _masking_utils  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402
from transformers.modeling_utils import AttentionInterface  # noqa: E402

from ..attention import attention as _attention  # noqa: E402
from ..attention import varlen_attention as _varlen_attention  # noqa: E402
from ..ops.decode import decode_attention as _decode_attention  # noqa: E402

#: whether BERT / RoBERTa-family models of the installed transformers can use "pyattn"
BERT_USES_ATTENTION_INTERFACE = _Version(_transformers.__version__) >= _Version(BERT_MIN_TRANSFORMERS_VERSION)

_INFO_ATTR = "_pyattn_mask_info"


@dataclass(frozen=True)
class MaskInfo:
    """The structure of an HF mask M (B, 1, Nq, Nk):
    ``M == key_keep[:, None, None, :] & band(window, alignment)``."""

    shape: Tuple[int, int, int, int]
    key_keep: Optional[Tensor]  # (B, Nk) bool, True = real token; None = no padding
    window: Optional[Tuple[Optional[int], Optional[int]]]  # pyattn (left, right); None = full
    causal_alignment: str  # "bottom_right" or "top_left"

    def attention_kwargs(self) -> dict:
        causal = self.window is not None and self.window[1] == 0
        window = self.window
        if causal:
            window = None if self.window[0] is None else (self.window[0], None)
        kpm = None if self.key_keep is None else ~self.key_keep  # pyattn.attention: True = padding
        return dict(key_padding_mask=kpm, causal=causal, window=window,
                    causal_alignment=self.causal_alignment)


def mask_info(mask) -> Optional[MaskInfo]:
    """The :class:`MaskInfo` tag of a mask built by :func:`pyattn_mask` (None if untagged)."""
    return getattr(mask, _INFO_ATTR, None) if isinstance(mask, Tensor) else None


# --------------------------------------------------------------------------------------------
# mask function
# --------------------------------------------------------------------------------------------

def _band_of(pattern: Tensor) -> Optional[Tuple[int, int]]:
    """(lo, hi) when the (Nq, Nk) bool pattern is exactly {lo <= j - i <= hi}, else None."""
    Nq, Nk = pattern.shape
    if not bool(pattern.any()):
        return None
    d = torch.arange(Nk, device=pattern.device)[None, :] - torch.arange(Nq, device=pattern.device)[:, None]
    lo, hi = int(d[pattern].min()), int(d[pattern].max())
    if not torch.equal(pattern, (d >= lo) & (d <= hi)):
        return None
    return lo, hi


def _band_to_window(lo: int, hi: int, Nq: int, Nk: int):
    """pyattn (window, alignment) for the band lo <= j - i <= hi, or None when not expressible."""
    for alignment, off in (("bottom_right", Nk - Nq), ("top_left", 0)):
        left = None if lo <= -(Nq - 1) else off - lo
        right = None if hi >= Nk - 1 else hi - off
        if (left is None or left >= 0) and (right is None or right >= 0):
            return (None if left is None and right is None else (left, right)), alignment
    return None


def _is_tracing(*tensors) -> bool:
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return True
    return any(isinstance(t, Tensor) and not isinstance(t, torch.nn.Parameter) and type(t) is not Tensor
               for t in tensors)


def _analyse(mask: Tensor, args: dict) -> Optional[MaskInfo]:
    """Recognise M == padding & band; every claim is verified against the materialised mask."""
    if mask.dim() != 4 or mask.dtype != torch.bool or mask.shape[1] != 1:
        return None
    B, _, Nq, Nk = mask.shape
    mask_function = args.get("mask_function")
    if mask_function is None:
        return None
    device = mask.device
    kv_offset = args.get("kv_offset", 0) or 0
    if "q_offset" in args or "q_length" in args:  # transformers >= 5.x
        q_offset = args.get("q_offset", 0) or 0
        if isinstance(q_offset, Tensor):
            q_offset = int(q_offset)
        q_idx = torch.arange(Nq, device=device) + q_offset
    else:  # older releases pass cache_position
        q_idx = args["cache_position"].to(device)
    if isinstance(kv_offset, Tensor):
        kv_offset = int(kv_offset)
    kv_idx = torch.arange(Nk, device=device) + kv_offset
    # the band part (the padding is added by sdpa_mask itself, not by mask_function)
    b0 = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
    pattern = mask_function(b0, torch.zeros_like(b0), q_idx.view(1, 1, Nq, 1), kv_idx.view(1, 1, 1, Nk))
    pattern = torch.as_tensor(pattern, device=device).to(torch.bool).expand(1, 1, Nq, Nk)[0, 0]
    band = _band_of(pattern)
    if band is None:
        return None
    win = _band_to_window(band[0], band[1], Nq, Nk)
    if win is None:
        return None
    window, alignment = win
    padding = args.get("attention_mask")
    keep = None
    if padding is not None:
        padding = _masking_utils.prepare_padding_mask(padding, Nk, kv_offset)
        keep = padding[:, kv_offset:kv_offset + Nk].to(device=device, dtype=torch.bool)
        if tuple(keep.shape) != (B, Nk):
            return None
    expected = pattern[None, None]
    if keep is not None:
        expected = expected & keep[:, None, None, :]
    if not torch.equal(mask, expected.expand(B, 1, Nq, Nk)):
        return None
    if keep is not None and bool(keep.all()):
        keep = None
    return MaskInfo((B, 1, Nq, Nk), keep, window, alignment)


_SDPA_MASK_SIGNATURE = inspect.signature(_masking_utils.sdpa_mask)


def pyattn_mask(*args, **kwargs) -> Optional[Tensor]:
    """``AttentionMaskInterface`` entry: the ``sdpa`` boolean mask (B, 1, Nq, Nk) or None, tagged
    with its :class:`MaskInfo` when it is key padding AND a causal/window band."""
    mask = _masking_utils.sdpa_mask(*args, **kwargs)
    if mask is None or not isinstance(mask, Tensor) or _is_tracing(mask):
        return mask
    try:
        bound = _SDPA_MASK_SIGNATURE.bind(*args, **kwargs)
        bound.apply_defaults()
        params = dict(bound.arguments)
        params.update(params.pop("kwargs", {}) or {})
        info = _analyse(mask, params)
    except Exception:  # an unexpected mask_function: keep the plain (always correct) mask
        info = None
    if info is not None:
        setattr(mask, _INFO_ATTR, info)
    return mask


# --------------------------------------------------------------------------------------------
# attention function
# --------------------------------------------------------------------------------------------

_warned = set()


def _warn_once(msg: str) -> None:
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)


def pyattn_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                             attention_mask: Optional[Tensor], dropout: float = 0.0,
                             scaling: Optional[float] = None, is_causal: Optional[bool] = None,
                             sliding_window: Optional[int] = None, softcap: Optional[float] = None,
                             position_bias: Optional[Tensor] = None, **kwargs) -> Tuple[Tensor, None]:
    """``AttentionInterface`` entry.

    Args:
        query: (B, H, Nq, D); key, value: (B, Hkv, Nk, D) (H a multiple of Hkv; no repeat_kv).
        attention_mask: None, a mask from :func:`pyattn_mask` (bool (B, 1, Nq, Nk), possibly
            tagged), or any bool / additive float mask broadcastable to (B, H, Nq, Nk).
        dropout: attention-probability dropout (models pass 0.0 in eval).
        scaling: softmax scale (default 1/sqrt(D)).
        is_causal: overrides ``module.is_causal``; sliding_window: HF window size w (a query sees
            the w most recent keys, itself included) -- used when there is no mask.
        position_bias: additive float bias broadcastable to (B, H, Nq, Nk) (T5-style models).
        cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k (in kwargs): packed sequences in a
            single row (B == 1), as for flash-attention; then :func:`pyattn.varlen_attention` runs
            each sequence on its own (causal / window within each) and the mask is not needed.

    Returns:
        (out (B, Nq, H, D) contiguous, None): attention weights are never materialised.
    """
    if softcap is not None:
        raise ValueError("attn_implementation='pyattn' does not support `softcap`; use 'eager' for this model")
    if kwargs.get("s_aux") is not None:
        raise ValueError("attn_implementation='pyattn' does not support attention sinks (`s_aux`); use 'eager'")
    if kwargs.get("output_attentions", False):
        _warn_once("attn_implementation='pyattn' does not return attention weights (output_attentions=True); "
                   "use 'eager' to get them")
    B, H, Nq, D = query.shape
    Nk = key.shape[2]
    causal_flag = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    common = dict(scale=scaling, dropout_p=float(dropout) if dropout else 0.0)
    if position_bias is not None:
        common["bias"] = position_bias

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None and B == 1 and position_bias is None:
        # packed sequences (e.g. DataCollatorWithFlattening): one row holding several sequences,
        # described like flash-attention's varlen API -> pyattn.varlen_attention, no mask at all
        window = None
        if causal_flag and sliding_window is not None:
            window = (int(sliding_window) - 1, None)
        max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
        cu_q, cu_k = cu_q.to(torch.int32), cu_k.to(torch.int32)
        if max_q is None:
            max_q = int((cu_q[1:] - cu_q[:-1]).max())
        if max_k is None:
            max_k = int((cu_k[1:] - cu_k[:-1]).max())
        out = _varlen_attention(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                                cu_q, cu_k, int(max_q), int(max_k), causal=causal_flag, window=window, **common)
        return out.unsqueeze(0).contiguous(), None  # (total, H, D) -> (1, Nq, H, D)

    decode = _decode_window(query, key, value, attention_mask, common)
    if decode is not None:
        # a generation step (a few queries against a long cache): the split-K decode kernels
        out = _decode_step(query, key, value, decode[0], decode[1], scaling)
    elif attention_mask is None:
        # transformers' sdpa: causal (top-left) only when there is more than one query
        causal = causal_flag and Nq > 1
        window = None
        if causal and sliding_window is not None and Nk > sliding_window:
            window = (int(sliding_window) - 1, None)
        out = _attention(query, key, value, causal=causal, causal_alignment="top_left", window=window, **common)
    else:
        info = mask_info(attention_mask)
        if info is not None and info.shape[0] == B and info.shape[2:] == (Nq, Nk):
            out = _attention(query, key, value, **info.attention_kwargs(), **common)
        else:
            mask = attention_mask
            if mask.dim() == 4 and mask.shape[-1] > Nk:  # a mask sized for a longer (static) cache
                mask = mask[..., :Nk]
            out = _attention(query, key, value, attn_mask=mask, **common)
    return out.transpose(1, 2).contiguous(), None


# --------------------------------------------------------------------------------------------
# decode steps
#: a call is a decode step when it has at most this many queries and this many times more keys
DECODE_MAX_QUERIES = 16
DECODE_MIN_KEYS_PER_QUERY = 4


def _decode_window(query: Tensor, key: Tensor, value: Tensor, attention_mask: Optional[Tensor], common: dict):
    """(causal, window) for :func:`pyattn.decode_attention` when this call is a decode step whose
    mask it can express (no padding, bottom-right causal / window band); None otherwise."""
    Nq, Nk = query.shape[2], key.shape[2]
    if not (1 <= Nq <= DECODE_MAX_QUERIES and Nk >= DECODE_MIN_KEYS_PER_QUERY * Nq):
        return None
    if common.get("dropout_p") or "bias" in common or key.stride(-1) != 1 or value.stride(-1) != 1 \
            or query.dtype != key.dtype:
        return None
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad):
        return None
    if attention_mask is None:
        # transformers' sdpa with no mask: a single query attends to every key
        return (True, None) if Nq == 1 else None
    info = mask_info(attention_mask)
    if info is None or info.key_keep is not None or info.shape[0] != query.shape[0] \
            or info.shape[2:] != (Nq, Nk) or info.causal_alignment != "bottom_right":
        return None
    kw = info.attention_kwargs()
    return kw["causal"], kw["window"]


def _decode_step(query: Tensor, key: Tensor, value: Tensor, causal: bool, window, scale) -> Tensor:
    """Decode step on the layer's (B, Hkv, Nk, D) key/value cache: every key is valid."""
    B, Nk = query.shape[0], key.shape[2]
    seqlens = torch.full((B,), Nk, dtype=torch.int32, device=query.device)
    return _decode_attention(query, key, value, seqlens, causal=causal, window=window, scale=scale)


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------

_registered = False


def register(name: str = IMPLEMENTATION_NAME) -> str:
    """Register the attention and mask functions under ``name`` (idempotent); returns the name."""
    global _registered
    if AttentionInterface._global_mapping.get(name) is not pyattn_attention_forward:
        AttentionInterface.register(name, pyattn_attention_forward)
    if AttentionMaskInterface._global_mapping.get(name) is not pyattn_mask:
        AttentionMaskInterface.register(name, pyattn_mask)
    _registered = True
    return name


def is_registered(name: str = IMPLEMENTATION_NAME) -> bool:
    return (AttentionInterface._global_mapping.get(name) is pyattn_attention_forward
            and AttentionMaskInterface._global_mapping.get(name) is pyattn_mask)


register()

__all__ = ["register", "is_registered", "pyattn_attention_forward", "pyattn_mask", "mask_info", "MaskInfo",
           "MIN_TRANSFORMERS_VERSION", "BERT_MIN_TRANSFORMERS_VERSION", "IMPLEMENTATION_NAME"]
