"""Reference LSH attention (Reformer) in plain PyTorch: the oracle of the LSH op family.

The pieces, shared by every backend (hashing and sorting always run in torch):

* :func:`hash_buckets` -- angular LSH, bucket = argmax([x R; -x R]) per hash round, optionally
  factorised; key-padding positions go to an extra last bucket (as in Hugging Face's Reformer).
* :func:`sort_by_bucket` -- stable sort of each round by (bucket, position). The result ``perm``
  (B, H, R * N) holds, for each row of the rounds-concatenated sorted sequence, the original position.
* :func:`lsh_chunks_reference` -- the part every backend fuses: gather rows by ``perm``, chunks of
  ``chunk_length`` attending to themselves and ``chunks_before`` / ``chunks_after`` neighbours
  (cyclic over all R * N / chunk_length chunks, so the first chunk of a round sees the last chunk
  of the previous round, exactly as ``transformers``' ``_look_adjacent``), masks by original
  positions, then unsort. It materialises the (chunk, window) scores; the kernels never do.

Score of sorted query row i against window key row j (positions pi, pj)::

    s_ij = <q_pi, k_pj>                                  k = len_norm(qk) * scale, q = qk
    s_ij = mask_value       if (causal and pj > pi) or key_padding_mask[pj]
    s_ij = self_mask_value  if pj == pi                  (applied last, overriding the mask)
    lse_i = logsumexp_j s_ij ;  P_ij = exp(s_ij - lse_i) ;  out_i = sum_j P_ij * keep_ij / (1 - p) * v_pj

Masked entries carry finite values (Hugging Face's -1e9 / -1e5, fp16: -1e4 / -1e3), so no row is
ever empty and nothing is NaN; their scores are constants, so their gradient is zero.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .attention import _M32, _hash32, dropout_threshold

# Hugging Face's LSHSelfAttention mask values: (mask, self mask) by score dtype.
MASK_VALUES = {torch.float16: (-1e4, -1e3)}
DEFAULT_MASK_VALUES = (-1e9, -1e5)


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The log-sum-exp is fp32, fp64 for fp64 inputs (reference backend only)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mask_values(dtype: torch.dtype) -> Tuple[float, float]:
    """(mask_value, self_mask_value) that transformers uses for scores of ``dtype``."""
    return MASK_VALUES.get(dtype, DEFAULT_MASK_VALUES)


def bucket_factors(n_buckets: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return (int(n_buckets),) if isinstance(n_buckets, int) else tuple(int(f) for f in n_buckets)


def total_buckets(n_buckets: Union[int, Sequence[int]]) -> int:
    total = 1
    for f in bucket_factors(n_buckets):
        total *= f
    return total


def rotation_size(n_buckets: Union[int, Sequence[int]]) -> int:
    """Last dim of the rotations: n_buckets // 2, or sum(factors) // 2 for factorised buckets."""
    return sum(bucket_factors(n_buckets)) // 2


def len_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Reformer's key normalisation: x / sqrt(mean(x^2) + eps) over the head dim."""
    return x * torch.rsqrt(torch.mean(x * x, -1, keepdim=True) + eps)


def _argmax_signed(x: Tensor) -> Tensor:
    """argmax(cat([x, -x], -1), -1) without building the concatenation (same first-index ties)."""
    mx, imx = x.max(-1)
    mn, imn = x.min(-1)
    return torch.where(mx >= -mn, imx, imn + x.shape[-1])


def hash_buckets(qk: Tensor, n_buckets: Union[int, Sequence[int]], rotations: Tensor,
                 key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """Buckets (B, H, R, N) int64 of qk (B, H, N, D) under rotations (H, D, R, rotation_size // 2).

    Key-padding positions (True = pad) get the extra bucket ``total_buckets(n_buckets)``.
    Equivalent to ``LSHSelfAttention._hash_vectors`` without the round offsets.
    """
    H, D, R, half = rotations.shape
    # (B, H, N, D) @ (H, D, R * half): the products of transformers' einsum("bmtd,mdhr->bmhtr"),
    # laid out with the rotation index last so the argmax reads contiguous memory
    rotated = torch.matmul(qk.detach(), rotations.to(qk.dtype).reshape(H, D, R * half))
    rotated = rotated.view(*qk.shape[:3], R, half)
    factors = bucket_factors(n_buckets)
    if len(factors) == 1:
        buckets = _argmax_signed(rotated)
    else:
        buckets, start, product = None, 0, 1
        for f in factors:
            part = rotated[..., start:start + f // 2]
            start += f // 2
            b = _argmax_signed(part)
            buckets = b if buckets is None else buckets + product * b
            product *= f
    buckets = buckets.transpose(2, 3)  # (B, H, R, N)
    if key_padding_mask is not None:
        pad_bucket = torch.full((), total_buckets(n_buckets), dtype=buckets.dtype, device=buckets.device)
        buckets = torch.where(key_padding_mask[:, None, None, :], pad_bucket, buckets)
    return buckets


def sort_by_bucket(buckets: Tensor) -> Tensor:
    """perm (B, H, R * N) int64: original positions in (round, bucket, position) order."""
    B, H, R, N = buckets.shape
    pos = torch.arange(N, device=buckets.device)
    key = buckets * N + pos  # unique per round: any sort of it is the stable sort by bucket
    return torch.argsort(key, dim=-1).reshape(B, H, R * N)


def _adjacent(x: Tensor, before: int, after: int) -> Tensor:
    """(B, H, C, L, ...) -> (B, H, C, (1 + before + after) * L, ...), cyclic over C."""
    return torch.cat([torch.roll(x, -i, dims=2) for i in range(-before, after + 1)], dim=3)


def dropout_keep(seed: int, bh: Tensor, rows: Tensor, cols: Tensor, p: float) -> Tensor:
    """Counter-based keep mask of element (bh, sorted query row, sorted key row); rows/cols int64
    broadcastable against bh. Same hash as the dense engine's dropout (reference/attention.py)."""
    a = _hash32((seed + bh * 0x9E3779B9) & _M32)
    r = _hash32(_hash32(a ^ rows) ^ cols)
    return (r >> 8) >= dropout_threshold(p)


def _chunk_scores(q, k, v, perm, key_padding_mask, L, before, after, causal, mask_value, self_mask_value,
                  dropout_p, seed):
    """Sorted, chunked operands and masked scores shared by the forward and backward references."""
    B, H, N, D = q.shape
    T = perm.shape[-1]
    C = T // L
    idx = perm.unsqueeze(-1).expand(B, H, T, D)
    qs = q.gather(2, idx).view(B, H, C, L, D)
    ks = _adjacent(k.gather(2, idx).view(B, H, C, L, D), before, after)
    vs = _adjacent(v.gather(2, idx).view(B, H, C, L, D), before, after)
    pq = perm.view(B, H, C, L, 1)
    pk = _adjacent(perm.view(B, H, C, L), before, after).unsqueeze(-2)  # (B, H, C, 1, W)
    s = torch.matmul(qs, ks.transpose(-1, -2))  # (B, H, C, L, W)
    masked = torch.zeros_like(s, dtype=torch.bool)
    if causal:
        masked = masked | (pk > pq)
    if key_padding_mask is not None:
        kp = key_padding_mask[:, None, :].expand(B, H, N).gather(2, perm).view(B, H, C, L)
        masked = masked | _adjacent(kp, before, after).unsqueeze(-2)
    is_self = pk == pq
    s = torch.where(masked, torch.full((), mask_value, dtype=s.dtype, device=s.device), s)
    s = torch.where(is_self, torch.full((), self_mask_value, dtype=s.dtype, device=s.device), s)
    keep = None
    if dropout_p > 0:
        bh = torch.arange(B * H, device=q.device).view(B, H, 1, 1, 1)
        rows = torch.arange(T, device=q.device).view(1, 1, C, L, 1)
        cols = _adjacent(torch.arange(T, device=q.device).view(1, 1, C, L), before, after).unsqueeze(-2)
        keep = dropout_keep(seed, bh, rows, cols, dropout_p).to(s.dtype) / (1.0 - dropout_p)
    return qs, ks, vs, pk, s, masked | is_self, keep


def _to_sorted(x: Tensor, perm: Tensor) -> Tensor:
    """(B, H, R, N, ...) in original order -> (B, H, R * N, ...) in sorted order."""
    B, H, R, N = x.shape[:4]
    rperm = perm.view(B, H, R, N)
    if x.dim() == 5:
        rperm = rperm.unsqueeze(-1).expand(*rperm.shape, x.shape[-1])
    return x.gather(3, rperm).reshape(B, H, R * N, *x.shape[4:])


def lsh_chunks_reference(q: Tensor, k: Tensor, v: Tensor, perm: Tensor, key_padding_mask: Optional[Tensor],
                         chunk_length: int, chunks_before: int, chunks_after: int, causal: bool,
                         mask_value: float, self_mask_value: float, dropout_p: float = 0.0, seed: int = 0,
                         compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor]:
    """Chunked attention on the bucket-sorted sequence.

    Args:
        q, k, v: (B, H, N, D); k already normalised and scaled.
        perm: (B, H, R * N) int64, original position of each sorted row; each round's slice is a
            permutation of range(N); R * N must be a multiple of chunk_length.
        key_padding_mask: (B, N) bool, True = pad, or None.

    Returns:
        out (B, H, R, N, D) in q's dtype (round outputs in original order), lse (B, H, R, N) fp32
        (fp64 for fp64 q).
    """
    dtype = compute_dtype or q.dtype
    out_dtype = q.dtype
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, N, D = q.shape
    R = perm.shape[-1] // N
    _, _, vs, _, s, _, keep = _chunk_scores(q, k, v, perm, key_padding_mask, chunk_length, chunks_before,
                                            chunks_after, causal, mask_value, self_mask_value, dropout_p, seed)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    if keep is not None:
        p = p * keep
    o = torch.matmul(p, vs).reshape(B, H, R, N, D)
    # unsort: row j of round r goes to position perm[j]
    rperm = perm.view(B, H, R, N)
    out = torch.empty_like(o).scatter(3, rperm.unsqueeze(-1).expand(B, H, R, N, D), o)
    lse_out = torch.empty_like(lse.reshape(B, H, R, N)).scatter(3, rperm, lse.reshape(B, H, R, N))
    return out.to(out_dtype), lse_out.to(lse_dtype(out_dtype))


def lsh_chunks_backward_reference(dout: Tensor, dlse: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor,
                                  lse: Tensor, perm: Tensor, key_padding_mask: Optional[Tensor], chunk_length: int,
                                  chunks_before: int, chunks_after: int, causal: bool, mask_value: float,
                                  self_mask_value: float, dropout_p: float = 0.0, seed: int = 0,
                                  compute_dtype: Optional[torch.dtype] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Closed-form gradients (dq, dk, dv), each (B, H, N, D), of :func:`lsh_chunks_reference`
    given dout (B, H, R, N, D) and dlse (B, H, R, N)::

        dS = P * (keep * dO V^T - rowsum(dO * O) + dlse), 0 where the score is a mask constant
        dQ = dS K,  dK = dS^T Q,  dV = (P * keep)^T dO      (summed over rounds and windows)
    """
    dtype = compute_dtype or q.dtype
    q, k, v, dout, out, lse, dlse = (t.to(dtype) for t in (q, k, v, dout, out, lse, dlse))
    B, H, N, D = q.shape
    L = chunk_length
    T = perm.shape[-1]
    C = T // L
    qs, ks, vs, pk, s, constant, keep = _chunk_scores(q, k, v, perm, key_padding_mask, L, chunks_before,
                                                      chunks_after, causal, mask_value, self_mask_value,
                                                      dropout_p, seed)
    lse_s = _to_sorted(lse, perm).view(B, H, C, L, 1)
    p = torch.exp(s - lse_s)
    do_s = _to_sorted(dout, perm).view(B, H, C, L, D)
    o_s = _to_sorted(out, perm).view(B, H, C, L, D)
    dlse_s = _to_sorted(dlse, perm).view(B, H, C, L, 1)
    dp = torch.matmul(do_s, vs.transpose(-1, -2))
    pd = p
    if keep is not None:
        dp = dp * keep
        pd = p * keep
    delta = (do_s * o_s).sum(-1, keepdim=True)
    ds = torch.where(constant, torch.zeros((), dtype=dtype, device=q.device), p * (dp - delta + dlse_s))
    dq_s = torch.matmul(ds, ks).reshape(B, H, T, D)
    dk_w = torch.matmul(ds.transpose(-1, -2), qs)  # (B, H, C, W, D)
    dv_w = torch.matmul(pd.transpose(-1, -2), do_s)
    W = dk_w.shape[3]
    kidx = pk.reshape(B, H, C * W, 1).expand(B, H, C * W, D)
    dq = torch.zeros_like(q).scatter_add_(2, perm.unsqueeze(-1).expand(B, H, T, D), dq_s)
    dk = torch.zeros_like(k).scatter_add_(2, kidx, dk_w.reshape(B, H, C * W, D))
    dv = torch.zeros_like(v).scatter_add_(2, kidx, dv_w.reshape(B, H, C * W, D))
    return dq, dk, dv


def combine_rounds(out_r: Tensor, lse_r: Tensor) -> Tuple[Tensor, Tensor]:
    """(B, H, R, N, D), (B, H, R, N) -> out (B, H, N, D), lse (B, H, N): rounds weighted by
    softmax over their log-sum-exp, as transformers does (no duplicate-count correction)."""
    if out_r.shape[2] == 1:
        return out_r[:, :, 0].clone(), lse_r[:, :, 0].clone()
    acc = torch.promote_types(out_r.dtype, torch.float32)
    lse_r = lse_r.to(acc)
    lse = torch.logsumexp(lse_r, dim=2, keepdim=True)
    # exp(lse_r - lse) rather than softmax: transformers' formula, whose fp32 rounding is visible
    # where every round's lse is the self-mask value (-1e5), e.g. the first position when causal
    w = torch.exp(lse_r - lse).unsqueeze(-1)
    out = (out_r.to(acc) * w).sum(2).to(out_r.dtype)
    return out, lse.squeeze(2).to(lse_dtype(out_r.dtype))
