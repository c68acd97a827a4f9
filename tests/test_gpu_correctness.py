"""GPU correctness at multi-block sizes (N >= 1024: several key blocks per query block and several
query blocks per program grid) for every GPU backend and op, against the fp64 reference with the
tolerance rule. Marked ``gpu``: skipped without a CUDA device; run by benchmarks/gpu_suite.sh.

The set is small on purpose (each distinct flag/dtype/head-dim combination is one Triton compile
per kernel): it covers dense, causal with Nq != Nk, GQA, sliding window, key padding + bias with
gradient + ALiBi, dropout, varlen, head dims 64/128/256 and fp32/fp16/bf16.
"""
import pytest
import torch

from attention_cases import check_attention, make_inputs
from helpers import DEVICE
from test_glu import _run_ffn, _run_glu
from test_rms_norm import _run_case as _run_rms_norm
from test_varlen import _check as _check_varlen

pytestmark = pytest.mark.gpu
BACKENDS = ["triton", "cuda"]

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, D, H, Hkv, Nq, Nk", [
    (BF16, 64, 4, 4, 1024, 1024),
    (FP16, 128, 8, 2, 2048, 2048),   # GQA
    (BF16, 256, 2, 2, 1024, 1024),
    (FP32, 64, 2, 2, 1024, 1024),
    (BF16, 96, 2, 1, 1024, 1100),    # padded head dim, ragged last key block, MQA
], ids=str)
def test_attention_dense(backend, dtype, D, H, Hkv, Nq, Nk):
    q, k, v = make_inputs(B=2, H=H, Hkv=Hkv, Nq=Nq, Nk=Nk, D=D, dtype=dtype)
    check_attention(backend, q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Nq, Nk", [(1024, 1024), (1024, 1536), (1536, 1024)], ids=str)
def test_attention_causal(backend, Nq, Nk):
    q, k, v = make_inputs(B=1, H=4, Nq=Nq, Nk=Nk, D=128, dtype=BF16, layout="bnhd")
    check_attention(backend, q, k, v, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_window(backend):
    q, k, v = make_inputs(B=1, H=4, Nq=2048, D=128, dtype=BF16)
    check_attention(backend, q, k, v, window=(256, 0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_padding_bias_alibi(backend):
    B, H, N = 2, 4, 1024
    q, k, v = make_inputs(B=B, H=H, Nq=N, D=64, dtype=BF16)
    pad = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    pad[1, 700:] = True  # True = padding (PyTorch's meaning)
    bias = torch.randn(1, H, N, N, device=DEVICE, dtype=BF16)
    slopes = torch.rand(H, device=DEVICE)
    check_attention(backend, q, k, v, key_padding_mask=pad, bias=bias, alibi_slopes=slopes)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_dropout(backend):
    q, k, v = make_inputs(B=1, H=4, Nq=1024, D=64, dtype=BF16)
    check_attention(backend, q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention(backend):
    lengths = [1024, 517, 1500, 3]
    _check_varlen(backend, lengths, lengths, dtype=BF16, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape, dtype, residual", [((4096, 4096), BF16, True), ((64, 65536), FP16, False),
                                                    ((1024, 1000), FP32, True)], ids=str)
def test_rms_norm(backend, shape, dtype, residual):
    _run_rms_norm(backend, shape, dtype, with_residual=residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, activation", [(BF16, "silu"), (FP16, "gelu_tanh"), (FP32, "gelu")], ids=str)
def test_glu(backend, dtype, activation):
    _run_glu(backend, dtype, (4096, 2048), activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, activation, bias", [(BF16, "silu", True), (FP16, "gelu", False),
                                                     (FP32, "relu", True)], ids=str)
def test_glu_ffn(backend, dtype, activation, bias):
    _run_ffn(backend, dtype, 1024, 512, 1024, activation, bias=bias)
