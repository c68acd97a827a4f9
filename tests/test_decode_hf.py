"""The Hugging Face integration runs generation steps through pyattn.decode_attention, and greedy
generation with attn_implementation="pyattn" matches stock sdpa token for token."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers")

from pyattn.integrations import transformers as hf  # noqa: E402  (registers "pyattn")


def _model(family, impl):
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # a sliding window narrower than the generated sequence
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=6))
    model.set_attn_implementation(impl)
    return model.eval()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_generation_uses_decode_and_matches_sdpa(family, monkeypatch):
    calls = []
    real = hf._decode_attention

    def spy(q, k, v, seqlens, **kw):
        calls.append((tuple(q.shape), tuple(k.shape), kw.get("window")))
        return real(q, k, v, seqlens, **kw)

    monkeypatch.setattr(hf, "_decode_attention", spy)
    ids = torch.randint(3, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = _model(family, "sdpa").generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        out = _model(family, "pyattn").generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(out, ref)
    # 9 decode steps x 2 layers, one query each against the growing cache; the prefill is not one
    assert len(calls) == 18
    assert all(q[2] == 1 and k[2] >= (11 if family == "llama" else 4) for q, k, _ in calls)
    if family == "mistral":  # the sliding-window cache keeps the last 6 keys; the op sees exactly those
        assert {k[2] for _, k, _ in calls} == {6}


def test_padded_or_long_query_calls_are_not_decode_steps():
    q = torch.randn(2, 4, 1, 16)
    k = torch.randn(2, 2, 40, 16)
    assert hf._decode_window(q, k, k, None, {}) == (True, None)
    assert hf._decode_window(torch.randn(2, 4, 12, 16), k, k, None, {}) is None  # prefill-like
    assert hf._decode_window(q, k, k, None, {"dropout_p": 0.1}) is None
    assert hf._decode_window(q, k, k, torch.ones(2, 1, 1, 40, dtype=torch.bool), {}) is None  # untagged mask
