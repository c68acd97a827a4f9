"""GLU and GLU feed-forward: every backend against the fp64 eager LlamaMLP formula (tolerance rule),
custom-op checks, torch.compile, the memory saved for backward, LlamaMLP loading and bad input."""
import pytest
import torch
import torch.nn.functional as F

from pyattn.nn.glu import GLUFeedForward
from pyattn.ops.glu import glu, glu_ffn
from pyattn.reference.glu import ACTIVATIONS, act_fn, glu_ffn_reference
from helpers import DEVICE, DTYPES, assert_tolerance, backends_for_device, skip_unless_backend, strided_like

BACKENDS = backends_for_device()
TS = [0, 1, 7, 33]
IS = [1, 17, 64]


def _leaves(tensors, dtype):
    return [t.detach().to(dtype).requires_grad_() if t is not None else None for t in tensors]


def _check_grads(names, mine, lo, hi):
    for name, a, b, c in zip(names, mine, lo, hi):
        if a is None:
            assert b is None
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} != {b.dtype}"
        assert_tolerance(name, a, b, c, factor=3.0, floor=1e-4)


# ------------------------------------------------------------------------------------ glu
def _run_glu(backend, dtype, shape, activation, strided=False):
    skip_unless_backend(backend)
    gate = torch.randn(shape, device=DEVICE).to(dtype)
    up = torch.randn(shape, device=DEVICE).to(dtype)
    if strided:
        gate, up = strided_like(gate), strided_like(up)
    gl, ul = _leaves((gate, up), dtype)
    out = glu(gl, ul, activation, backend=backend)
    assert out.shape == gate.shape and out.dtype == dtype
    (g64, u64), (glo, ulo) = _leaves((gate, up), torch.float64), _leaves((gate, up), dtype)
    o64 = act_fn(g64, activation) * u64
    olo = act_fn(glo, activation) * ulo
    assert_tolerance("out", out, olo, o64)
    if out.numel() == 0:
        return
    dout = torch.randn_like(out)
    mine = torch.autograd.grad(out, (gl, ul), dout)
    lo = torch.autograd.grad(olo, (glo, ulo), dout)
    hi = torch.autograd.grad(o64, (g64, u64), dout.double())
    _check_grads(["dgate", "dup"], mine, lo, hi)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(0, 17), (1, 1), (7, 17), (33, 64), (2, 3, 20)], ids=str)
def test_glu(backend, dtype, activation, shape):
    _run_glu(backend, dtype, shape, activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_glu_strided(backend, dtype):
    _run_glu(backend, dtype, (3, 5, 24), "silu", strided=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_halves_of_one_tensor(backend):
    """gate/up as the two halves of a (T, 2I) tensor: views with row stride 2I, no copy needed."""
    skip_unless_backend(backend)
    pre = torch.randn(2, 9, 2 * 40, device=DEVICE, requires_grad=True)
    out = glu(pre[..., :40], pre[..., 40:], "gelu", backend=backend)
    ref = F.gelu(pre[..., :40]) * pre[..., 40:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    (mine,) = torch.autograd.grad(out, pre, g)
    (want,) = torch.autograd.grad(ref, pre, g)
    torch.testing.assert_close(mine, want, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- glu_ffn
def _run_ffn(backend, dtype, T, H, inter, activation, bias=False, strided=False, h_out=None, lead=None,
             t_weights=False):
    skip_unless_backend(backend)
    h_out = h_out or H
    shape = (*lead, H) if lead else (T, H)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    wgu = (torch.randn(2 * inter, H, device=DEVICE) / H ** 0.5).to(dtype)
    wd = (torch.randn(h_out, inter, device=DEVICE) / inter ** 0.5).to(dtype)
    bgu = torch.randn(2 * inter, device=DEVICE).to(dtype) if bias else None
    bd = torch.randn(h_out, device=DEVICE).to(dtype) if bias else None
    if strided:
        x = strided_like(x)
    if t_weights:  # weights stored transposed: (2I, H) views of (H, 2I) tensors
        wgu = wgu.t().contiguous().t()
        wd = wd.t().contiguous().t()
    x_before = x.clone()
    mine_leaves = _leaves((x, wgu, wd, bgu, bd), dtype)
    if t_weights:
        for i in (1, 2):
            mine_leaves[i] = mine_leaves[i].detach().t().contiguous().t().requires_grad_()
    out = glu_ffn(mine_leaves[0], mine_leaves[1], mine_leaves[2], activation=activation,
                  bias_gate_up=mine_leaves[3], bias_down=mine_leaves[4], backend=backend)
    assert out.shape == (*x.shape[:-1], h_out) and out.dtype == dtype
    assert torch.equal(x, x_before), "input modified in place"

    def ref(leaves):
        return glu_ffn_reference(leaves[0], leaves[1], leaves[2], activation, leaves[3], leaves[4])

    l64, llo = _leaves((x, wgu, wd, bgu, bd), torch.float64), _leaves((x, wgu, wd, bgu, bd), dtype)
    o64, olo = ref(l64), ref(llo)
    assert_tolerance("out", out, olo, o64)
    dout = torch.randn_like(out)

    def grads(o, leaves, g):
        live = [t for t in leaves if t is not None]
        gs = iter(torch.autograd.grad(o, live, g))
        return [next(gs) if t is not None else None for t in leaves]

    mine = grads(out, mine_leaves, dout)
    lo = grads(olo, llo, dout)
    hi = grads(o64, l64, dout.double())
    _check_grads(["dx", "dw_gate_up", "dw_down", "dbias_gate_up", "dbias_down"], mine, lo, hi)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", TS)
@pytest.mark.parametrize("inter", IS)
def test_ffn_shapes(backend, dtype, T, inter):
    _run_ffn(backend, dtype, T, 24, inter, "silu", bias=(inter == 17), h_out=(20 if inter == 64 else None))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_ffn_activations(backend, dtype, activation):
    _run_ffn(backend, dtype, 33, 40, 17, activation, bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ffn_strided_inputs(backend, dtype):
    _run_ffn(backend, dtype, None, 32, 17, "gelu_tanh", strided=True, lead=(3, 5), t_weights=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_ffn_many_row_chunks(backend):
    """T larger than the CPU row chunk: weight and bias gradients accumulate across chunks."""
    _run_ffn(backend, torch.float32, 5000, 16, 8, "silu", bias=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_explicit_backend_matches_default(backend):
    skip_unless_backend(backend)
    x = torch.randn(4, 8, device=DEVICE)
    w = torch.randn(6, 8, device=DEVICE)
    wd = torch.randn(8, 3, device=DEVICE)
    torch.testing.assert_close(glu_ffn(x, w, wd, backend=backend), glu_ffn(x, w, wd), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- op checks
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless_backend(backend)
    from pyattn.ops.glu import glu_bwd, glu_ffn_bwd, glu_ffn_fwd, glu_fwd

    g = torch.randn(5, 17, device=DEVICE, requires_grad=True)
    u = torch.randn(5, 17, device=DEVICE, requires_grad=True)
    torch.library.opcheck(glu_fwd, (g, u, 0, backend))
    torch.library.opcheck(glu_fwd, (g, u, 1, backend))
    torch.library.opcheck(glu_bwd, (torch.randn(5, 17, device=DEVICE), g.detach(), u.detach(), 2, backend))
    x = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    wgu = torch.randn(34, 16, device=DEVICE, requires_grad=True)
    bgu = torch.randn(34, device=DEVICE, requires_grad=True)
    wd = torch.randn(12, 17, device=DEVICE, requires_grad=True)
    bd = torch.randn(12, device=DEVICE, requires_grad=True)
    torch.library.opcheck(glu_ffn_fwd, (x, wgu, bgu, wd, bd, 0, backend))
    torch.library.opcheck(glu_ffn_fwd, (x, wgu, None, wd, None, 3, backend))
    pre = torch.randn(6, 34, device=DEVICE)
    torch.library.opcheck(glu_ffn_bwd, (torch.randn(6, 12, device=DEVICE), x.detach(), pre, wgu.detach(),
                                        wd.detach(), 0, True, True, backend))


def test_torch_compile_fullgraph_module():
    ffn = GLUFeedForward(32, 48, activation="silu", bias=True).to(DEVICE)

    def f(x):
        return ffn(x).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.backward()
    grads = [p.grad.clone() for p in ffn.parameters()]
    ffn.zero_grad()
    x2 = x.detach().clone().requires_grad_()
    want = f(x2)
    want.backward()
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(x.grad, x2.grad)
    for a, p in zip(grads, ffn.parameters()):
        torch.testing.assert_close(a, p.grad)


# --------------------------------------------------------------------------- memory story
def _saved_activation_bytes(fn, params):
    """Bytes of the distinct non-parameter storages autograd saves for backward while ``fn`` runs."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in param_ptrs:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_saves_only_x_and_preactivation(backend):
    skip_unless_backend(backend)
    T, H, inter = 64, 32, 48
    x = torch.randn(T, H, device=DEVICE, requires_grad=True)
    wgu = torch.randn(2 * inter, H, device=DEVICE, requires_grad=True)
    wd = torch.randn(H, inter, device=DEVICE, requires_grad=True)
    params = [x, wgu, wd]  # x counted separately below
    mine, out = _saved_activation_bytes(lambda: glu_ffn(x, wgu, wd, backend=backend), params)
    eager, out_ref = _saved_activation_bytes(lambda: glu_ffn_reference(x, wgu, wd), params)
    elt = x.element_size()
    # pyattn saves the (T, 2I) pre-activation (x and the weights are the caller's tensors)
    assert mine == T * 2 * inter * elt
    # eager LlamaMLP saves gate (for silu), act(gate) and up (for the product) and h (for down_proj)
    assert eager >= T * 4 * inter * elt
    assert mine <= eager // 2
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    # and backward still works from what was saved
    out.sum().backward()
    assert x.grad is not None and wgu.grad is not None and wd.grad is not None


# ------------------------------------------------------------------------------- module
class _EagerLlamaMLP(torch.nn.Module):
    """The LlamaMLP of Hugging Face transformers, written out (used when transformers is absent)."""

    def __init__(self, hidden, inter, bias=False):
        super().__init__()
        self.gate_proj = torch.nn.Linear(hidden, inter, bias=bias)
        self.up_proj = torch.nn.Linear(hidden, inter, bias=bias)
        self.down_proj = torch.nn.Linear(inter, hidden, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _llama_mlp(hidden, inter, bias):
    try:
        from transformers.models.llama.configuration_llama import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP
    except Exception:
        return _EagerLlamaMLP(hidden, inter, bias)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, hidden_act="silu", mlp_bias=bias)
    return LlamaMLP(cfg)


@pytest.mark.parametrize("bias", [False, True])
def test_module_loads_llama_mlp(bias):
    mlp = _llama_mlp(32, 40, bias).to(DEVICE)
    x = torch.randn(2, 7, 32, device=DEVICE)
    ffn = GLUFeedForward.from_llama_mlp(mlp)
    assert ffn.activation == "silu" and (ffn.gate_up_bias is not None) == bias
    torch.testing.assert_close(ffn(x), mlp(x), rtol=1e-5, atol=1e-5)
    ffn2 = GLUFeedForward(32, 40, bias=bias).to(DEVICE)
    ffn2.load_llama_mlp_state_dict(mlp.state_dict())
    torch.testing.assert_close(ffn2(x), mlp(x), rtol=1e-5, atol=1e-5)
    # prefixed checkpoint keys
    sd = {f"model.layers.0.mlp.{k}": v for k, v in mlp.state_dict().items()}
    ffn2.load_llama_mlp_state_dict(sd, prefix="model.layers.0.mlp.")
    torch.testing.assert_close(ffn2(x), mlp(x), rtol=1e-5, atol=1e-5)


def test_module_repr_state_dict_and_errors():
    m = GLUFeedForward(16, 24, activation="gelu")
    assert "hidden_size=16, intermediate_size=24, activation='gelu', bias=False" in repr(m)
    assert list(m.state_dict()) == ["gate_up_proj", "down_proj"]
    assert m.gate_up_proj.shape == (48, 16) and m.down_proj.shape == (16, 24)
    assert list(GLUFeedForward(4, 4, bias=True).state_dict()) == ["gate_up_proj", "down_proj", "gate_up_bias",
                                                                   "down_bias"]
    with pytest.raises(ValueError, match="activation must be one of"):
        GLUFeedForward(4, 4, activation="tanh")
    with pytest.raises(KeyError, match="up_proj.weight"):
        m.load_llama_mlp_state_dict({"gate_proj.weight": torch.ones(24, 16)})
    with pytest.raises(ValueError, match="bias mismatch"):
        m.load_llama_mlp_state_dict(_EagerLlamaMLP(16, 24, bias=True).state_dict())


# -------------------------------------------------------------------------------- errors
def _ffn_args(**kw):
    args = dict(x=torch.ones(3, 8), w_gate_up=torch.ones(10, 8), w_down=torch.ones(8, 5), activation="silu",
                bias_gate_up=None, bias_down=None, backend=None)
    args.update(kw)
    return args


@pytest.mark.parametrize("bad,exc,match", [
    (dict(w_gate_up=torch.ones(10, 7)), ValueError, "hidden sizes do not match"),
    (dict(w_gate_up=torch.ones(9, 8)), ValueError, "even, non-zero first dim"),
    (dict(w_down=torch.ones(8, 4)), ValueError, r"w_down must have shape \(hidden_out, 5\)"),
    (dict(activation="swish"), ValueError, "activation must be one of"),
    (dict(activation=0), TypeError, "activation must be a string"),
    (dict(x=torch.ones(3, 8, dtype=torch.int64)), TypeError, "x must have dtype"),
    (dict(w_down=torch.ones(8, 5, dtype=torch.float16)), TypeError, "w_down has dtype float16 but x has float32"),
    (dict(w_gate_up=torch.ones(10, 8, device="meta")), ValueError, "w_gate_up is on meta"),
    (dict(w_gate_up=torch.ones(10, 8, 1)), ValueError, "w_gate_up must be 2-D"),
    (dict(bias_gate_up=torch.ones(5)), ValueError, r"bias_gate_up must have shape \(10,\)"),
    (dict(bias_down=torch.ones(8, dtype=torch.bfloat16)), TypeError, "bias_down has dtype"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(x="x"), TypeError, "x must be a torch.Tensor"),
])
def test_ffn_bad_input(bad, exc, match):
    a = _ffn_args(**bad)
    with pytest.raises(exc, match=match):
        glu_ffn(a["x"], a["w_gate_up"], a["w_down"], activation=a["activation"], bias_gate_up=a["bias_gate_up"],
                bias_down=a["bias_down"], backend=a["backend"])


@pytest.mark.parametrize("gate,up,activation,exc,match", [
    (torch.ones(3, 4), torch.ones(3, 5), "silu", ValueError, r"up must have shape \(3, 4\)"),
    (torch.ones(3, 4), torch.ones(3, 4, dtype=torch.float16), "silu", TypeError, "up has dtype float16"),
    (torch.ones(3, 4), torch.ones(3, 4), "mish", ValueError, "activation must be one of"),
    (torch.ones(3, 4, dtype=torch.int32), torch.ones(3, 4, dtype=torch.int32), "silu", TypeError,
     "gate must have dtype"),
    (torch.ones(3, 4), torch.ones(3, 4, device="meta"), "silu", ValueError, "up is on meta"),
    (torch.ones(()), torch.ones(()), "silu", ValueError, "gate must have at least 1 dims"),
])
def test_glu_bad_input(gate, up, activation, exc, match):
    with pytest.raises(exc, match=match):
        glu(gate, up, activation)


def test_float64_only_on_reference():
    x = torch.randn(2, 4, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    wd = torch.randn(4, 3, dtype=torch.float64)
    out = glu_ffn(x, w, wd, backend="reference")
    torch.testing.assert_close(out, glu_ffn_reference(x, w, wd))
    from pyattn import BackendUnavailableError
    with pytest.raises(BackendUnavailableError, match="float64 is supported by the reference backend only"):
        glu_ffn(x, w, wd, backend="cpu")
