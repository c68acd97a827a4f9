"""``pyattn.lsh_attention``: Reformer's shared-QK LSH attention as a fused, trainable op.

Hashing (a small matmul + argmax) and the per-round argsort run in torch; the chunked attention
over the bucket-sorted sequence, its unsort and its backward are the fused op of
pyattn/ops/lsh.py (backends cpu, triton, cuda, reference).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _dispatch
from ._autocast import autocast_inputs
from ._validate import FLOAT_DTYPES, check_backend_arg, check_int, check_same_device, check_same_dtype, \
    check_shape, check_tensor
from .ops.lsh import MAX_HEAD_DIM, lsh_forward
from .reference.lsh import bucket_factors, hash_buckets, len_norm, mask_values, rotation_size, \
    sort_by_bucket

_ALL_FLOATS = FLOAT_DTYPES + (torch.float64,)
Buckets = Union[int, Sequence[int]]


def default_n_buckets(seq_len: int, chunk_length: int, max_position_embeddings: Optional[int] = None) -> Buckets:
    """The bucket count transformers picks when ``num_buckets`` is None (``_set_num_buckets``):
    the power of two just below 2 * seq_len / chunk_length, factorised into two powers of two when
    it exceeds 2 * max(sqrt(max_position_embeddings / chunk_length), chunk_length).
    ``max_position_embeddings`` defaults to ``seq_len``."""
    max_pos = seq_len if max_position_embeddings is None else max_position_embeddings
    pow2 = (2 * (seq_len // chunk_length)).bit_length() - 1
    n = 2 ** pow2
    limit = 2 * max(int((max_pos // chunk_length) ** 0.5), chunk_length)
    if n > limit:
        return [2 ** (pow2 // 2), 2 ** (pow2 - pow2 // 2)]
    return n


def draw_rotations(n_heads: int, head_dim: int, n_hashes: int, n_buckets: Buckets, *, seed: Optional[int] = None,
                   dtype=torch.float32, device="cpu") -> Tensor:
    """Random rotations (H, D, n_hashes, rotation_size // 2) as transformers draws them: with a seed,
    the same numbers as ``torch.manual_seed(seed); torch.randn(shape, dtype=dtype)`` on CPU (without
    touching the global RNG); without one, from the global RNG on ``device``."""
    shape = (n_heads, head_dim, n_hashes, rotation_size(n_buckets))
    if seed is None:
        return torch.randn(shape, dtype=dtype, device=device)
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randn(shape, generator=gen, dtype=dtype).to(device)


def _check_buckets(n_buckets) -> Optional[Buckets]:
    if n_buckets is None:
        return None
    if isinstance(n_buckets, (list, tuple)):
        if len(n_buckets) == 0:
            raise ValueError("n_buckets as a list must hold at least one bucket factor, got []")
        factors = list(n_buckets)
    else:
        factors = [n_buckets]
    for f in factors:
        if isinstance(f, bool) or not isinstance(f, int):
            raise TypeError(f"n_buckets must be an even int or a list of even ints, got {n_buckets!r}")
        if f < 2 or f % 2:
            raise ValueError(f"n_buckets must be even and >= 2 (each factor when a list), got {n_buckets!r}")
    return factors if isinstance(n_buckets, (list, tuple)) else n_buckets


def _validate(qk, v, n_hashes, n_buckets, chunk_length, chunks_before, chunks_after, causal, key_padding_mask,
              rotations, seed, scale, dropout_p, return_lse, backend):
    check_backend_arg(backend)
    check_tensor("qk", qk, dtypes=_ALL_FLOATS)
    check_tensor("v", v, dtypes=_ALL_FLOATS)
    if qk.dim() != 4:
        raise ValueError(f"qk must be 4-D (B, H, N, D), got shape {tuple(qk.shape)}")
    check_shape("v", v, qk.shape, "same as qk")
    check_same_dtype("v", v, "qk", qk)
    check_same_device("v", v, "qk", qk)
    D = qk.shape[-1]
    if not 1 <= D <= MAX_HEAD_DIM and qk.dtype != torch.float64:
        raise ValueError(f"head dim (qk.shape[-1]) must be in [1, {MAX_HEAD_DIM}], got {D}")
    check_int("n_hashes", n_hashes, 1)
    n_buckets = _check_buckets(n_buckets)
    check_int("chunk_length", chunk_length, 1)
    check_int("chunks_before", chunks_before, 0)
    check_int("chunks_after", chunks_after, 0)
    for name, flag in (("causal", causal), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    B, N = qk.shape[0], qk.shape[2]
    if key_padding_mask is not None:
        check_tensor("key_padding_mask", key_padding_mask, dtypes=(torch.bool,))
        check_shape("key_padding_mask", key_padding_mask, (B, N), "(B, N), True = padding")
        check_same_device("key_padding_mask", key_padding_mask, "qk", qk)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
    if rotations is not None:
        check_tensor("rotations", rotations, dtypes=_ALL_FLOATS)
        check_same_device("rotations", rotations, "qk", qk)
        if seed is not None:
            raise ValueError("give either rotations or seed, not both")
        H = qk.shape[1]
        if rotations.dim() != 4 or tuple(rotations.shape[:3]) != (H, D, n_hashes):
            raise ValueError(f"rotations must have shape (H, D, n_hashes, n_buckets // 2) = ({H}, {D}, {n_hashes}, "
                             f"n_buckets // 2), got {tuple(rotations.shape)}")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return n_buckets


def _check_sort(sort, qk: Tensor, n_hashes: int, chunk_length: int) -> None:
    B, H, N, _ = qk.shape
    R, Np = (1, N) if N <= chunk_length else (n_hashes, -(-N // chunk_length) * chunk_length)
    check_tensor("sort", sort, dtypes=(torch.int64,))
    check_shape("sort", sort, (B, H, R * Np), "(B, H, n_hashes * N padded to chunk_length), as returned")
    check_same_device("sort", sort, "qk", qk)
    if sort.numel() and (int(sort.min()) < 0 or int(sort.max()) >= Np):
        raise ValueError(f"sort must hold positions in [0, {Np}), got values in [{int(sort.min())}, {int(sort.max())}]")


def _unit_last_stride(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def lsh_attention(qk: Tensor, v: Tensor, *, n_hashes: int = 1, n_buckets: Optional[Buckets] = None,
                  chunk_length: int = 64, chunks_before: int = 1, chunks_after: int = 0, causal: bool = False,
                  key_padding_mask: Optional[Tensor] = None, rotations: Optional[Tensor] = None,
                  seed: Optional[int] = None, scale: Optional[float] = None, dropout_p: float = 0.0,
                  return_lse: bool = False, backend: Optional[str] = None) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Shared-QK LSH attention (Reformer, Kitaev et al. 2020), the semantics of transformers'
    ``LSHSelfAttention`` (given the same rotations) as one fused, differentiable op.

    Args:
        qk: (B, H, N, D) shared query/key vectors, fp32/fp16/bf16 (fp64: reference backend only).
            Queries are qk; keys are ``qk / sqrt(mean(qk^2) + 1e-6) * scale``.
        v: (B, H, N, D) values.
        n_hashes: hash rounds R; the rounds' outputs are combined with softmax weights of their
            log-sum-exp.
        n_buckets: even int, or a list of even ints (factorised buckets, product = bucket count);
            None = transformers' default for the (padded) length (:func:`default_n_buckets`).
        chunk_length: rows per chunk of the sorted sequence. Each chunk attends to itself and to
            ``chunks_before`` / ``chunks_after`` neighbouring chunks, cyclically over all rounds'
            chunks (transformers' wrap-around).
        causal: mask keys whose original position is after the query's.
        key_padding_mask: (B, N) bool, True = padding (PyTorch's meaning, as in
            ``nn.MultiheadAttention``): those keys are masked and hashed to an extra last bucket.
        rotations: (H, D, n_hashes, n_buckets // 2) (factorised: sum(n_buckets) // 2) random
            rotations; or ``seed`` to draw them as transformers does with ``hash_seed`` (see
            :func:`draw_rotations`); neither: drawn from the global RNG.
        scale: key scale, default D ** -0.5 (transformers' division by sqrt(D)).
        dropout_p: dropout on the attention probabilities (counter-based mask, replayed in backward).
        return_lse: also return the combined log-sum-exp (B, H, N) fp32.
        backend: "cpu", "triton", "cuda", "reference" or None (env PYATTN_BACKEND, else first that fits).

    Returns:
        out (B, H, N, D) in qk's dtype, or ``(out, lse)``.

    Per round: buckets = argmax([x R; -x R]) of qk, stable sort by (bucket, position), chunked
    attention, unsort. A position never attends to itself unless no other key is visible (the
    self score is Hugging Face's -1e5, fp16 -1e3; masked scores -1e9, fp16 -1e4). Hashing is not
    differentiated; gradients reach qk (query and key roles, through the normalisation) and v.

    Behaviour at the edges, as transformers (documented deviations marked *):
        * N <= chunk_length: plain full attention with the same masks (no hashing, one round).
        * N > chunk_length, N not a multiple of chunk_length: the sequence is padded to the next
          multiple with key padding, as ``ReformerModel`` does (``LSHSelfAttention`` alone raises).
        * transformers has no duplicate-count correction between rounds; neither has pyattn.
        * (*) dropout uses pyattn's counter-based mask, not torch's RNG stream.
        * (*) with ``seed`` the global RNG is left untouched (transformers calls torch.manual_seed).
        * (*) n_buckets=None is resolved per call; transformers stores the first call's value.
        * (*) scores are computed in fp32 for fp16/bf16 inputs (transformers: in the input dtype).

    Equivalent PyTorch: pyattn/reference/lsh.py (``hash_buckets``, ``sort_by_bucket``,
    ``lsh_chunks_reference``, ``combine_rounds``).
    """
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    out, lse, _ = lsh_attention_and_sort(qk, v, n_hashes=n_hashes, n_buckets=n_buckets, chunk_length=chunk_length,
                                         chunks_before=chunks_before, chunks_after=chunks_after, causal=causal,
                                         key_padding_mask=key_padding_mask, rotations=rotations, seed=seed,
                                         scale=scale, dropout_p=dropout_p, backend=backend)
    return (out, lse) if return_lse else out


def lsh_attention_and_sort(qk: Tensor, v: Tensor, *, n_hashes: int = 1, n_buckets: Optional[Buckets] = None,
                           chunk_length: int = 64, chunks_before: int = 1, chunks_after: int = 0,
                           causal: bool = False, key_padding_mask: Optional[Tensor] = None,
                           rotations: Optional[Tensor] = None, seed: Optional[int] = None,
                           scale: Optional[float] = None, dropout_p: float = 0.0, backend: Optional[str] = None,
                           sort: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`lsh_attention` (arguments the same) returning ``(out, lse, sort)``: ``sort`` int64
    (B, H, R * Np) holds the original positions in (round, bucket, position) order, Np = N padded to
    the chunk multiple (R = 1, Np = N when N <= chunk_length).

    Given ``sort`` from an earlier call on the same qk (a reversible network recomputing a layer
    in backward), the hashing and sorting are skipped and that order is used: the recomputation
    then sees exactly the forward's buckets, whatever rounding does to the rebuilt qk. Rotations
    drawn from the global RNG (no ``seed`` / ``rotations``) are still drawn, so that the RNG
    stream (the dropout seed after them, the caller's next draws) advances as in that call.
    """
    qk, v = autocast_inputs(qk, v)
    n_buckets = _validate(qk, v, n_hashes, n_buckets, chunk_length, chunks_before, chunks_after, causal,
                          key_padding_mask, rotations, seed, scale, dropout_p, False, backend)
    B, H, N, D = qk.shape
    if sort is not None:
        _check_sort(sort, qk, n_hashes, chunk_length)
    scale = D ** -0.5 if scale is None else float(scale)
    if qk.numel() == 0:
        return qk.new_zeros(qk.shape), qk.new_zeros((B, H, 0), dtype=torch.float32), \
            torch.zeros((B, H, 0), dtype=torch.int64, device=qk.device)
    kpm = key_padding_mask
    if N <= chunk_length:
        L, nb, na, R, Np = N, 0, 0, 1, N
        perm = sort if sort is not None else torch.arange(N, device=qk.device).expand(B, H, N).contiguous()
        qkp, vp = qk, v
    else:
        L, nb, na, R = chunk_length, chunks_before, chunks_after, n_hashes
        Np = -(-N // L) * L
        qkp, vp = qk, v
        if Np != N:
            qkp = F.pad(qk, (0, 0, 0, Np - N))
            vp = F.pad(v, (0, 0, 0, Np - N))
            pad = torch.ones(B, Np - N, dtype=torch.bool, device=qk.device)
            base = kpm if kpm is not None else torch.zeros(B, N, dtype=torch.bool, device=qk.device)
            kpm = torch.cat([base, pad], dim=1)
        if n_buckets is None:
            n_buckets = default_n_buckets(Np, L)
        if rotations is None:
            rotations = draw_rotations(H, D, R, n_buckets, seed=seed, dtype=qk.dtype, device=qk.device)
        else:
            check_shape("rotations", rotations, (H, D, R, rotation_size(n_buckets)),
                        f"(H, D, n_hashes, {'sum(n_buckets)' if len(bucket_factors(n_buckets)) > 1 else 'n_buckets'}"
                        " // 2)")
        if sort is not None:
            perm = sort
        else:
            with torch.no_grad():
                perm = sort_by_bucket(hash_buckets(qkp, n_buckets, rotations, kpm))
    name = _dispatch.select_backend("lsh_attention", "lsh", qk.device, backend, (qk.dtype, D, L))
    keys = len_norm(qkp) * scale
    mv, smv = mask_values(qk.dtype)
    drop_seed = None
    if dropout_p > 0:
        drop_seed = torch.randint(0, 2**31 - 1, (), dtype=torch.int64)
    kpm_arg = kpm.contiguous() if kpm is not None else None
    out, lse, _ = lsh_forward(_unit_last_stride(qkp), _unit_last_stride(keys), _unit_last_stride(vp), perm,
                              kpm_arg, L, nb, na, causal, mv, smv, float(dropout_p), drop_seed, name)
    if Np != N:
        out, lse = out[:, :, :N], lse[:, :, :N]
    return out, lse, perm
