"""pyattn.lsh_attention: against the fp64 reference (tolerance rule), against transformers'
LSHSelfAttention with the same weights and rotations, gradients, opcheck, compile, bad input."""
from __future__ import annotations

import pytest
import torch

import pyattn
from pyattn.ops.lsh import lsh_attention_bwd, lsh_attention_fwd
from pyattn.reference.lsh import hash_buckets, mask_values, sort_by_bucket
from helpers import assert_tolerance, cpu_backends, max_err, skip_unless_backend

BACKENDS = [b for b in cpu_backends() if b != "reference"]


def _hf_module(H, D, L, R, n_buckets, causal, nb=1, na=0, seed=7):
    transformers = pytest.importorskip("transformers")
    from transformers.models.reformer.modeling_reformer import LSHSelfAttention

    transformers.logging.set_verbosity_error()
    cfg = transformers.ReformerConfig(
        hidden_size=H * D, num_attention_heads=H, attention_head_size=D, lsh_attn_chunk_length=L, num_hashes=R,
        num_buckets=n_buckets, lsh_num_chunks_before=nb, lsh_num_chunks_after=na, is_decoder=causal,
        hash_seed=seed, lsh_attention_probs_dropout_prob=0.0)
    return LSHSelfAttention(cfg).eval()


def _heads(x, H, D):
    B, N = x.shape[:2]
    return x.view(B, N, H, D).transpose(1, 2)


HF_CASES = [  # (N, n_hashes, causal, n_buckets, padding, chunks_before, chunks_after)
    (64, 1, False, 4, False, 1, 0),
    (64, 2, True, 4, False, 1, 0),
    (64, 4, True, 8, False, 1, 0),
    (64, 4, False, 4, False, 1, 1),
    (64, 2, True, [2, 4], False, 1, 0),
    (64, 2, False, 4, True, 1, 0),
    (64, 4, True, 4, True, 2, 1),
    (12, 2, True, 4, False, 1, 0),  # shorter than one chunk: full attention
    (57, 2, True, 4, False, 1, 0),  # not a multiple of chunk_length: padded as ReformerModel does
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", HF_CASES, ids=lambda c: "-".join(map(str, c)))
def test_matches_transformers(backend, case):
    skip_unless_backend(backend)
    N, R, causal, n_buckets, padding, nb, na = case
    B, H, D, L = 2, 2, 8, 16
    m = _hf_module(H, D, L, R, n_buckets, causal, nb, na)
    Np = -(-N // L) * L if N > L else N
    x = torch.randn(B, Np, H * D)
    am = torch.ones(B, Np, dtype=torch.long)
    am[:, N:] = 0
    if padding:
        am[0, N - 5:N] = 0
        am[1, :3] = 0
    kpm = (am == 0)[:, :N]
    with torch.no_grad():
        hf = m(x, attention_mask=am if (padding or Np != N) else None).hidden_states[:, :N]
        qk = _heads(m.query_key(x[:, :N]), H, D)
        v = _heads(m.value(x[:, :N]), H, D)
        args = dict(n_hashes=R, n_buckets=n_buckets, chunk_length=L, chunks_before=nb, chunks_after=na,
                    causal=causal, key_padding_mask=kpm if padding else None)
        nbk = n_buckets if n_buckets is not None else pyattn.lsh.default_n_buckets(Np, L)
        rot = pyattn.lsh.draw_rotations(H, D, R, nbk, seed=7)  # what transformers draws with hash_seed=7
        out = pyattn.lsh_attention(qk, v, backend=backend, seed=7, **args)
        ref64 = pyattn.lsh_attention(qk.double(), v.double(), backend="reference", rotations=rot.double(), **args)
    out = out.transpose(1, 2).reshape(B, N, H * D)
    ref64 = ref64.transpose(1, 2).reshape(B, N, H * D)
    # transformers' own fp32 error against the fp64 oracle bounds ours (it is ~1e-7 except on rows
    # whose every round sees only the self-masked score, where fp32 rounds lse at magnitude 1e5)
    assert max_err(hf, ref64) < 1e-2
    assert_tolerance("out vs fp64", out, hf, ref64)
    assert max_err(out, hf) <= 2 * max_err(hf, ref64) + 1e-5


def _op_inputs(B=2, H=2, N=48, D=16, R=2, L=16, dtype=torch.float32, padding=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    rot = torch.randn(H, D, R, 2, generator=g)
    kpm = None
    if padding:
        kpm = torch.zeros(B, N, dtype=torch.bool)
        kpm[0, -7:] = True
        kpm[1, :2] = True
    perm = sort_by_bucket(hash_buckets(q, 4, rot, kpm))
    return [t.to(dtype) for t in (q, k, v)], perm, kpm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("causal,R,nb,na,p", [(True, 2, 1, 0, 0.0), (False, 4, 1, 1, 0.0), (True, 2, 1, 0, 0.25)])
def test_op_forward_backward_tolerance(backend, dtype, causal, R, nb, na, p):
    """The fused op's outputs and gradients against the fp64 reference: <= 2x (3x for gradients)
    the error of the plain-PyTorch reference computed in the same dtype."""
    skip_unless_backend(backend)
    (q, k, v), perm, kpm = _op_inputs(R=R, dtype=dtype)
    mv, smv = mask_values(dtype)
    seed = torch.tensor(1234) if p > 0 else None
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(q.shape, generator=g).to(dtype)
    dlse = torch.randn(q.shape[:3], generator=g)

    def run(be, tensors, compute=None):
        ts = [t.detach().clone().requires_grad_() for t in tensors]
        if compute is None:
            out, lse, _ = lsh_attention_fwd(*ts, perm, kpm, 16, nb, na, causal, mv, smv, p, seed, be)
        else:  # plain PyTorch in the given precision
            from pyattn.reference.lsh import combine_rounds, lsh_chunks_reference
            o_r, l_r = lsh_chunks_reference(*ts, perm, kpm, 16, nb, na, causal, mv, smv, p, 1234 if p else 0,
                                            compute_dtype=compute)
            out, lse = combine_rounds(o_r, l_r)
        ((out.double() * dout.double()).sum() + (lse.double() * dlse.double()).sum()).backward()
        return [out, lse] + [t.grad for t in ts]

    got = run(backend, (q, k, v))
    ref64 = run("reference", [t.double() for t in (q, k, v)])
    low = run(None, (q, k, v), compute=dtype)
    for i, name in enumerate(["out", "lse", "dq", "dk", "dv"]):
        assert_tolerance(name, got[i], low[i], ref64[i], factor=2.0 if i < 2 else 3.0,
                         floor=1e-5 if dtype == torch.float32 else 1e-3)


def test_reference_backward_matches_autograd():
    """The closed-form reference backward equals autograd through the reference forward."""
    from pyattn.reference.lsh import combine_rounds, lsh_chunks_reference

    (q, k, v), perm, kpm = _op_inputs(R=2, dtype=torch.float64)
    mv, smv = mask_values(torch.float64)
    ts = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse = combine_rounds(*lsh_chunks_reference(*ts, perm, kpm, 16, 1, 1, True, mv, smv))
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    auto = torch.autograd.grad((out, lse), ts, (dout, dlse))
    closed = lsh_attention_bwd(dout, dlse, q, k, v, out.detach(), lse.detach(),
                               lsh_attention_fwd(q, k, v, perm, kpm, 16, 1, 1, True, mv, smv, 0.0, None,
                                                 "reference")[2], perm, kpm, 16, 1, 1, True, mv, smv, 0.0, None,
                               "reference")
    for a, c in zip(auto, closed):
        torch.testing.assert_close(c, a, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_public_gradients_reach_qk_and_v(backend):
    """End to end (hashing, normalisation, padding to a chunk multiple, round combination)."""
    skip_unless_backend(backend)
    g = torch.Generator().manual_seed(3)
    qk = torch.randn(1, 2, 40, 16, generator=g)
    v = torch.randn(1, 2, 40, 16, generator=g)
    rot = torch.randn(2, 16, 2, 2, generator=g)
    kpm = torch.zeros(1, 40, dtype=torch.bool)
    kpm[0, :3] = True
    grads = {}
    for be, dt in ((backend, torch.float32), ("reference", torch.float32), ("reference", torch.float64)):
        a, b = qk.to(dt).detach().clone().requires_grad_(), v.to(dt).detach().clone().requires_grad_()
        out, lse = pyattn.lsh_attention(a, b, n_hashes=2, n_buckets=4, chunk_length=16, causal=True,
                                        key_padding_mask=kpm, rotations=rot.to(dt), return_lse=True, backend=be)
        (out.pow(2).sum() + lse.sum()).backward()
        grads[(be, dt)] = (out, a.grad, b.grad)
    for i, name in enumerate(["out", "dqk", "dv"]):
        assert_tolerance(name, grads[(backend, torch.float32)][i], grads[("reference", torch.float32)][i],
                         grads[("reference", torch.float64)][i], factor=2.0 if i == 0 else 3.0)
    assert grads[(backend, torch.float32)][1].abs().sum() > 0


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_opcheck(backend):
    (q, k, v), perm, kpm = _op_inputs(N=32, D=8)
    mv, smv = mask_values(torch.float32)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    torch.library.opcheck(lsh_attention_fwd, (q, k, v, perm, kpm, 16, 1, 0, True, mv, smv, 0.0, None, backend))
    out, lse, lse_r = lsh_attention_fwd(q, k, v, perm, None, 16, 1, 1, False, mv, smv, 0.0, None, backend)
    torch.library.opcheck(lsh_attention_bwd, (torch.randn_like(out), torch.randn_like(lse), q.detach(), k.detach(),
                                              v.detach(), out.detach(), lse.detach(), lse_r.detach(), perm, None, 16,
                                              1, 1, False, mv, smv, 0.0, None, backend))


def test_torch_compile_fullgraph():
    rot = torch.randn(2, 8, 2, 2)

    def f(qk, v):
        return pyattn.lsh_attention(qk, v, n_hashes=2, n_buckets=4, chunk_length=8, causal=True, rotations=rot,
                                    backend="cpu").sum()

    qk = torch.randn(1, 2, 32, 8, requires_grad=True)
    v = torch.randn(1, 2, 32, 8, requires_grad=True)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(qk, v)
    out.backward()
    qk2, v2 = qk.detach().clone().requires_grad_(), v.detach().clone().requires_grad_()
    ref = f(qk2, v2)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(qk.grad, qk2.grad)
    torch.testing.assert_close(v.grad, v2.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_keys_padded_is_finite_and_inputs_untouched(backend):
    skip_unless_backend(backend)
    qk, v = torch.randn(2, 1, 32, 8), torch.randn(2, 1, 32, 8)
    copies = (qk.clone(), v.clone())
    kpm = torch.zeros(2, 32, dtype=torch.bool)
    kpm[0] = True
    out = pyattn.lsh_attention(qk, v, n_hashes=2, n_buckets=4, chunk_length=8, key_padding_mask=kpm, seed=1,
                               backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(qk, copies[0]) and torch.equal(v, copies[1])


def test_seed_reproduces_transformers_rotations_and_is_deterministic():
    a = pyattn.lsh_attention(torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), n_hashes=2, seed=5)
    torch.manual_seed(0)
    qk, v = torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8)
    state = torch.get_rng_state()
    o1 = pyattn.lsh_attention(qk, v, n_hashes=2, seed=5, chunk_length=16)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    torch.manual_seed(5)
    rot = torch.randn(2, 8, 2, pyattn.lsh.default_n_buckets(64, 16) // 2)
    o2 = pyattn.lsh_attention(qk, v, n_hashes=2, rotations=rot, chunk_length=16)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    assert a.shape == (1, 2, 64, 8)


def test_default_n_buckets_as_transformers():
    from pyattn.lsh import default_n_buckets

    assert default_n_buckets(4096, 64) == 128
    assert default_n_buckets(64, 16) == 8
    assert default_n_buckets(16384, 64, max_position_embeddings=16384) == [16, 32]


def test_backend_status_lists_every_backend():
    status = pyattn.backend_status("lsh")
    assert set(status) == {"triton", "cuda", "cpu", "reference"}
    assert status["reference"] is None and status["cpu"] is None
    assert isinstance(status["cuda"], str)  # no CUDA device here


def _call(**over):
    args = dict(qk=torch.randn(1, 2, 64, 8), v=torch.randn(1, 2, 64, 8), chunk_length=16, n_hashes=2)
    args.update(over)
    qk, v = args.pop("qk"), args.pop("v")
    return pyattn.lsh_attention(qk, v, **args)


@pytest.mark.parametrize("over,exc,word", [
    (dict(n_buckets=5), ValueError, "n_buckets"),
    (dict(n_buckets=[4, 3]), ValueError, "n_buckets"),
    (dict(n_buckets=4.0), TypeError, "n_buckets"),
    (dict(chunk_length=0), ValueError, "chunk_length"),
    (dict(chunk_length=-3), ValueError, "chunk_length"),
    (dict(n_hashes=0), ValueError, "n_hashes"),
    (dict(chunks_before=-1), ValueError, "chunks_before"),
    (dict(n_buckets=4, rotations=torch.randn(2, 8, 2, 3)), ValueError, "rotations"),
    (dict(n_buckets=4, rotations=torch.randn(2, 8, 3, 2)), ValueError, "rotations"),
    (dict(n_buckets=4, rotations=torch.randn(2, 8, 2, 2), seed=1), ValueError, "seed"),
    (dict(key_padding_mask=torch.zeros(1, 63, dtype=torch.bool)), ValueError, "key_padding_mask"),
    (dict(key_padding_mask=torch.zeros(1, 64)), TypeError, "key_padding_mask"),
    (dict(v=torch.randn(1, 2, 64, 4)), ValueError, "v"),
    (dict(qk=torch.randn(2, 64, 8)), ValueError, "qk"),
    (dict(v=torch.randn(1, 2, 64, 8, dtype=torch.float16)), TypeError, "v"),
    (dict(dropout_p=1.0), ValueError, "dropout_p"),
    (dict(causal=1), TypeError, "causal"),
    (dict(backend="gpu"), ValueError, "backend"),
])
def test_bad_input(over, exc, word):
    with pytest.raises(exc, match=word):
        _call(**over)


def test_module_from_config_loads_transformers_weights_and_matches():
    transformers = pytest.importorskip("transformers")
    m = _hf_module(2, 8, 16, 2, 4, True)
    mine = pyattn.nn.LSHSelfAttention.from_config(m.config, backend="cpu")
    mine.load_state_dict(m.state_dict())
    x = torch.randn(2, 64, 16)
    am = torch.ones(2, 64, dtype=torch.long)
    am[1, :4] = 0
    with torch.no_grad():
        hf = m(x, attention_mask=am).hidden_states
    out = mine(x.requires_grad_(), attention_mask=am)
    assert max_err(out, hf) < 1e-4
    out.sum().backward()
    assert mine.query_key.weight.grad is not None and mine.value.weight.grad.abs().sum() > 0
    assert "num_hashes=2" in repr(mine)


def test_cuda_backend_reports_missing_kernels():
    from pyattn._dispatch import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="no CUDA kernels"):
        _call(backend="cuda")


@pytest.mark.parametrize("N", [64, 56, 12])  # whole chunks; padded to the chunk multiple; one chunk, no hashing
def test_given_sort_order_is_reused_without_hashing(N, monkeypatch):
    torch.manual_seed(0)
    qk, v = torch.randn(1, 2, N, 8, requires_grad=True), torch.randn(1, 2, N, 8, requires_grad=True)
    kw = dict(chunk_length=16, n_hashes=2, n_buckets=4, causal=True, dropout_p=0.2, backend="reference")
    torch.manual_seed(5)  # rotations and the dropout seed from the global RNG
    out, lse, sort = pyattn.lsh.lsh_attention_and_sort(qk, v, **kw)
    after_first = torch.rand(())
    Np, R = (-(-N // 16) * 16, 2) if N > 16 else (N, 1)
    assert sort.dtype == torch.int64 and sort.shape == (1, 2, R * Np)
    assert torch.equal(sort.view(1, 2, R, Np).sort(-1).values, torch.arange(Np).expand(1, 2, R, Np))
    calls = []
    monkeypatch.setattr(pyattn.lsh, "hash_buckets", lambda *a: calls.append(1) or hash_buckets(*a))
    torch.manual_seed(5)
    out2, lse2, sort2 = pyattn.lsh.lsh_attention_and_sort(qk, v, sort=sort, **kw)
    assert not calls and sort2 is sort
    assert torch.equal(torch.rand(()), after_first)  # the RNG stream advanced as in the first call
    assert torch.equal(out, out2) and torch.equal(lse, lse2)
    g = torch.randn_like(out)
    assert torch.equal(torch.autograd.grad(out, qk, g)[0], torch.autograd.grad(out2, qk, g)[0])
    if N > 16:
        torch.manual_seed(5)
        pyattn.lsh.lsh_attention_and_sort(qk, v, **kw)
        assert calls  # without a sort order the buckets are hashed


@pytest.mark.parametrize("sort,exc,word", [
    (torch.zeros(1, 2, 128, dtype=torch.int32), TypeError, "sort"),
    (torch.zeros(1, 2, 64, dtype=torch.int64), ValueError, "sort"),
    (torch.full((1, 2, 128), 64, dtype=torch.int64), ValueError, r"sort must hold positions in \[0, 64\)"),
    (torch.full((1, 2, 128), -1, dtype=torch.int64), ValueError, "sort"),
])
def test_bad_sort_order(sort, exc, word):
    with pytest.raises(exc, match=word):
        pyattn.lsh.lsh_attention_and_sort(torch.randn(1, 2, 64, 8), torch.randn(1, 2, 64, 8), chunk_length=16,
                                          n_hashes=2, sort=sort)
