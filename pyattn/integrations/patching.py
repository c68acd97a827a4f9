"""``pyattn.patch(model)`` / ``pyattn.unpatch(model)``: swap pyattn modules into a model instance.

One small registry keyed on the class *name* of a submodule (so transformers need not be
imported) says what replaces it:

* Llama-style RMSNorm (``LlamaRMSNorm``, ``MistralRMSNorm``, ``Qwen2RMSNorm``, ...) ->
  :class:`PatchedRMSNorm`, a :class:`pyattn.nn.RMSNorm` holding the *same* ``weight`` Parameter
  and eps.
* Llama-style gated MLP (``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``, ...; ``down(act(gate(x)) *
  up(x))``) -> :class:`PatchedGLUMLP`, which keeps the *same* ``gate_proj`` / ``up_proj`` /
  ``down_proj`` Linear modules and fuses ``act(gate) * up`` with ``pyattn.ops.glu.glu``. The
  fused ``glu_ffn`` would need one concatenated gate/up weight, which cannot share storage with
  two separate Parameters; keeping the Linears keeps parameters, state-dict keys, optimizers and
  ``unpatch`` exact.

Parameter names are unchanged (``model.layers.0.mlp.gate_proj.weight`` stays), so a patched
model saves, loads and trains as before. The original module is kept (outside the module tree)
on its replacement, and :func:`unpatch` puts it back, re-linking the current Parameters, so
outputs after ``unpatch`` are bit-identical to those before ``patch``.

Plain PyTorch equivalent of what gets replaced::

    LlamaRMSNorm:  w * (x.float() * rsqrt(mean(x.float()**2, -1) + eps)).to(x.dtype)
    LlamaMLP:      down_proj(act(gate_proj(x)) * up_proj(x))
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..nn.rms_norm import RMSNorm

_ORIGINAL = "_pyattn_original"
_PREV_ATTN = "_pyattn_previous_attn_implementation"


class PatchUnavailable(Exception):
    """Raised by a patch factory when this module instance cannot be replaced (the reason is reported)."""


# --------------------------------------------------------------------------------------------
# replacement modules
# --------------------------------------------------------------------------------------------

class PatchedRMSNorm(RMSNorm):
    """A :class:`pyattn.nn.RMSNorm` sharing the weight Parameter of a Hugging Face RMSNorm.

    Output dtype follows the original (``weight * x.to(input_dtype)``): the promotion of the input
    and weight dtypes (an fp32 weight on bf16 activations gives fp32, as in transformers).
    """

    def __init__(self, weight: nn.Parameter, eps: float):
        nn.Module.__init__(self)
        self.hidden_size = weight.shape[0]
        self.eps = float(eps)
        self.backend = None
        self.weight = weight

    @classmethod
    def from_hf(cls, module: nn.Module) -> "PatchedRMSNorm":
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
            raise PatchUnavailable("no 1-D `weight` Parameter")
        eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
        if eps is None:
            raise PatchUnavailable("no `variance_epsilon` / `eps` attribute")
        return cls(weight, eps)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None):
        out_dtype = torch.promote_types(x.dtype, self.weight.dtype)
        y = super().forward(x, residual)
        if out_dtype == x.dtype:
            return y
        if residual is not None:
            return y[0].to(out_dtype), y[1]
        return y.to(out_dtype)


def _activation_name(module: nn.Module) -> str:
    """pyattn GLU activation name of an HF MLP (from config.hidden_act, else the act_fn class)."""
    act = None
    config = getattr(module, "config", None)
    for attr in ("hidden_act", "hidden_activation"):
        if config is not None and isinstance(getattr(config, attr, None), str):
            act = getattr(config, attr)
            break
    fn = getattr(module, "act_fn", None)
    cls_name = type(fn).__name__ if fn is not None else ""
    table = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
             "gelu_new": "gelu_tanh", "gelu_fast": None, "relu": "relu"}
    if act is not None:
        name = table.get(act)
        if name is None:
            raise PatchUnavailable(f"activation {act!r} has no pyattn GLU equivalent")
        return name
    by_class = {"SiLU": "silu", "SiLUActivation": "silu", "GELUActivation": "gelu", "GELU": "gelu",
                "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh", "NewGELUActivation": "gelu_tanh",
                "ReLU": "relu"}
    if cls_name in by_class:
        if cls_name == "GELU" and getattr(fn, "approximate", "none") == "tanh":
            return "gelu_tanh"
        return by_class[cls_name]
    raise PatchUnavailable(f"cannot tell the activation of act_fn {cls_name or None!r}")


_GLU = []


def _glu_op():
    if not _GLU:
        try:
            from ..ops.glu import glu
        except ImportError as exc:
            raise PatchUnavailable(f"pyattn.ops.glu is not available ({exc})") from None
        _GLU.append(glu)
    return _GLU[0]


class PatchedGLUMLP(nn.Module):
    """Llama-style gated MLP on the original Linear modules: ``down_proj(glu(gate_proj(x), up_proj(x)))``.

    x (..., hidden) -> (..., hidden). ``glu(g, u, act) = act(g) * u`` is one fused pyattn op.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear, activation: str):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj
        self.activation = activation

    @classmethod
    def from_hf(cls, module: nn.Module) -> "PatchedGLUMLP":
        linears = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        if not all(isinstance(m, nn.Linear) for m in linears):
            raise PatchUnavailable("needs nn.Linear gate_proj, up_proj and down_proj")
        activation = _activation_name(module)
        _glu_op()
        return cls(*linears, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        glu = _glu_op()
        return self.down_proj(glu(self.gate_proj(x), self.up_proj(x), self.activation))

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}"


# --------------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchRule:
    kind: str  # "rms_norm" or "mlp"
    make: Callable[[nn.Module], nn.Module]  # may raise PatchUnavailable
    relink: Tuple[str, ...]  # attributes to hand back to the original on unpatch


_REGISTRY: Dict[str, PatchRule] = {}

#: Hugging Face RMSNorm classes whose forward is exactly LlamaRMSNorm's.
LLAMA_STYLE_RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm",
                         "Qwen3RMSNorm", "Qwen3MoeRMSNorm", "Phi3RMSNorm")
#: Hugging Face MLP classes whose forward is exactly LlamaMLP's.
LLAMA_STYLE_MLPS = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


def register_patch(class_names: Iterable[str], kind: str, make: Callable[[nn.Module], nn.Module],
                   relink: Tuple[str, ...] = ()) -> None:
    """Register ``make(module) -> replacement`` for submodules whose class name is in ``class_names``.

    ``relink`` names the attributes (Parameters or submodules) the replacement shares with the
    original; :func:`unpatch` hands their current values back to the original module.
    """
    if isinstance(class_names, str):
        class_names = (class_names,)
    for name in class_names:
        _REGISTRY[name] = PatchRule(kind, make, tuple(relink))


def registered_patches() -> Dict[str, str]:
    """class name -> kind ("rms_norm" / "mlp") of every registered rule."""
    return {name: rule.kind for name, rule in _REGISTRY.items()}


register_patch(LLAMA_STYLE_RMS_NORMS, "rms_norm", PatchedRMSNorm.from_hf, relink=("weight",))
register_patch(LLAMA_STYLE_MLPS, "mlp", PatchedGLUMLP.from_hf, relink=("gate_proj", "up_proj", "down_proj"))


# --------------------------------------------------------------------------------------------
# patch / unpatch
# --------------------------------------------------------------------------------------------

@dataclass
class PatchReport:
    """What :func:`patch` did: ``replaced`` and ``skipped`` are (module name, class name, detail)."""

    replaced: List[Tuple[str, str, str]] = field(default_factory=list)
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)
    attention: Optional[str] = None  # "old -> pyattn" when the attention implementation was switched

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for _, cls, new in self.replaced:
            key = f"{cls} -> {new}"
            out[key] = out.get(key, 0) + 1
        return out

    def __len__(self) -> int:
        return len(self.replaced)

    def __str__(self) -> str:
        lines = [f"pyattn.patch: replaced {len(self.replaced)} module(s)"]
        lines += [f"  {n} x {k}" for k, n in self.counts().items()]
        if self.attention:
            lines.append(f"  attention implementation: {self.attention}")
        skipped: Dict[str, int] = {}
        for _, cls, why in self.skipped:
            skipped[f"{cls}: {why}"] = skipped.get(f"{cls}: {why}", 0) + 1
        lines += [f"  skipped {n} x {k}" for k, n in skipped.items()]
        return "\n".join(lines)


def _parent(model: nn.Module, name: str) -> Tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    parent, child = name.rsplit(".", 1)
    return model.get_submodule(parent), child


def _set_attn_implementation(model: nn.Module, impl: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:
        model.config._attn_implementation = impl


def patch(model: nn.Module, *, rms_norm: bool = True, mlp: bool = True, attention: bool = False) -> PatchReport:
    """Replace registered submodules of ``model`` (in place) by pyattn modules sharing their parameters.

    Args:
        model: any ``nn.Module`` (typically a transformers model instance).
        rms_norm, mlp: which kinds of registered rules to apply.
        attention: also switch a transformers model to ``attn_implementation="pyattn"``
            (restored by :func:`unpatch`).

    Returns:
        a :class:`PatchReport` (``print`` it for a summary). Patching twice is a no-op.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    kinds = {k for k, on in (("rms_norm", rms_norm), ("mlp", mlp)) if on}
    report = PatchReport()
    targets = []
    for name, module in model.named_modules():
        if name and _ORIGINAL not in module.__dict__:
            rule = _REGISTRY.get(type(module).__name__)
            if rule is not None and rule.kind in kinds:
                targets.append((name, module, rule))
    for name, module, rule in targets:
        if any(name.startswith(t + ".") for t, *_ in report.replaced):
            continue  # inside a module already replaced
        try:
            new = rule.make(module)
        except PatchUnavailable as exc:
            report.skipped.append((name, type(module).__name__, str(exc)))
            continue
        new.train(module.training)
        new.__dict__[_ORIGINAL] = (module, rule.relink)
        parent, child = _parent(model, name)
        setattr(parent, child, new)
        report.replaced.append((name, type(module).__name__, type(new).__name__))
    if attention:
        from . import transformers as _hf  # registers "pyattn"

        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("patch(model, attention=True) needs a transformers model (no `config`)")
        previous = config._attn_implementation
        if previous != _hf.IMPLEMENTATION_NAME:
            _set_attn_implementation(model, _hf.IMPLEMENTATION_NAME)
            model.__dict__.setdefault(_PREV_ATTN, previous)
        report.attention = f"{previous} -> {_hf.IMPLEMENTATION_NAME}"
    return report


def is_patched(model: nn.Module) -> bool:
    return _PREV_ATTN in model.__dict__ or any(_ORIGINAL in m.__dict__ for m in model.modules())


def unpatch(model: nn.Module) -> List[str]:
    """Undo :func:`patch`: put the original modules back (re-linked to the current Parameters) and
    restore the previous attention implementation. Returns the names of the restored modules."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    restored = []
    for name, module in list(model.named_modules()):
        entry = module.__dict__.get(_ORIGINAL)
        if not name or entry is None:
            continue
        original, relink = entry
        for attr in relink:
            setattr(original, attr, getattr(module, attr))
        original.train(module.training)
        parent, child = _parent(model, name)
        setattr(parent, child, original)
        del module.__dict__[_ORIGINAL]
        restored.append(name)
    if _PREV_ATTN in model.__dict__:
        _set_attn_implementation(model, model.__dict__.pop(_PREV_ATTN))
    return restored


__all__ = ["patch", "unpatch", "is_patched", "PatchReport", "PatchedRMSNorm", "PatchedGLUMLP", "register_patch",
           "registered_patches", "PatchUnavailable", "LLAMA_STYLE_RMS_NORMS", "LLAMA_STYLE_MLPS"]
