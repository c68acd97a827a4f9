import pytest
import torch

import pyattn
from pyattn.reference.rms_norm import rms_norm_reference
from helpers import DEVICE, DTYPES, assert_tolerance, backends_for_device, skip_unless_backend, strided_like

BACKENDS = backends_for_device()
SHAPES = [(1, 1), (3, 17), (2, 5, 96), (4, 1000), (0, 64), (2, 8200)]


def _ref(x, w, eps, residual, dtype):
    """Reference outputs (y, h) computed from copies cast to ``dtype``, with autograd leaves."""
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, w, residual)]
    y, h, _ = rms_norm_reference(leaves[0], leaves[1], eps, leaves[2])
    return y, h, leaves


def _run_case(backend, shape, dtype, with_weight=True, with_residual=False, strided=False, eps=1e-6):
    skip_unless_backend(backend)
    x = torch.randn(shape, device=DEVICE).to(dtype)
    w = (1 + 0.5 * torch.randn(shape[-1], device=DEVICE)).to(dtype) if with_weight else None
    r = torch.randn(shape, device=DEVICE).to(dtype) if with_residual else None
    if strided:
        x = strided_like(x)
    x_before = x.clone()
    xl = x.detach().clone().requires_grad_()
    wl = w.detach().clone().requires_grad_() if w is not None else None
    rl = r.detach().clone().requires_grad_() if r is not None else None
    out = pyattn.rms_norm(xl, wl, eps, residual=rl, backend=backend)
    y, h = out if with_residual else (out, None)
    assert y.dtype == dtype and y.shape == x.shape
    assert torch.equal(x, x_before), "input modified in place"

    y64, h64, leaves64 = _ref(x, w, eps, r, torch.float64)
    ylo, hlo, leaves_lo = _ref(x, w, eps, r, dtype)
    assert_tolerance("y", y, ylo, y64)
    if with_residual:
        assert_tolerance("h", h, hlo, h64)

    gy = torch.randn_like(y)
    gh = torch.randn_like(y) if with_residual else None
    outs = [y] + ([h] if with_residual else [])
    grads = [gy] + ([gh] if with_residual else [])
    if y.numel() == 0:
        return
    torch.autograd.backward(outs, grads)
    for outs_ref, leaves in (([y64, h64], leaves64), ([ylo, hlo], leaves_lo)):
        torch.autograd.backward(outs_ref[: len(outs)], [g.to(outs_ref[0].dtype) for g in grads])
    names = ["dx", "dweight", "dresidual"]
    for i, mine in enumerate((xl, wl, rl)):
        if mine is None:
            continue
        assert_tolerance(names[i], mine.grad, leaves_lo[i].grad, leaves64[i].grad, factor=3.0, floor=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_backward(backend, dtype, shape):
    _run_case(backend, shape, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_residual(backend, dtype):
    _run_case(backend, (3, 7, 130), dtype, with_residual=True)


@pytest.mark.parametrize("with_weight", [True, False])
def test_large_fp32_output_cpu(with_weight):
    # outputs of 8 MiB and more take the cpu backend's huge-page, streaming-store path
    _run_case("cpu", (2048, 1024), torch.float32, with_weight=with_weight, with_residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_wide_rows_and_no_weight(backend):
    _run_case(backend, (3, 9000), torch.float32, with_weight=False, with_residual=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_input(backend, dtype):
    _run_case(backend, (4, 6, 64), dtype, strided=True, with_residual=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_view(backend):
    skip_unless_backend(backend)
    base = torch.randn(64, 12, device=DEVICE)
    x = base.t()  # (12, 64) with column stride 12: not contiguous
    w = torch.randn(64, device=DEVICE)
    y = pyattn.rms_norm(x, w, backend=backend)
    torch.testing.assert_close(y, rms_norm_reference(x, w)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_weight_with_bf16_activations(backend):
    skip_unless_backend(backend)
    x = torch.randn(5, 48, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(48, device=DEVICE, requires_grad=True)
    y = pyattn.rms_norm(x, w, backend=backend)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_grad_deterministic(backend):
    skip_unless_backend(backend)
    x = torch.randn(300, 256, device=DEVICE)
    g = torch.randn(300, 256, device=DEVICE)
    grads = []
    for _ in range(2):
        w = torch.randn(256, device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1)).requires_grad_()
        pyattn.rms_norm(x, w, backend=backend).backward(g)
        grads.append(w.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    skip_unless_backend(backend)
    from pyattn.ops.rms_norm import rms_norm_fwd

    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    torch.library.opcheck(rms_norm_fwd, (x, w, r, 1e-6, backend))
    torch.library.opcheck(rms_norm_fwd, (x, None, None, 1e-5, backend))


def test_torch_compile_fullgraph():
    norm = pyattn.nn.RMSNorm(32).to(DEVICE)
    lin = torch.nn.Linear(32, 32).to(DEVICE)

    def f(x):
        return norm(lin(x)).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    out = compiled(x)
    out.backward()
    x2 = x.detach().clone().requires_grad_()
    f(x2).backward()
    torch.testing.assert_close(out, f(x2.detach()))
    torch.testing.assert_close(x.grad, x2.grad)


def test_module_repr_and_state_dict():
    m = pyattn.nn.RMSNorm(16, eps=1e-5)
    assert "16, eps=1e-05" in repr(m)
    assert list(m.state_dict()) == ["weight"]
    assert pyattn.nn.RMSNorm(8, elementwise_affine=False).weight is None


@pytest.mark.parametrize("bad,exc,match", [
    (dict(x=torch.ones(3, 4, dtype=torch.int32)), TypeError, "x must have dtype"),
    (dict(weight=torch.ones(5)), ValueError, "weight must have shape"),
    (dict(weight=torch.ones(4, device="meta")), ValueError, "weight is on meta"),
    (dict(eps=0.0), ValueError, "eps must be > 0"),
    (dict(eps=-1.0), ValueError, "eps must be > 0"),
    (dict(residual=torch.ones(3, 5)), ValueError, "residual must have shape"),
    (dict(residual=torch.ones(3, 4, dtype=torch.float16)), TypeError, "residual has dtype"),
    (dict(backend="gpu"), ValueError, "backend must be one of"),
    (dict(x="not a tensor"), TypeError, "x must be a torch.Tensor"),
    (dict(x=torch.ones(2, 70000), weight=None), ValueError, "hidden size"),
])
def test_bad_input(bad, exc, match):
    args = dict(x=torch.ones(3, 4), weight=torch.ones(4), eps=1e-6, residual=None, backend=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        pyattn.rms_norm(args["x"], args["weight"], args["eps"], residual=args["residual"], backend=args["backend"])
