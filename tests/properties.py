"""Shared machinery of the property tests (tests/test_properties_*.py).

An ``Arg`` is one tensor argument of an op: fp32 base values plus a memory layout. The op under
test gets the values in the layout drawn by hypothesis (permuted dims, a step in one dim, a
misaligned storage offset, a stride-0 expanded dim, or plain contiguous); the references get the
same values contiguous. Every available kernel backend is compared with the ``reference`` backend
in fp64 under the tolerance rule (error <= 2x the error of the reference backend run in the same
low dtype, 3x for gradients), forward and backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

import pyattn
from helpers import assert_tolerance, cpu_backends

LAYOUTS = ("contiguous", "permuted", "step", "offset", "expanded")
FLOAT16 = (torch.float16, torch.bfloat16)


def property_settings(max_examples: int):
    """Bounded, deterministic hypothesis settings for CI."""
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck), print_blob=False)


def kernel_backends(family: str) -> List[str]:
    """Kernel backends (not the reference) that can run ``family`` on CPU tensors here."""
    status = pyattn.backend_status(family, "cpu")
    return [b for b in cpu_backends() if b != "reference" and status.get(b) is None]


@dataclass
class Arg:
    """One tensor argument: logical ``shape``, fp32 ``values`` and a layout.

    For ``expanded`` the values have size 1 in ``dim`` and the op sees ``values.expand(shape)``
    (the gradient lands on the size-1 leaf, as it would on a user's broadcast parameter)."""
    values: Tensor
    shape: tuple
    layout: str = "contiguous"
    dim: int = 0
    perm: tuple = ()
    grad: bool = True

    def build(self, dtype: torch.dtype, strided: bool):
        v = self.values.to(dtype)
        lay = self.layout if strided else ("expanded" if self.layout == "expanded" else "contiguous")
        if lay == "permuted":
            buf = torch.empty([v.shape[p] for p in self.perm], dtype=dtype)
            inv = sorted(range(len(self.perm)), key=lambda i: self.perm[i])
            t = buf.permute(*inv)
            t.copy_(v)
        elif lay == "step":
            wide = list(v.shape)
            wide[self.dim] = 2 * wide[self.dim]
            idx = [slice(None)] * v.dim()
            idx[self.dim] = slice(None, None, 2)
            t = torch.empty(wide, dtype=dtype)[tuple(idx)]
            t.copy_(v)
        elif lay == "offset":  # storage offset of one element: the data pointer is misaligned
            t = torch.empty(v.numel() + 1, dtype=dtype)[1:].view(v.shape)
            t.copy_(v)
        else:
            t = v.clone()
        leaf = t.detach().requires_grad_(self.grad)
        arg = leaf.expand(self.shape) if self.layout == "expanded" else leaf
        return leaf, arg


@st.composite
def args(draw, shape: Sequence[int], *, grad: bool = True, layouts: Sequence[str] = LAYOUTS,
         scale: float = 1.0, offset: float = 0.0) -> Arg:
    """An Arg of ``shape`` with a drawn layout and seeded random values."""
    shape = tuple(shape)
    seed = draw(st.integers(0, 2**16))
    lay = draw(st.sampled_from(list(layouts)))
    dims = [d for d in range(len(shape)) if shape[d] > 1]
    dim, perm = 0, tuple(range(len(shape)))
    if lay == "expanded":
        if not dims:
            lay = "contiguous"
        else:
            dim = draw(st.sampled_from(dims))
    elif lay == "step":
        if not shape:
            lay = "contiguous"
        else:
            dim = draw(st.integers(0, len(shape) - 1))
    elif lay == "permuted":
        perm = tuple(draw(st.permutations(range(len(shape)))))
    base = list(shape)
    if lay == "expanded":
        base[dim] = 1
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(base, generator=g) * scale + offset
    return Arg(values, shape, lay, dim, perm, grad)


def check_backends(family: str, fn: Callable, tensor_args: Sequence[Arg], dtype: torch.dtype, *,
                   grad: bool = True, n_grad_outputs: int = 1, fwd_floor: float = 1e-5,
                   bwd_floor: float = 1e-4, backends: Optional[Sequence[str]] = None) -> None:
    """Run ``fn(backend, *tensors) -> tuple of outputs`` on every kernel backend with the drawn
    layouts and compare outputs and leaf gradients with the fp64 reference (tolerance rule)."""
    backends = kernel_backends(family) if backends is None else backends
    assert backends, f"no kernel backend available for {family}"

    def run(backend, dt, strided, with_grad):
        leaves, call = [], []
        for a in tensor_args:
            a = Arg(a.values, a.shape, a.layout, a.dim, a.perm, a.grad and with_grad)
            leaf, arg = a.build(dt, strided)
            leaves.append(leaf)
            call.append(arg)
        before = [c.detach().clone() for c in call]
        outs = fn(backend, *call)
        outs = outs if isinstance(outs, tuple) else (outs,)
        for i, (b, c) in enumerate(zip(before, call)):
            assert torch.equal(b, c.detach()) or (b.isnan() == c.detach().isnan()).all(), \
                f"{backend}: argument {i} modified in place"
        return leaves, outs

    ref64 = run("reference", torch.float64, False, grad)
    reflo = run("reference", dtype, False, grad)
    cots = [torch.randn(o.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
            for i, o in enumerate(ref64[1][:n_grad_outputs])]
    do_grad = grad and any(a.grad for a in tensor_args) and all(o.numel() > 0 for o in ref64[1][:n_grad_outputs])
    if do_grad:
        for _, outs in (ref64, reflo):
            torch.autograd.backward(list(outs[:n_grad_outputs]), [c.to(outs[0].dtype) for c in cots])
    for backend in backends:
        leaves, outs = run(backend, dtype, True, grad)
        assert len(outs) == len(ref64[1])
        for i, (o, o64, olo) in enumerate(zip(outs, ref64[1], reflo[1])):
            assert o.dtype == olo.dtype, f"{backend} output {i}: dtype {o.dtype} != {olo.dtype}"
            if o.dtype.is_floating_point:
                # non-finite reference entries (an lse of -inf for a row that sees no key) must match
                # exactly; the rest follows the tolerance rule
                special = ~torch.isfinite(o64)
                if special.any():
                    assert torch.equal(o[special].double(), o64[special]), \
                        f"{backend} output {i}: non-finite entries differ from the reference"
                    o, olo, o64 = (t.masked_fill(special, 0) for t in (o, olo.to(o.dtype), o64))
                assert_tolerance(f"{backend} output {i}", o, olo, o64, floor=fwd_floor)
            else:
                assert torch.equal(o, olo), f"{backend} output {i} differs"
        if not do_grad:
            continue
        torch.autograd.backward(list(outs[:n_grad_outputs]), [c.to(outs[0].dtype) for c in cots])
        for i, (a, l, l64, llo) in enumerate(zip(tensor_args, leaves, ref64[0], reflo[0])):
            if not a.grad:
                continue
            assert l.grad is not None, f"{backend}: no gradient for argument {i}"
            assert l.grad.shape == l.shape, f"{backend}: gradient {i} shape {tuple(l.grad.shape)} != {tuple(l.shape)}"
            assert_tolerance(f"{backend} grad {i}", l.grad, llo.grad, l64.grad, factor=3.0, floor=bwd_floor)

