"""Record the Triton launches of pyattn's Python code without a GPU, specialised as the launcher would.

Inside :func:`capture`, every ``@triton.jit`` kernel of the given ``pyattn.kernels`` modules
records its launches instead of running; the public API (``pyattn.attention(..., backend="triton")``
on CPU tensors, its backward, ``pyattn.rms_norm``, ...) then drives the real launch code: the
config tables, flags and arguments of a GPU call. :func:`specialise` turns a recorded launch into
what ``JITFunction.run`` hands to ``triton.compile``: the same binder (``native_specialize_impl``:
``tt.divisibility=16`` on 16-byte-aligned pointers and on integers that are multiples of 16,
integers equal to 1 as constants, 32/64-bit integer types by value) and the same
``JITFunction._pack_args``, for a chosen ``GPUTarget``. The kernel that is compiled is therefore the
kernel that runs, not a hand-written approximation of its signature.

Kernel outputs inside :func:`capture` are left uninitialised (nothing runs): use it for launch
parameters only. Requires TRITON_INTERPRET unset (the interpreter replaces the JIT functions).
"""
from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import torch


@dataclass
class Launch:
    """One recorded kernel launch: the kernel, its positional and keyword arguments."""
    fn: Any
    args: tuple
    kwargs: dict
    grid: Any
    case: str = ""


@dataclass
class Specialised:
    """What ``triton.compile`` receives for a launch on ``cc``: see :func:`specialise`."""
    fn: Any
    cc: int
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], list]
    options: Dict[str, Any]
    cases: List[str] = field(default_factory=list)

    @property
    def kernel(self) -> str:
        return self.fn.fn.__name__

    def key(self) -> tuple:
        """Identity of the compiled binary (duplicates across cases compile once)."""
        ce = tuple(sorted((k, repr(v)) for k, v in self.constexprs.items()))
        at = tuple(sorted((k, repr(v)) for k, v in self.attrs.items()))
        opts = (self.options.get("num_warps"), self.options.get("num_stages"), self.options.get("num_ctas"))
        return (self.fn.fn.__module__, self.kernel, self.cc, tuple(self.signature.items()), ce, at, opts)

    def constexpr_values(self) -> Dict[str, Any]:
        names = self.fn.arg_names
        return {names[path[0]]: value for path, value in self.constexprs.items() if len(path) == 1}


def _jit_functions(module):
    from triton.runtime.jit import JITFunction

    return [obj for obj in vars(module).values() if isinstance(obj, JITFunction)]


@contextlib.contextmanager
def capture(families, case: List[str]):
    """Record launches of the kernels in ``pyattn.kernels.<family>`` for each family.

    Yields the list the launches are appended to; ``case[0]`` names the running case (set it
    before each call). The dispatcher's "CPU tensors need the interpreter" check is lifted so that
    ``backend="triton"`` accepts CPU tensors; everything else of the public API runs as is.
    """
    import os

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("launch capture needs TRITON_INTERPRET unset (the interpreter replaces the kernels)")
    from .. import _dispatch

    launches: List[Launch] = []
    patched = []
    for family in families:
        module = importlib.import_module(f"pyattn.kernels.{family}")
        for fn in _jit_functions(module):
            if any(fn is p for p in patched):  # helpers such as _common.to_dtype appear in several modules
                continue

            def run(*args, grid, warmup, _fn=fn, **kwargs):
                launches.append(Launch(_fn, args, dict(kwargs), grid, case[0]))
            fn.run = run  # instance attribute: JITFunction.__getitem__ calls self.run
            patched.append(fn)
    original = _dispatch.triton_unavailable_reason

    def triton_reason(device, family):
        if device.type == "cpu":
            return None
        return original(device, family)

    _dispatch.triton_unavailable_reason = triton_reason
    try:
        yield launches
    finally:
        _dispatch.triton_unavailable_reason = original
        for fn in patched:
            del fn.run


def specialise(launch: Launch, cc: int) -> Specialised:
    """The (signature, constexprs, attrs, options) that ``JITFunction.run`` would compile for this
    launch on a ``cc`` GPU (Triton 3.6's binder and argument packing, unchanged)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", cc, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(launch.kwargs)
    # as JITFunction.run does before binding
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return Specialised(fn, cc, dict(signature), dict(constexprs), dict(attrs), dict(options.__dict__),
                       [launch.case])


def unique(specs: List[Specialised]) -> List[Specialised]:
    """Merge specialisations that compile to the same binary, keeping every case name."""
    seen: Dict[tuple, Specialised] = {}
    for s in specs:
        k = s.key()
        if k in seen:
            seen[k].cases.extend(c for c in s.cases if c not in seen[k].cases)
        else:
            seen[k] = s
    return list(seen.values())


def tensors_aligned(launch: Launch) -> bool:
    """All tensor arguments 16-byte aligned (the GPU case the check stands for)."""
    return all(a.data_ptr() % 16 == 0 for a in launch.args if isinstance(a, torch.Tensor))
