"""Reformer pieces: LocalSelfAttention against transformers, the reversible stack against ordinary
backprop, ReformerLM against a saved transformers ReformerModelWithLMHead, training, bad configs."""
from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn.models import ReformerConfig, ReformerLM
from pyattn.nn.local import local_block_mask
from helpers import cpu_backends, max_err, skip_unless_backend

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

LOCAL_BACKENDS = [b for b in cpu_backends() if b != "reference"]


def _hf_config(**kw):
    base = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                attn_layers=["lsh", "local", "lsh", "local"], axial_pos_shape=(8, 8), axial_pos_embds_dim=(8, 8),
                lsh_attn_chunk_length=16, local_attn_chunk_length=8, num_buckets=4, num_hashes=2, hash_seed=3,
                feed_forward_size=32, max_position_embeddings=64, is_decoder=True, chunk_size_feed_forward=16)
    base.update(kw)
    return transformers.ReformerConfig(**base)


def _small(**kw) -> ReformerConfig:
    base = dict(vocab_size=40, hidden_size=16, num_attention_heads=2, attention_head_size=8,
                attn_layers=("lsh", "local", "lsh"), axial_pos_shape=(8, 8), axial_pos_embds_dim=(8, 8),
                lsh_attn_chunk_length=16, local_attn_chunk_length=8, num_buckets=4, num_hashes=2, hash_seed=3,
                feed_forward_size=32, max_position_embeddings=64, chunk_size_feed_forward=16, backend="cpu")
    base.update(kw)
    return ReformerConfig(**base)


# ------------------------------------------------------------------ LocalSelfAttention
LOCAL_CASES = [  # (N, chunk_length, before, after, causal, padding)
    (64, 16, 1, 0, False, False),
    (64, 16, 1, 0, True, True),
    (64, 16, 1, 1, False, True),  # wrap-around on both sides
    (96, 32, 2, 0, True, False),
    (60, 12, 2, 1, True, True),  # chunk off the block grid: element bits
    (32, 16, 1, 1, False, True),  # window wider than the chunk count: a chunk seen twice
    (12, 16, 1, 0, True, True),  # shorter than one chunk: full attention
]


# the interpreter is slow: triton runs the full-block case and the element-bits case
LOCAL_PARAMS = [(b, c) for b in LOCAL_BACKENDS for c in LOCAL_CASES if b != "triton" or c in LOCAL_CASES[1:5:3]]


@pytest.mark.parametrize("backend,case", LOCAL_PARAMS, ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_local_matches_transformers(backend, case):
    skip_unless_backend(backend)
    from transformers.models.reformer.modeling_reformer import LocalSelfAttention as HFLocal

    N, L, nb, na, causal, padding = case
    cfg = _hf_config(local_attn_chunk_length=L, local_num_chunks_before=nb, local_num_chunks_after=na,
                     is_decoder=causal, local_attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    hf = HFLocal(cfg).eval()
    mine = pyattn.nn.LocalSelfAttention.from_config(cfg, backend=backend)
    mine.load_state_dict(hf.state_dict())
    x = torch.randn(2, N, 16)
    am = torch.ones(2, N, dtype=torch.long)
    if padding:
        am[0, -5:] = 0
        am[1, 3:7] = 0
    x_mine = x.clone().requires_grad_()
    x_hf = x.clone().requires_grad_()
    out = mine(x_mine, attention_mask=am)
    ref = hf(x_hf, attention_mask=am).hidden_states
    assert max_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    out.backward(g)
    ref.backward(g)
    assert max_err(x_mine.grad, x_hf.grad) < 1e-5
    for name in ("query", "key", "value"):
        assert max_err(getattr(mine, name).weight.grad, getattr(hf, name).weight.grad) < 1e-5, name


def test_local_schedule_is_whole_chunks():
    lay = local_block_mask(256, 64, 1, 0)
    assert lay.block_size == (64, 64) and int(lay.kv_num_blocks.sum()) == 0  # every visited block is full
    dense = lay.to_dense_mask()[0, 0]
    chunk = torch.arange(256) // 64
    want = (chunk[:, None] == chunk[None, :]) | ((chunk[:, None] - 1) % 4 == chunk[None, :])
    assert torch.equal(dense, want)  # chunk 0 sees chunk 3: transformers' wrap-around
    causal = local_block_mask(256, 64, 1, 0, causal=True).to_dense_mask()[0, 0]
    assert not causal[:64, 192:].any()  # wrapped blocks above the diagonal are not visited
    odd = local_block_mask(48, 12, 1, 0)  # 12 is off the block grid: the chunk edges are element bits
    assert odd.mask_bits is not None and torch.equal(odd.to_dense_mask()[0, 0], ((torch.arange(48) // 12)[:, None] - (
        torch.arange(48) // 12)[None, :]).remainder(4) <= 1)


def test_local_fully_padded_rows_are_zero_and_input_untouched():
    m = pyattn.nn.LocalSelfAttention(16, 2, 8, local_attn_chunk_length=8, backend="cpu")
    x = torch.randn(1, 32, 16)
    x0 = x.clone()
    kpm = torch.ones(1, 32, dtype=torch.bool)
    out = m(x, key_padding_mask=kpm)
    assert torch.isfinite(out).all() and out.abs().max() == 0
    assert torch.equal(x, x0)
    assert "chunk_length=8" in repr(m)


# ------------------------------------------------------------------ reversible stack
def test_reversible_gradients_equal_ordinary_backprop():
    """With dropout on everywhere: the backward's recomputation must replay the RNG exactly."""
    cfg = _small(hidden_dropout_prob=0.1, local_attention_probs_dropout_prob=0.1,
                 lsh_attention_probs_dropout_prob=0.1, hash_seed=None)
    torch.manual_seed(0)
    m = ReformerLM(cfg).train()
    ids = torch.randint(1, 40, (2, 64))

    def run(reversible):
        torch.manual_seed(123)
        m.zero_grad()
        out = m(ids, labels=ids, reversible=reversible)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    loss_r, g_r = run(True)
    loss_o, g_o = run(False)
    assert torch.equal(loss_r, loss_o)
    assert g_r.keys() == g_o.keys() and len(g_r) == sum(1 for _ in m.parameters())
    for name, g in g_o.items():
        assert g_r[name] is not None and g.abs().sum() > 0, name
        rel = max_err(g_r[name], g) / g.abs().max().item()
        assert rel < 1e-4, f"{name}: relative gradient difference {rel:.2e}"


def _saved_numel(model, ids, reversible):
    total = [0]

    def pack(t):
        total[0] += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids, labels=ids, reversible=reversible)
    return total[0]


def test_reversible_activation_memory_is_flat_in_depth():
    ids = torch.randint(1, 40, (1, 64))
    saved = {}
    for depth in (2, 6):
        torch.manual_seed(0)
        m = ReformerLM(_small(attn_layers=("lsh", "local") * (depth // 2))).train()
        saved[depth] = (_saved_numel(m, ids, True), _saved_numel(m, ids, False))
    assert saved[6][0] == saved[2][0]  # reversible: only the last layer's outputs are kept
    assert saved[6][1] > 2 * saved[2][1]  # ordinary backprop keeps every layer's activations


def _reversible_node(t):
    """The _ReversibleFunction node (its ctx) in the graph of t."""
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__ == "_ReversibleFunctionBackward":
            return node
        todo.extend(n for n, _ in node.next_functions)
    raise AssertionError("no reversible node in the graph")


@pytest.mark.parametrize("N", [64, 60])  # whole chunks; padded to the chunk multiple
def test_reversible_backward_reuses_the_forward_buckets(N, monkeypatch):
    """Backward hashes nothing: each LSH layer keeps its int64 sort order (B, H, R * Np), O(N)
    per layer next to the activations the reversible stack does not keep."""
    cfg = _small(attn_layers=("lsh", "local") * 3, hash_seed=None, hidden_dropout_prob=0.1,
                 lsh_attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    m = ReformerLM(cfg).train()
    ids = torch.randint(1, 40, (2, N))
    ordinary = _saved_numel(m, ids, False)
    calls = []
    real = pyattn.lsh.hash_buckets
    monkeypatch.setattr(pyattn.lsh, "hash_buckets", lambda *a: calls.append(1) or real(*a))
    loss = m(ids, labels=ids).loss
    assert len(calls) == 3  # one hashing per LSH layer in forward
    node = _reversible_node(loss)
    sorts = [s for _, _, s in node.saved]
    Np, R = 64, cfg.num_hashes
    assert [s is None for s in sorts] == [False, True] * 3  # local layers keep no order
    assert all(s.dtype == torch.int64 and s.shape == (2, 2, R * Np) for s in sorts if s is not None)
    kept = sum(s.numel() for s in sorts if s is not None)
    assert kept == 3 * 2 * 2 * R * Np and kept < ordinary // 50
    loss.backward()
    assert len(calls) == 3  # backward reused the orders: no re-hash


# ------------------------------------------------------------------ ReformerLM against transformers
@pytest.fixture(scope="module")
def saved_hf_model(tmp_path_factory):
    torch.manual_seed(0)
    hf = transformers.ReformerModelWithLMHead(_hf_config()).eval()
    path = tmp_path_factory.mktemp("reformer")
    hf.save_pretrained(path)
    return hf, path


@pytest.mark.parametrize("N", [64, 40, 12])  # whole chunks; padded to the chunk multiple; below one chunk
def test_lm_logits_match_transformers(saved_hf_model, N):
    hf, path = saved_hf_model
    mine = ReformerLM.from_pretrained(path, backend="cpu").eval()
    assert mine.config.attn_layers == ("lsh", "local", "lsh", "local") and mine.config.is_decoder
    torch.manual_seed(1)
    ids = torch.randint(1, 40, (2, N))
    am = torch.ones(2, N, dtype=torch.long)
    am[1, -3:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=am).logits
        out = mine(ids, attention_mask=am).logits
        ref_nomask = hf(ids).logits
        out_nomask = mine(ids).logits
    keep = am.bool()
    assert out.shape == ref.shape
    assert max_err(out[keep], ref[keep]) < 1e-4
    assert max_err(out_nomask, ref_nomask) < 1e-4


def test_from_pretrained_names_bad_keys(saved_hf_model, tmp_path):
    hf, _ = saved_hf_model
    sd = hf.state_dict()
    sd.pop("reformer.encoder.layers.1.attention.self_attention.key.weight")
    with pytest.raises(ValueError, match="self_attention.key.weight"):
        ReformerLM.from_hf_state_dict(sd, ReformerConfig.from_hf_config(hf.config))
    with pytest.raises(ValueError, match="config.json"):
        ReformerLM.from_pretrained(tmp_path)


def test_training_decreases_loss():
    torch.manual_seed(0)
    m = ReformerLM(_small(hidden_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0)).train()
    ids = torch.arange(64).remainder(7).add(1).repeat(2, 1)  # a periodic sequence: learnable
    opt = torch.optim.AdamW(m.parameters(), lr=2e-2)
    losses = []
    for _ in range(8):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


BAD_CONFIGS = [
    (dict(attn_layers=("lsh", "dense")), "attn_layers"),
    (dict(attn_layers=()), "attn_layers"),
    (dict(num_buckets=5), "num_buckets"),
    (dict(num_buckets=[2, 3]), "num_buckets"),
    (dict(lsh_attn_chunk_length=0), "lsh_attn_chunk_length"),
    (dict(local_attn_chunk_length=-4), "local_attn_chunk_length"),
    (dict(local_num_chunks_before=-1), "local_num_chunks_before"),
    (dict(local_num_chunks_after=1), "local_num_chunks_after"),  # causal LM
    (dict(num_hashes=0), "num_hashes"),
    (dict(axial_pos_embds_dim=(8, 4)), "axial_pos_embds_dim"),
    (dict(axial_pos_shape=(8, 8, 2)), "axial_pos_shape"),
    (dict(hidden_act="mish"), "hidden_act"),
    (dict(hidden_dropout_prob=1.5), "hidden_dropout_prob"),
    (dict(pad_token_id=40), "pad_token_id"),
]


@pytest.mark.parametrize("over,word", BAD_CONFIGS, ids=lambda v: v if isinstance(v, str) else None)
def test_bad_config_names_the_argument(over, word):
    with pytest.raises(ValueError, match=word):
        _small(**over)


def test_bad_module_and_input_arguments():
    with pytest.raises(ValueError, match="local_attn_chunk_length"):
        pyattn.nn.LocalSelfAttention(16, 2, 8, local_attn_chunk_length=0)
    with pytest.raises(ValueError, match="local_attention_probs_dropout_prob"):
        pyattn.nn.LocalSelfAttention(16, 2, 8, local_attention_probs_dropout_prob=1.0)
    with pytest.raises(ValueError, match="is_decoder"):
        ReformerLM(_small(is_decoder=False))
    m = ReformerLM(_small())
    with pytest.raises(ValueError, match="max_position_embeddings"):
        m(torch.ones(1, 80, dtype=torch.long))
    with pytest.raises(TypeError, match="input_ids"):
        m(torch.ones(1, 16))
    with pytest.raises(ValueError, match="labels"):
        m(torch.ones(1, 16, dtype=torch.long), labels=torch.ones(1, 15, dtype=torch.long))


@pytest.mark.slow
def test_trains_at_16k_tokens_on_cpu():
    """Two optimiser steps of a 2-layer (LSH + local) ReformerLM on one 16384-token sequence."""
    cfg = ReformerConfig(vocab_size=64, hidden_size=64, num_attention_heads=2, attention_head_size=32,
                         attn_layers=("lsh", "local"), axial_pos_shape=(128, 128), axial_pos_embds_dim=(32, 32),
                         lsh_attn_chunk_length=64, local_attn_chunk_length=64, num_hashes=2, hash_seed=0,
                         feed_forward_size=128, max_position_embeddings=16384, chunk_size_feed_forward=4096,
                         chunk_size_lm_head=4096, backend="cpu")
    torch.manual_seed(0)
    m = ReformerLM(cfg).train()
    ids = torch.randint(1, 64, (1, 16384))
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    losses = []
    for _ in range(2):
        loss = m(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
