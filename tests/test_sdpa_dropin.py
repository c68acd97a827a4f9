"""pyattn.sdpa as a drop-in for F.scaled_dot_product_attention beyond the numerics (tests/test_sdpa.py):
torch's CausalBias masks, its exception classes, the __torch_function__ protocol, TorchScript and
nn.MultiheadAttention with SDPA routed to pyattn.
"""
import io
import warnings
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias, causal_lower_right, causal_upper_left
from torch.overrides import TorchFunctionMode

import pyattn
from helpers import DEVICE, max_err

SDPA = F.scaled_dot_product_attention


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape, device=DEVICE, dtype=dtype)


def _lower_right(L, S):
    with warnings.catch_warnings():  # torch warns that L > S gives NaN rows (pyattn gives 0)
        warnings.simplefilter("ignore")
        return causal_lower_right(L, S)


# ---- exception classes ---------------------------------------------------------------------------

def test_error_classes_satisfy_both_conventions():
    assert issubclass(pyattn.InputError, ValueError) and issubclass(pyattn.InputError, RuntimeError)
    assert issubclass(pyattn.InputTypeError, TypeError) and issubclass(pyattn.InputTypeError, RuntimeError)
    q = _rand(1, 2, 4, 8)
    cases = [
        ((q[0, 0, 0], q[0, 0, 0], q[0, 0, 0]), {}, pyattn.InputError, "query must have at least 2 dims"),
        ((q, q.double(), q.double()), {}, pyattn.InputTypeError, "key has dtype float64 but query has float32"),
        ((q, q, q), {"dropout_p": 1.5}, pyattn.InputError, r"dropout_p must be in \[0, 1\), got 1.5"),
        ((q, q, q), {"attn_mask": torch.ones(3, 4, dtype=torch.bool)}, pyattn.InputError, "attn_mask"),
        ((q, _rand(3, 2, 4, 8), _rand(2, 2, 4, 8)), {}, pyattn.InputError, "batch dims"),
    ]
    for args, kw, cls, msg in cases:
        with pytest.raises(RuntimeError):  # what torch raises: code that catches it keeps working
            SDPA(*args, **kw)
        with pytest.raises(cls, match=msg) as info:
            pyattn.sdpa(*args, **kw)
        assert isinstance(info.value, RuntimeError)


def test_explicit_mask_with_is_causal_raises_like_torch_math():
    q = _rand(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(RuntimeError, match="Explicit attn_mask should not be set when is_causal=True"):
        pyattn.sdpa(q, q, q, attn_mask=mask, is_causal=True)


# ---- CausalBias ----------------------------------------------------------------------------------

def test_issue_reproduction_is_zero():
    torch.manual_seed(0)
    q, k = _rand(1, 2, 8, 16), _rand(1, 2, 8, 16)
    kv = _rand(1, 2, 12, 16)
    for bias, kk in ((causal_upper_left(8, 8), k), (causal_lower_right(8, 12), kv)):
        ref = SDPA(q, kk, kk, attn_mask=bias)
        assert max_err(pyattn.sdpa(q, kk, kk, attn_mask=bias), ref) < 1e-5, bias.variant.name


@pytest.mark.parametrize("L,S", [(5, 5), (3, 11), (9, 4), (1, 7)])
def test_causal_upper_left_is_is_causal(L, S):
    q, k, v = _rand(2, 3, L, 16), _rand(2, 3, S, 16), _rand(2, 3, S, 16)
    ref = SDPA(q, k, v, is_causal=True)  # top-left: for L > S the late rows see every key
    assert max_err(pyattn.sdpa(q, k, v, attn_mask=causal_upper_left(L, S)), ref) < 1e-5
    assert max_err(pyattn.sdpa(q, k, v, is_causal=True), ref) < 1e-5


@pytest.mark.parametrize("L,S", [(5, 5), (3, 11), (9, 4), (1, 7)])
def test_causal_lower_right_matches_its_materialized_mask(L, S):
    q, k, v = (_rand(2, 3, n, 16, dtype=torch.float64).requires_grad_() for n in (L, S, S))
    bias = _lower_right(L, S)
    mask = torch.ones(L, S, dtype=torch.bool, device=DEVICE).tril(S - L)  # query i sees keys j <= i + S - L
    out = pyattn.sdpa(q, k, v, attn_mask=bias)
    ref = SDPA(q, k, v, attn_mask=mask)
    dead = ~mask.any(-1)  # L > S: the first L - S rows see no key
    assert int(dead.sum()) == max(L - S, 0)
    assert torch.isfinite(out).all() and (out[:, :, dead] == 0).all()
    assert max_err(out[:, :, ~dead], ref[:, :, ~dead]) < 1e-12
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
    rq, rk, rv = torch.autograd.grad(ref[:, :, ~dead], (q, k, v), g[:, :, ~dead])
    for a, b in ((dq, rq), (dk, rk), (dv, rv)):
        assert torch.isfinite(a).all() and max_err(a, b) < 1e-12


def test_causal_bias_3d_inputs_and_gqa():
    q, k = _rand(3, 6, 16), _rand(3, 9, 16)
    ref = SDPA(q, k, k, attn_mask=_lower_right(6, 9)._materialize(q.device))
    assert max_err(pyattn.sdpa(q, k, k, attn_mask=_lower_right(6, 9)), ref) < 1e-5
    q, k = _rand(2, 8, 6, 16), _rand(2, 2, 9, 16)
    ref = SDPA(q, k, k, attn_mask=causal_upper_left(6, 9), enable_gqa=True)
    assert max_err(pyattn.sdpa(q, k, k, attn_mask=causal_upper_left(6, 9), enable_gqa=True), ref) < 1e-5


def test_causal_bias_with_is_causal_raises_like_torch():
    q = _rand(1, 2, 4, 8)
    for bias in (causal_upper_left(4, 4), causal_lower_right(4, 4)):
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            SDPA(q, q, q, attn_mask=bias, is_causal=True)
        with pytest.raises(pyattn.InputError, match="CausalBias should not be used with causal=True"):
            pyattn.sdpa(q, q, q, attn_mask=bias, is_causal=True)


def test_causal_bias_of_the_wrong_size_is_an_error():
    q, k = _rand(1, 2, 4, 8), _rand(1, 2, 6, 8)
    with pytest.raises(pyattn.InputError, match=r"CausalBias for \(L, S\) = \(4, 4\).*\(L, S\) = \(4, 6\)"):
        pyattn.sdpa(q, k, k, attn_mask=causal_lower_right(4, 4))


# ---- __torch_function__ --------------------------------------------------------------------------

class _OwnTorchFunction(torch.Tensor):
    """A subclass with its own __torch_function__ that handles nothing itself (like CausalBias for any op but SDPA)."""
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return super().__torch_function__(func, types, args, kwargs)


def test_unknown_mask_subclass_is_not_read_as_a_mask():
    q = _rand(1, 2, 4, 8)
    mask = torch.ones(4, 4, dtype=torch.bool, device=DEVICE).as_subclass(_OwnTorchFunction)
    with pytest.raises(pyattn.InputTypeError, match="_OwnTorchFunction, a Tensor subclass with its own "
                                                    "__torch_function__"):
        pyattn.sdpa(q, q, q, attn_mask=mask)
    # the suggested way out works
    ref = SDPA(q, q, q)
    assert max_err(pyattn.sdpa(q, q, q, attn_mask=mask.as_subclass(torch.Tensor)), ref) < 1e-5


def test_subclass_that_handles_pyattn_sdpa_is_asked_first():
    calls = []

    class Handles(torch.Tensor):
        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            if func is pyattn.sdpa:
                calls.append(kwargs["attn_mask"].shape)
                return torch.zeros(())
            return super().__torch_function__(func, types, args, kwargs)

    q = _rand(1, 2, 4, 8)
    out = pyattn.sdpa(q, q, q, attn_mask=torch.zeros(4, 4, device=DEVICE).as_subclass(Handles))
    assert calls == [torch.Size([4, 4])] and out.shape == ()


def test_plain_subclasses_and_parameters_are_plain_tensors():
    class Plain(torch.Tensor):  # Tensor's own __torch_function__: outputs come back as Plain, as from torch ops
        pass

    q, k = _rand(1, 2, 4, 8), _rand(1, 2, 6, 8)
    m = torch.rand(4, 6, device=DEVICE)
    ref = SDPA(q, k, k, attn_mask=m)
    out = pyattn.sdpa(q.as_subclass(Plain), k, k, attn_mask=m.as_subclass(Plain))
    assert type(out) is Plain and max_err(out.as_subclass(torch.Tensor), ref) < 1e-5
    out = pyattn.sdpa(q, k, k, attn_mask=torch.nn.Parameter(m))
    assert type(out) is torch.Tensor and max_err(out, ref) < 1e-5


def test_torch_function_mode_sees_pyattn_sdpa():
    class Record(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            self.seen.append(func)
            return func(*args, **(kwargs or {}))

    q = _rand(1, 2, 4, 8)
    with Record() as mode:
        out = pyattn.sdpa(q, q, q, attn_mask=causal_upper_left(4, 4))
    assert mode.seen == [pyattn.sdpa]
    assert max_err(out, SDPA(q, q, q, is_causal=True)) < 1e-5


def test_nested_tensor_input_is_a_clear_error():
    nt = torch.nested.nested_tensor([_rand(2, 3, 8), _rand(2, 5, 8)])
    with pytest.raises(pyattn.InputError, match="query must be a dense tensor, got a nested tensor"):
        pyattn.sdpa(nt, nt, nt)


# ---- TorchScript -----------------------------------------------------------------------------------

class _Attn(torch.nn.Module):
    def forward(self, q, k, v, mask: Optional[torch.Tensor] = None):
        return pyattn.sdpa(q, k, v, attn_mask=mask, is_causal=mask is None)


def test_torchscript_runs_in_process_but_cannot_be_saved():
    scripted = torch.jit.script(_Attn())
    q, k = _rand(1, 2, 5, 8), _rand(1, 2, 7, 8)
    mask = torch.rand(5, 7, device=DEVICE) > 0.3
    assert max_err(scripted(q, k, k), SDPA(q, k, k, is_causal=True)) < 1e-5
    assert max_err(scripted(q, k, k, mask), SDPA(q, k, k, attn_mask=mask)) < 1e-5
    # TorchScript re-raises what the Python call raised as a RuntimeError quoting it
    with pytest.raises(RuntimeError, match="InputError: query must have at least 2 dims"):
        scripted(q[0, 0, 0], k, k)
    with pytest.raises(RuntimeError, match="Could not export Python function call '_sdpa_python'"):
        torch.jit.save(scripted, io.BytesIO())


# ---- routing F.scaled_dot_product_attention to pyattn.sdpa -----------------------------------------

@pytest.mark.parametrize("batch_first", [False, True])
def test_multihead_attention_slow_path_through_pyattn(monkeypatch, batch_first):
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=batch_first).train()  # train(): the Python path
    x = _rand(3, 5, 16) if batch_first else _rand(5, 3, 16)  # (N, L, E) or (L, N, E)
    kpm = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(5)
    kw = dict(need_weights=False, key_padding_mask=kpm, attn_mask=causal)
    ref = mha(x, x, x, **kw)[0]
    ref_c = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)[0]
    calls = []

    def routed(*args, **kwargs):
        calls.append(1)
        return pyattn.sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", routed)
    out = mha(x, x, x, **kw)[0]
    out_c = mha(x, x, x, attn_mask=causal, need_weights=False, is_causal=True)[0]
    assert len(calls) == 2
    assert max_err(out, ref) < 1e-5 and max_err(out_c, ref_c) < 1e-5


@pytest.mark.slow
def test_compile_with_causal_bias_argument():
    q, k = _rand(1, 2, 6, 16), _rand(1, 2, 4, 16)
    bias = _lower_right(6, 4)
    assert isinstance(bias, CausalBias)
    f = torch.compile(lambda q, k, v, m: pyattn.sdpa(q, k, v, attn_mask=m), fullgraph=True)
    assert max_err(f(q, k, k, bias), pyattn.sdpa(q, k, k, attn_mask=bias)) == 0


# ---- benchmarks/torch_sdpa_suite.py: the acceptance script's own logic -----------------------------

def _suite_module():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "torch_sdpa_suite.py"
    spec = importlib.util.spec_from_file_location("torch_sdpa_suite", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_suite_script_classifies_failures():
    suite = _suite_module()
    assert "dropout random stream" in suite.match_accepted(
        "TestTransformersCPU.test_scaled_dot_product_attention_4D_input_dim_no_attn_mask_dropout_p_0_5_cpu")
    assert suite.match_accepted("TestTransformersCPU.test_scaled_dot_product_attention_4D_input_dim_no_attn_mask"
                                "_dropout_p_0_0_cpu") is None
    assert "backend choice" in suite.match_accepted("TestSDPACPU.test_fused_sdp_choice_cpu_type_dense_cpu")
    control = {"A.t_torch": {"outcome": "failed"}, "A.t_ok": {"outcome": "passed"},
               "A.t_new": {"outcome": "passed"}, "A.t_drop_dropout_p_0_2": {"outcome": "passed"}}
    routed = {"A.t_torch": {"outcome": "failed"}, "A.t_ok": {"outcome": "passed"},
              "A.t_new": {"outcome": "error", "message": "InputError: boom"},
              "A.t_drop_dropout_p_0_2": {"outcome": "failed"}, "A.t_skip": {"outcome": "skipped"}}
    rows = suite.classify(control, routed)
    assert [(t, k) for t, k, _ in rows] == [("A.t_drop_dropout_p_0_2", "accepted"), ("A.t_new", "UNEXPECTED"),
                                            ("A.t_torch", "torch")]
    assert rows[1][2] == "InputError: boom"
    counts = suite.summarize(routed)["A"]
    assert (counts["passed"], counts["failed"], counts["error"], counts["skipped"]) == (1, 2, 1, 1)


def test_suite_script_arguments(tmp_path, capsys):
    suite = _suite_module()
    with pytest.raises(SystemExit):
        suite.parse_args(["--help"])
    assert suite.PINNED_REVISION in capsys.readouterr().out
    with pytest.raises(SystemExit):
        suite.parse_args([str(tmp_path / "missing.py")])
    assert "curl -L -o" in capsys.readouterr().err
    f = tmp_path / "test_transformers.py"
    f.write_text("")
    args = suite.parse_args([str(f), "-k", "causal", "-k", "mask", "--classes", "TestAttnBiasCPU"])
    assert args.keyword == ["causal", "mask"] and args.classes == ["TestAttnBiasCPU"] and args.mode == "both"
