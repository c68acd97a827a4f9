"""Beam search for ``TransformerSeq2Seq`` (batched over sources, KV cache reordered per step)."""
from __future__ import annotations

from typing import List, Tuple

import torch

from .transformer import BeamSearchOutput


def length_penalty(n: int, alpha: float) -> float:
    """GNMT (Wu et al. 2016): ((5 + n) / 6) ** alpha."""
    return ((5.0 + n) / 6.0) ** alpha


def run_beam_search(model, src_ids, src_mask, K: int, max_len: int, alpha: float, use_cache: bool) -> BeamSearchOutput:
    c = model.config
    cross, src = model._start(src_ids, src_mask, K)  # each source repeated for its K beams
    B = src.batch // K
    device = src_ids.device
    prefix = torch.full((B * K, 1), c.bos_id, dtype=torch.long, device=device)
    scores = torch.full((B, K), float("-inf"), device=device)
    scores[:, 0] = 0.0  # one live beam at the start: the others would duplicate it
    caches = model._new_caches(B * K, max_len, device, model.embed.weight.dtype) if use_cache else None
    finished: List[List[Tuple[float, List[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for t in range(max_len):
        logp = model._step_logprobs(prefix, cross, src, caches)  # (B*K, V)
        V = logp.shape[-1]
        cand = scores[:, :, None] + logp.view(B, K, V)  # (B, K, V) raw log-probabilities
        n = t + 1  # generated tokens of every candidate (EOS included)
        lp = length_penalty(n, alpha)
        ends = cand[:, :, c.eos_id].tolist()
        last = t == max_len - 1  # at max_len the live continuations end too (unfinished)
        cand[:, :, c.eos_id] = float("-inf")
        top, idx = cand.view(B, K * V).topk(K)  # the K best live continuations
        beam, tok = idx // V, idx % V
        rows = (torch.arange(B, device=device)[:, None] * K + beam).view(-1)
        history = prefix[:, 1:].tolist()
        for b in range(B):
            if done[b]:
                continue
            for k in range(K):
                if ends[b][k] > float("-inf"):
                    finished[b].append((ends[b][k] / lp, history[b * K + k] + [c.eos_id]))
            if last:
                for k in range(K):
                    s, r, v = float(top[b, k]), int(rows[b * K + k]), int(tok[b, k])
                    if s > float("-inf"):
                        finished[b].append((s / lp, history[r] + [v]))
            finished[b] = sorted(finished[b], key=lambda h: -h[0])[:K]
        if last:
            break
        prefix = torch.cat([prefix.index_select(0, rows), tok.view(-1, 1)], 1)
        scores = top
        if caches is not None:
            caches = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in caches]
        # a live beam's raw score only drops; its normalised score is at most the raw score divided by
        # the penalty at the most favourable remaining length (alpha >= 0: the longest; < 0: the next)
        best_live = scores.max(1).values.tolist()
        for b in range(B):
            if done[b] or len(finished[b]) < K:
                continue
            bound = max(best_live[b] / length_penalty(m, alpha) for m in (n + 1, max_len))
            done[b] = finished[b][K - 1][0] >= bound
        if all(done):
            break
    longest = max(len(h[0][1]) for h in finished)
    seqs = torch.full((B, longest), c.pad_id, dtype=torch.long, device=device)
    for b in range(B):
        best = finished[b][0][1]
        seqs[b, : len(best)] = torch.tensor(best, dtype=torch.long)
    return BeamSearchOutput(seqs, torch.tensor([h[0][0] for h in finished]), finished)
