"""SparseTransformerLM: equal to a dense-masked plain-PyTorch computation of the same layout with
the same weights (tolerance rule), causal, trains; bad input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pyattn.models import SparseTransformerConfig, SparseTransformerLM
from pyattn.models.sparse_transformer import build_layout

# N = 70 with 16-token blocks: 5 blocks, the last one partial; 2 local blocks make the layout sparse
TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=96, block=16, num_local_blocks=2)
N = 70

ACT = {"silu": F.silu, "gelu": F.gelu}


def _reference_logits(model: SparseTransformerLM, ids: torch.Tensor, dtype: torch.dtype, dense: bool = False):
    """The model's forward in plain PyTorch with a dense (N, N) mask, weights cast to ``dtype``."""
    c = model.config
    W = {k: v.detach().to(dtype) for k, v in model.state_dict().items()}
    B, n = ids.shape
    H, D = c.num_attention_heads, c.head_dim
    visible = torch.ones(n, n, dtype=torch.bool).tril()
    if not dense:
        visible &= build_layout(c, n).to_dense_mask()[0, 0]

    def norm(x, prefix):
        if c.norm == "rmsnorm":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + c.norm_eps) * W[prefix + ".weight"]
        return F.layer_norm(x, (x.shape[-1],), W[prefix + ".weight"], W[prefix + ".bias"], c.norm_eps)

    x = W["embed_tokens.weight"][ids] + W["embed_positions.weight"][:n]
    for i in range(c.num_hidden_layers):
        p = f"layers.{i}."
        q, k, v = (norm(x, p + "attn_norm") @ W[p + "attn.qkv_proj.weight"].T).view(B, n, 3, H, D).unbind(2)
        s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D ** 0.5
        a = torch.einsum("bhqk,bkhd->bqhd", s.masked_fill(~visible, float("-inf")).softmax(-1), v)
        x = x + a.reshape(B, n, H * D) @ W[p + "attn.o_proj.weight"].T
        y = norm(x, p + "ffn_norm")
        gate, up = (y @ W[p + "ffn.gate_up_proj"].T).chunk(2, dim=-1)
        x = x + (ACT[c.ffn_activation](gate) * up) @ W[p + "ffn.down_proj"].T
    return norm(x, "norm") @ W["embed_tokens.weight"].T


def _ids(B=2, n=N, seed=1):
    return torch.randint(0, TINY["vocab_size"], (B, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("layout,norm,act", [("fixed", "rmsnorm", "silu"), ("strided", "layernorm", "gelu")])
def test_forward_matches_dense_masked_reference(layout, norm, act):
    model = SparseTransformerLM(SparseTransformerConfig(**TINY, layout=layout, norm=norm, ffn_activation=act)).eval()
    with torch.no_grad():  # larger random weights than the init, so that attention patterns matter
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    assert build_layout(model.config, N).density < 0.75  # the layout really drops blocks
    ids = _ids()
    with torch.no_grad():
        out = model(ids).logits.double()
    ref64 = _reference_logits(model, ids, torch.float64)
    ref32 = _reference_logits(model, ids, torch.float32).double()
    err, base = (out - ref64).abs().max().item(), (ref32 - ref64).abs().max().item()
    assert err <= 2 * base + 1e-6, (err, base)
    # the sparse layout changes the result: a dense-causal model would not pass the same check
    dense = _reference_logits(model, ids, torch.float64, dense=True)
    assert (dense - ref64).abs().max().item() > 100 * (2 * base + 1e-6)


def test_causal_future_tokens_do_not_change_earlier_logits():
    model = SparseTransformerLM(SparseTransformerConfig(**TINY)).eval()
    ids = _ids(1)
    changed = ids.clone()
    t = 40
    changed[0, t:] = (changed[0, t:] + 7) % TINY["vocab_size"]
    with torch.no_grad():
        a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert (a[:, t:] - b[:, t:]).abs().max() > 1e-3


def test_backward_and_short_training_run_reduce_loss():
    torch.manual_seed(0)
    model = SparseTransformerLM(SparseTransformerConfig(**TINY))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = _ids(4, 64)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    # tied embeddings: one tensor
    assert model.lm_head.weight is model.embed_tokens.weight


def test_bad_input():
    with pytest.raises(ValueError, match="layout must be one of"):
        SparseTransformerConfig(**{**TINY, "layout": "bigbird"})
    with pytest.raises(ValueError, match="num_attention_heads"):
        SparseTransformerConfig(**{**TINY, "num_attention_heads": 5})
    model = SparseTransformerLM(SparseTransformerConfig(**TINY))
    with pytest.raises(ValueError, match="max_position_embeddings=96"):
        model(_ids(1, 97))
    with pytest.raises(ValueError, match="input_ids must be in"):
        model(torch.tensor([[0, 97]]))
    with pytest.raises(TypeError, match="input_ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(_ids(1, 8), labels=_ids(1, 9))


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    model = SparseTransformerLM(SparseTransformerConfig(**TINY))
    ids = _ids(2, 64)
    model.layout(64, ids.device)  # built outside the traced region
    compiled = torch.compile(model, fullgraph=True)
    eager_loss = model(ids, labels=ids).loss
    loss = compiled(ids, labels=ids).loss
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-5)
    loss.backward()
    assert model.embed_tokens.weight.grad is not None
