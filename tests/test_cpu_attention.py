"""CPU backend specifics: long-sequence regressions on every tile path."""
import pytest
import torch

from helpers import skip_unless_backend
from attention_cases import check_attention, make_inputs


def alibi_slopes(h: int) -> torch.Tensor:
    """The standard ALiBi slopes 2^(-8 i / h), i = 1..h."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)])


@pytest.mark.parametrize("tiles", ["sgemm", "brgemm"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alibi_long_sequence(monkeypatch, tiles, causal, dtype):
    # With slope 1/2 the scores of the first key tile lie hundreds below those of the diagonal, so
    # the online-softmax rescale factor of the accumulated output underflows to exactly 0; the
    # output accumulated so far must still be dropped (it once was kept: errors of ~5 at N = 1024).
    skip_unless_backend("cpu")
    monkeypatch.setenv("PYATTN_CPU_ATTN_BRGEMM", "0" if tiles == "sgemm" else "1")
    q, k, v = make_inputs(B=1, H=8, Nq=1024, D=64, dtype=dtype)
    check_attention("cpu", q, k, v, alibi_slopes=alibi_slopes(8), causal=causal, grad=dtype == torch.float32)


def test_large_bias_gap_between_key_tiles():
    # the same underflow from an additive bias: keys [0, 600) sit 300 below the rest
    skip_unless_backend("cpu")
    q, k, v = make_inputs(B=1, H=2, Nq=700, Nk=1100, D=32)
    bias = torch.zeros(1100)
    bias[:600] = -300.0
    check_attention("cpu", q, k, v, bias=bias.expand(700, 1100), grad=False)


@pytest.mark.parametrize("D", [40, 64, 128])
@pytest.mark.parametrize("path", ["sgemm", "brgemm_f32"])
def test_backward_tile_paths_fp32(monkeypatch, path, D):
    # the fp32 backward on each tile path: odd head dims, causal and sliding-window bands, key
    # padding, a bias with its gradient, grouped kv heads, dropout; >= 128 query rows per kv head
    # so that the brgemm tiles apply
    skip_unless_backend("cpu")
    from pyattn.ops import cpu_tuning
    if path not in cpu_tuning.available_paths():
        pytest.skip(f"this CPU / build has no {path} tiles")
    monkeypatch.setenv("PYATTN_CPU_AUTOTUNE", "0")
    monkeypatch.setenv("PYATTN_CPU_ATTN_PATH", path)
    cpu_tuning.reset()
    try:
        q, k, v = make_inputs(B=2, H=4, Hkv=2, Nq=150, Nk=201, D=D)
        kpm = torch.ones(2, 201, dtype=torch.bool)
        kpm[1, 170:] = False
        bias = torch.randn(2, 1, 150, 201, generator=torch.Generator().manual_seed(3))
        assert cpu_tuning.ensure(torch.float32, D)["bwd_path"] == path
        check_attention("cpu", q, k, v)
        check_attention("cpu", q, k, v, causal=True, key_padding_mask=kpm)
        check_attention("cpu", q, k, v, window=(40, 7), bias=bias)
        check_attention("cpu", q, k, v, causal=True, dropout_p=0.2)
    finally:
        cpu_tuning.reset()
