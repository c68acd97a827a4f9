"""LlamaForCausalLM on pyattn ops: Hugging Face checkpoints (Llama, Mistral, Qwen2) load with the
same logits and the same greedy tokens; cached (paged KV cache + decode_attention), uncached and
ragged generation agree; bad input."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import pyattn.models.generation as generation  # noqa: E402
from pyattn.models.llama import LlamaConfig, LlamaForCausalLM  # noqa: E402

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _hf(family: str, **over):
    torch.manual_seed(0)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**COMMON, "attention_bias": True, **over})
        model = transformers.LlamaForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**{**COMMON, "sliding_window": 5, **over})
        model = transformers.MistralForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**{**COMMON, "tie_word_embeddings": True, **over})
        model = transformers.Qwen2ForCausalLM(cfg)
    model.config._attn_implementation = "eager"
    return model.eval()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def pair(request, tmp_path_factory):
    hf = _hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    ours = LlamaForCausalLM.from_pretrained(path).eval()
    return request.param, hf, ours


def _ids(B=2, N=13, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (B, N), generator=g)


def test_logits_match_transformers(pair):
    family, hf, ours = pair
    ids = _ids()
    with torch.no_grad():
        ref = hf(ids).logits
        got = ours(ids).logits
    torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4)


def test_greedy_tokens_match_transformers(pair):
    family, hf, ours = pair
    ids = _ids(B=1, N=9, seed=5)
    ref = hf.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(got, ref)


def test_cached_equals_uncached_and_ragged_equals_per_prompt(pair):
    _, _, ours = pair
    a, b = _ids(1, 11, 7)[0], _ids(1, 6, 8)[0]
    batch = torch.zeros(2, 11, dtype=torch.int64)
    mask = torch.zeros(2, 11, dtype=torch.int64)
    batch[0], mask[0] = a, 1
    batch[1, 5:], mask[1, 5:] = b, 1  # left padding, as a tokenizer would give it
    ragged = ours.generate(batch, mask, max_new_tokens=6, eos_token_id=[])
    uncached = ours.generate(batch, mask, max_new_tokens=6, eos_token_id=[], use_cache=False)
    single_a = ours.generate(a[None], max_new_tokens=6, eos_token_id=[])
    single_b = ours.generate(b[None], max_new_tokens=6, eos_token_id=[])
    assert torch.equal(ragged, uncached)
    assert torch.equal(ragged[0], single_a[0]) and torch.equal(ragged[1], single_b[0])


def _ragged(prompts, left: bool):
    """(ids, mask) of the 1-D prompts padded to the longest, on the left or the right."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        sl = slice(P - len(p), P) if left else slice(0, len(p))
        ids[b, sl], mask[b, sl] = p, 1
    return ids, mask


def _count_decode_calls(monkeypatch):
    calls = []
    real = generation.decode_attention

    def counted(q, k_cache, v_cache, cache_seqlens, **kw):
        calls.append(dict(seqlens=cache_seqlens.tolist(), pages=int(kw["block_table"].shape[1]),
                          page_size=k_cache.shape[2], window=kw["window"], new=kw["k_new"] is not None))
        return real(q, k_cache, v_cache, cache_seqlens, **kw)
    monkeypatch.setattr(generation, "decode_attention", counted)
    return calls


@pytest.mark.parametrize("left", [True, False], ids=["left-padded", "right-padded"])
def test_paged_generation_ragged_batch_matches_transformers(pair, left, monkeypatch):
    """Prompts of 37, 20 and 5 tokens + 24 new ones in 16-token pages (up to 4 pages per sequence):
    the same greedy tokens as the uncached path and as transformers on each prompt alone, with
    every decode step of every layer through decode_attention over the pages."""
    family, hf, ours = pair
    prompts = [_ids(1, n, seed)[0] for n, seed in ((37, 11), (20, 12), (5, 13))]
    ids, mask = _ragged(prompts, left)
    calls = _count_decode_calls(monkeypatch)
    new = 24
    got = ours.generate(ids, mask, max_new_tokens=new, eos_token_id=[], page_size=16)
    L = ours.config.num_hidden_layers
    assert len(calls) == L * (new - 1)
    assert all(c["new"] and c["page_size"] == 16 and c["pages"] == 4 for c in calls)
    assert calls[0]["seqlens"] == [37, 20, 5] and calls[-1]["seqlens"] == [37 + new - 2, 20 + new - 2, 5 + new - 2]
    want_window = (4, 0) if family == "mistral" else None  # sliding_window 5: a query sees itself + 4 keys
    assert all(c["window"] == want_window for c in calls)
    monkeypatch.undo()
    assert torch.equal(got, ours.generate(ids, mask, max_new_tokens=new, eos_token_id=[], use_cache=False))
    for b, p in enumerate(prompts):
        ref = hf.generate(p[None], max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert torch.equal(got[b], ref[0, len(p):]), (family, b)


def test_paged_generation_stop_tokens_in_a_ragged_batch(pair):
    """A sequence that emits a stop token is padded from then on; the others are unaffected."""
    _, _, ours = pair
    ids, mask = _ragged([_ids(1, n, seed)[0] for n, seed in ((19, 21), (6, 22))], left=True)
    free = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=[], page_size=16)
    stop = int(free[1, 3])
    stops = [stop, 96]
    stopped = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=stops, pad_token_id=95, page_size=16)
    assert int(stopped[1, 3]) in stops or bool((stopped[1, 3:] == 95).all())
    for b in range(2):
        hits = [t for t, tok in enumerate(free[b].tolist()) if tok in stops]
        t = hits[0] if hits else 10  # the first stop token of the unstopped run
        assert torch.equal(stopped[b, :t + 1], free[b, :t + 1])
        assert bool((stopped[b, t + 1:] == 95).all())


def test_sampling_reproducible_and_stops():
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": 1})).eval()
    ids = _ids(2, 5)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, generator=g1)
    s2 = model.generate(ids, max_new_tokens=5, do_sample=True, top_k=10, top_p=0.9, temperature=0.8, generator=g2)
    assert torch.equal(s1, s2)
    greedy = model.generate(ids, max_new_tokens=5, eos_token_id=[])
    stop = int(greedy[0, 1])
    stopped = model.generate(ids, max_new_tokens=5, eos_token_id=stop, pad_token_id=96)
    assert int(stopped[0, 1]) == stop and bool((stopped[0, 2:] == 96).all())


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMMON, "num_hidden_layers": 1}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = _ids(4, 16)
    losses = []
    for _ in range(5):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


def test_bad_input(tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**COMMON))
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(_ids(1, 120), max_new_tokens=20)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(_ids(1, 4), do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(_ids(1, 4), do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="page_size"):
        model.generate(_ids(1, 4), page_size=0)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
        LlamaConfig(**COMMON, rope_scaling={"rope_type": "yarn", "factor": 2.0})
    hf = _hf("llama", num_hidden_layers=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    cfg = (tmp_path / "config.json").read_text().replace('"num_hidden_layers": 1', '"num_hidden_layers": 2')
    (tmp_path / "config.json").write_text(cfg)
    with pytest.raises(ValueError, match=r"missing keys \['layers.1"):
        LlamaForCausalLM.from_pretrained(tmp_path)


def test_llama3_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    hf = _hf("llama", rope_scaling=scaling, num_hidden_layers=1)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = _ids(1, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, hf(ids).logits, atol=2e-4, rtol=1e-4)


def test_compiles_without_graph_breaks():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(b.reason) for b in explained.break_reasons]
