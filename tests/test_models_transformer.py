"""TransformerSeq2Seq (pyattn.models.transformer): training forward/backward, padding, backends,
greedy and beam search (against brute force), KV cache, bad input."""
import itertools

import pytest
import torch

from pyattn.models import TransformerConfig, TransformerSeq2Seq
from pyattn.models.beam import length_penalty

PAD, BOS, EOS = 0, 1, 2


def _model(vocab=11, seed=0, **over):
    torch.manual_seed(seed)
    cfg = TransformerConfig(**{**dict(vocab_size=vocab, d_model=16, num_heads=2, num_encoder_layers=2,
                                      num_decoder_layers=2, d_ff=32, dropout=0.0, max_len=24), **over})
    model = TransformerSeq2Seq(cfg).eval()
    with torch.no_grad():  # a less peaked random model: decodes do not all stop at once
        for p in model.parameters():
            p.copy_(0.5 * torch.randn_like(p))
        model.embed.weight[EOS].mul_(0.3)
    return model


SRC = torch.tensor([[3, 4, 5, 6, 2], [5, 3, 2, 0, 0], [7, 2, 0, 0, 0]])
TGT_IN = torch.tensor([[1, 3, 4, 5], [1, 5, 0, 0], [1, 8, 9, 0]])
LABELS = torch.tensor([[3, 4, 5, 2], [5, 2, -100, -100], [8, 9, 2, -100]])


def test_forward_backward_shapes_loss_and_tied_embeddings():
    model = _model().train()
    out = model(SRC, TGT_IN, labels=LABELS)
    assert out.logits.shape == (3, 4, 11) and out.loss.dim() == 0 and out.loss.item() > 0
    assert torch.all(out.logits[TGT_IN == PAD] == 0)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # label smoothing: the loss is the smoothed cross-entropy of the logits
    keep = LABELS != -100
    ref = torch.nn.functional.cross_entropy(out.logits[keep].detach(), LABELS[keep], label_smoothing=0.1)
    torch.testing.assert_close(out.loss.detach(), ref)
    assert model.embed.weight.grad.abs().sum() > 0
    again = model(SRC, TGT_IN, labels=LABELS)
    assert torch.equal(again.logits, out.logits)


def test_padded_batch_equals_each_pair_alone():
    model = _model()
    with torch.no_grad():
        batched = model(SRC, TGT_IN).logits
        for b in range(3):
            s, t = int((SRC[b] != PAD).sum()), int((TGT_IN[b] != PAD).sum())
            alone = model(SRC[b:b + 1, :s], TGT_IN[b:b + 1, :t]).logits
            torch.testing.assert_close(batched[b, :t], alone[0], atol=2e-5, rtol=1e-5)


def test_decoder_is_causal():
    model = _model()
    with torch.no_grad():
        a = model(SRC[:1], TGT_IN[:1]).logits
        changed = TGT_IN[:1].clone()
        changed[0, 3] = 9
        b = model(SRC[:1], changed).logits
    torch.testing.assert_close(a[0, :3], b[0, :3])
    assert not torch.allclose(a[0, 3], b[0, 3])


def test_cpu_backend_equals_reference_backend():
    grads = {}
    for backend in ("cpu", "reference"):
        model = _model(backend=backend)
        out = model(SRC, TGT_IN, labels=LABELS)
        out.loss.backward()
        grads[backend] = (out.logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["cpu"][0], grads["reference"][0], atol=1e-5, rtol=1e-4)
    for name, g in grads["reference"][1].items():
        assert (grads["cpu"][1][name] - g).abs().max() <= 1e-4 * g.abs().max() + 1e-7, name


def test_decoding_with_and_without_cache_identical():
    model = _model()
    greedy = model.greedy(SRC, max_len=8)
    assert torch.equal(greedy, model.greedy(SRC, max_len=8, use_cache=False))
    assert greedy.shape == (3, 8)
    beam = model.beam_search(SRC, num_beams=3, max_len=8)
    no_cache = model.beam_search(SRC, num_beams=3, max_len=8, use_cache=False)
    assert torch.equal(beam.sequences, no_cache.sequences)
    torch.testing.assert_close(beam.scores, no_cache.scores, atol=1e-5, rtol=1e-5)


def _scores(model, src_row, seqs, alpha):
    """Length-normalised log-probabilities of ``seqs`` by teacher forcing (pad/bos excluded), one batch."""
    n_src, L = int((src_row != PAD).sum()), max(len(q) for q in seqs)
    tgt = torch.full((len(seqs), L), PAD)
    for i, q in enumerate(seqs):
        tgt[i, : len(q)] = torch.tensor([BOS] + list(q[:-1]))
    with torch.no_grad():
        logits = model(src_row[None, :n_src].expand(len(seqs), n_src), tgt).logits.float()
    logits[..., [PAD, BOS]] = float("-inf")
    logp = torch.log_softmax(logits, -1)
    return [logp[i, torch.arange(len(q)), torch.tensor(q)].sum().item() / length_penalty(len(q), alpha)
            for i, q in enumerate(seqs)]


def _brute_force(model, src_row, tokens, max_len, alpha):
    seqs = [list(q) for n in range(1, max_len + 1) for q in itertools.product(tokens, repeat=n)
            if EOS not in q[:-1] and (n == max_len or q[-1] == EOS)]
    scores = _scores(model, src_row, seqs, alpha)
    best = max(range(len(seqs)), key=lambda i: scores[i])
    return scores[best], seqs[best]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_search_equals_brute_force(alpha):
    # vocabulary: pad, bos, eos + 3 tokens; a beam as wide as every live prefix is an exact search
    model = _model(vocab=6, seed=1)
    max_len = 4
    out = model.beam_search(SRC[:2].clamp(max=5), num_beams=27, max_len=max_len, length_penalty=alpha)
    for b in range(2):
        score, seq = _brute_force(model, SRC[b].clamp(max=5), [EOS, 3, 4, 5], max_len, alpha)
        got = out.sequences[b].tolist()
        assert got[: len(seq)] == seq and all(t == PAD for t in got[len(seq):]), (b, got, seq)
        assert abs(out.scores[b].item() - score) < 1e-4
        assert abs(out.hypotheses[b][0][0] - score) < 1e-4


def test_bad_input_names_the_argument():
    model = _model()
    with pytest.raises(ValueError, match="src_ids must be in \\[0, 11\\)"):
        model(SRC + 20, TGT_IN)
    with pytest.raises(ValueError, match="tgt_ids has length 25 > max_len=24"):
        model(SRC, torch.ones(3, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="src_mask must have the shape of src_ids"):
        model(SRC, TGT_IN, src_mask=torch.ones(3, 4))
    with pytest.raises(ValueError, match="tgt_ids batch size 2"):
        model(SRC, TGT_IN[:2])
    with pytest.raises(ValueError, match="num_beams"):
        model.beam_search(SRC, num_beams=0)
    with pytest.raises(ValueError, match="max_len"):
        model.greedy(SRC, max_len=100)
    with pytest.raises(ValueError, match="d_model"):
        TransformerConfig(d_model=10, num_heads=4)
