"""Under torch.autocast the matmul-type ops take mixed-dtype inputs and run in the autocast dtype
(as F.linear and SDPA do), RMSNorm promotes a mixed residual, and a LLaMA decoder trains in bf16."""
import pytest
import torch
import torch.nn.functional as F

import pyattn
from helpers import assert_tolerance, cpu_backends, skip_unless_backend

BF16 = torch.bfloat16


def _autocast():
    return torch.autocast("cpu", dtype=BF16)


@pytest.mark.parametrize("backend", cpu_backends())
def test_attention_casts_mixed_inputs(backend):
    skip_unless_backend(backend)
    torch.manual_seed(0)
    q, k = torch.randn(1, 2, 24, 16), torch.randn(1, 2, 24, 16)  # fp32, like rotary outputs
    v = torch.randn(1, 2, 24, 16).to(BF16)                           # bf16, like a Linear output
    with _autocast():
        out = pyattn.attention(q, k, v, causal=True, backend=backend)
        ref = F.scaled_dot_product_attention(q, k, v.float(), is_causal=True)  # autocast casts to bf16
    assert out.dtype == BF16 and ref.dtype == BF16
    ref64 = F.scaled_dot_product_attention(q.to(BF16).double(), k.to(BF16).double(), v.double(), is_causal=True)
    assert_tolerance("attention", out.double(), ref.double(), ref64)
    assert q.dtype == torch.float32 and v.dtype == BF16  # the inputs themselves are not touched


def test_outside_autocast_mixed_dtypes_still_rejected():
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(TypeError, match="v has dtype bfloat16 but q has float32"):
        pyattn.attention(q, q, q.to(BF16))


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_glu_ffn_casts_fp32_weights(backend):
    torch.manual_seed(0)
    x = torch.randn(6, 32).to(BF16)
    w_gu, w_d = torch.randn(128, 32) * 0.1, torch.randn(32, 64) * 0.1  # fp32 parameters
    with _autocast():
        out = pyattn.glu_ffn(x, w_gu, w_d, backend=backend)
    assert out.dtype == BF16
    ref = pyattn.glu_ffn(x, w_gu.to(BF16), w_d.to(BF16), backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_rms_norm_promotes_mixed_residual():
    torch.manual_seed(0)
    x, res, w = torch.randn(4, 32).to(BF16), torch.randn(4, 32), torch.ones(32)
    with _autocast():
        y, h = pyattn.rms_norm(x, w, residual=res, backend="cpu")
    assert y.dtype == h.dtype == torch.float32
    torch.testing.assert_close(h, x.float() + res)
    with pytest.raises(TypeError, match="residual"):
        pyattn.rms_norm(x, w, residual=res)  # outside autocast a mix is an error


def test_llama_trains_under_bf16_autocast():
    from pyattn.models.llama import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    ids = torch.randint(0, 64, (2, 16))
    with _autocast():
        logits = model(ids).logits
    assert logits.dtype == BF16
    logits.float().logsumexp(-1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        full = model(ids).logits
    assert (full - logits.float()).abs().max() < 0.05  # bf16 rounding, not a different computation


def test_sdpa_under_autocast_matches_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 2, 12, 8), torch.randn(2, 2, 12, 8).to(BF16), torch.randn(2, 2, 12, 8)
    with _autocast():
        out = pyattn.sdpa(q, k, v, is_causal=True)
        ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert out.dtype == ref.dtype == BF16
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
