"""Token generation for pyattn decoder models: greedy, temperature, top-k, top-p, stop tokens,
ragged prompts (each sequence is cached at its own length: no compute on padding).

The keys and values live in a :class:`pyattn.PagedKVCache` (one page list per sequence). The
prompts run packed through :func:`pyattn.varlen_attention` (causal, the layer's window) and their
keys/values are written into the pages; each new token then attends to its sequence's pages with
:func:`pyattn.decode_attention` (``k_new``/``v_new`` appended in place, ``block_table`` +
``cache_seqlens``), one call per layer and step.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..attention import varlen_attention
from ..kv_cache import PagedKVCache
from ..ops.decode import decode_attention


def _check_sampling(max_new_tokens, temperature, top_k, top_p) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an int >= 1 or None, got {top_k!r}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def filter_logits(logits: Tensor, temperature: float = 1.0, top_k: Optional[int] = None,
                  top_p: Optional[float] = None) -> Tensor:
    """logits (B, V) -> scaled logits with everything outside top-k / the top-p nucleus at -inf."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, *, max_new_tokens: int = 32,
             do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
             top_p: Optional[float] = None, eos_token_id: Union[None, int, Iterable[int]] = None,
             pad_token_id: Optional[int] = None, generator: Optional[torch.Generator] = None,
             use_cache: bool = True, page_size: int = 64) -> Tensor:
    """Continue each prompt by up to ``max_new_tokens`` tokens.

    input_ids (B, P) int, attention_mask (B, P) 1 = token / 0 = padding (left or right padding,
    as a tokenizer returns it). Returns (B, max_new_tokens) new tokens; after a sequence emits a stop
    token (``eos_token_id``, default the config's) the rest of its row is ``pad_token_id``
    (default: the first stop token, else 0). Greedy unless ``do_sample``.
    ``use_cache=False`` re-runs the whole prefix per token (the check of the cached path).
    ``page_size``: tokens per page of the paged key/value cache.
    """
    model.check_ids(input_ids)
    _check_sampling(max_new_tokens, temperature, top_k, top_p)
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    B, P = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    keep = attention_mask.bool()
    lengths = keep.sum(1)
    if bool((lengths == 0).any()):
        raise ValueError("every prompt must have at least one token (attention_mask has an all-zero row)")
    limit = model.config.max_position_embeddings
    if int(lengths.max()) + max_new_tokens > limit:
        raise ValueError(f"prompt length {int(lengths.max())} + max_new_tokens {max_new_tokens} exceeds the model "
                         f"context max_position_embeddings={limit}")
    stops = eos_token_id if eos_token_id is not None else model.config.eos_token_id
    stops: List[int] = [] if stops is None else ([stops] if isinstance(stops, int) else list(stops))
    pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
    # each prompt's real tokens, left-aligned: row b is prompts[b, :lengths[b]]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
    prompts = torch.gather(input_ids, 1, order)
    out = torch.full((B, max_new_tokens), pad, dtype=input_ids.dtype, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    if max_new_tokens == 0:
        return out
    cache = PagedGenerationCache.for_batch(model, lengths, max_new_tokens, page_size) if use_cache else None
    step_logits = _prefill(model, cache, prompts, lengths) if use_cache else None
    seqs = None if use_cache else [prompts[b, :int(lengths[b])].tolist() for b in range(B)]
    for t in range(max_new_tokens):
        if not use_cache:
            step_logits = _full_logits(model, seqs, device)
        logits = filter_logits(step_logits, temperature, top_k, top_p) if do_sample or top_k or top_p else step_logits
        if do_sample:
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        out[:, t] = nxt
        if stops:
            done = done | torch.isin(nxt, torch.tensor(stops, device=device))
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        if use_cache:
            step_logits = _step(model, cache, nxt)
        else:
            for b in range(B):
                seqs[b].append(int(nxt[b]))
    return out


def _prefill(model, cache: "PagedGenerationCache", prompts: Tensor, lengths: Tensor) -> Tensor:
    """prompts (B, P) left-aligned, lengths (B,) -> logits (B, V) fp32 of each prompt's last token."""
    B, P = prompts.shape
    valid = torch.arange(P, device=prompts.device)[None, :] < lengths[:, None]
    cache.prefill_index = valid.flatten().nonzero()[:, 0]
    cache.prefill_cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
    cache.prefill_max = int(lengths.max())
    positions = torch.arange(P, device=prompts.device).expand(B, P)
    h = model.hidden_states(prompts, positions, cache)
    cache.prefill_cu = cache.prefill_index = None
    for sid, n in zip(cache.seq_ids, lengths.tolist()):
        cache.pages.advance([sid], n)
    last = h[torch.arange(B), lengths - 1]
    return model.lm_head(last).float()


def _step(model, cache: "PagedGenerationCache", tokens: Tensor) -> Tensor:
    """tokens (B,) -> logits (B, V) fp32 of the next position of every sequence."""
    cache.begin_step()
    h = model.hidden_states(tokens[:, None], cache.seqlens.to(torch.int64)[:, None], cache)
    cache.pages.advance(cache.seq_ids, 1)
    return model.lm_head(h[:, -1]).float()


class PagedGenerationCache:
    """The batch's sequences in a :class:`pyattn.PagedKVCache`, as the attention layers use it.

    ``attend`` is a packed prefill while ``prefill_cu`` is set, else one decode step whose
    ``block_table`` / ``seqlens`` (shared by all layers) :meth:`begin_step` prepared.
    """

    def __init__(self, pages: PagedKVCache, seq_ids: Sequence[int]):
        self.pages = pages
        self.seq_ids = list(seq_ids)
        self.prefill_cu: Optional[Tensor] = None  # int32 (B + 1,) during the prefill
        self.prefill_max = 0
        self.prefill_index: Optional[Tensor] = None  # (total,) flat b * P + t of each packed prompt token
        self.block_table: Optional[Tensor] = None
        self.seqlens: Optional[Tensor] = None

    @classmethod
    def for_batch(cls, model, lengths: Tensor, max_new_tokens: int, page_size: int) -> "PagedGenerationCache":
        """Pages for prompts of ``lengths`` (B,) plus ``max_new_tokens`` each (no more, no padding)."""
        c = model.config
        param = next(model.parameters())
        need = [-(-(n + max_new_tokens) // page_size) for n in lengths.tolist()]
        pages = PagedKVCache(c.num_hidden_layers, sum(need), page_size, c.num_key_value_heads, c.head_dim,
                             dtype=param.dtype, device=param.device, max_pages_per_seq=max(need))
        return cls(pages, [pages.add_sequence() for _ in need])

    def begin_step(self, n: int = 1) -> None:
        self.pages.reserve(self.seq_ids, n)
        self.block_table = self.pages.block_table(self.seq_ids)
        self.seqlens = self.pages.cache_seqlens(self.seq_ids)

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, window, backend) -> Tensor:
        """q (B, N, H, D), k/v (B, N, Hkv, D) of the new tokens -> out (B, N, H, D)."""
        B, N = q.shape[:2]
        if self.prefill_cu is not None:  # packed prompts: row t of sequence b is q[b, t]
            idx = self.prefill_index
            qp, kp, vp = (t.flatten(0, 1)[idx] for t in (q, k, v))
            self.pages.append_packed(self.seq_ids, kp, vp, self.prefill_cu, layer=layer)
            cu, m = self.prefill_cu, self.prefill_max
            out = varlen_attention(qp, kp, vp, cu, cu, m, m, causal=True, window=window, backend=backend)
            full = q.new_zeros(B * N, *q.shape[2:])
            full[idx] = out
            return full.view_as(q)
        kc, vc = self.pages.layer(layer)
        out = decode_attention(q.transpose(1, 2), kc, vc, self.seqlens, k_new=k.transpose(1, 2),
                               v_new=v.transpose(1, 2), block_table=self.block_table, window=window,
                               backend=backend)
        return out.transpose(1, 2)


def _full_logits(model, seqs: List[List[int]], device) -> Tensor:
    rows = []
    for s in seqs:
        ids = torch.tensor([s], device=device)
        rows.append(model(ids).logits[0, -1].float())
    return torch.stack(rows)
