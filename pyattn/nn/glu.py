from __future__ import annotations

import math
from typing import Dict, Mapping, Optional

import torch
from torch import nn

from ..ops.glu import glu_ffn
from ..reference.glu import ACTIVATIONS

# Hugging Face ``config.hidden_act`` names -> pyattn activation names
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "relu": "relu", "sigmoid": "sigmoid"}


class GLUFeedForward(nn.Module):
    """GLU feed-forward (SwiGLU / GeGLU / ReGLU): x (..., hidden_size) -> (..., hidden_size).

    ``out = down_proj(act(x @ Wg.T) * (x @ Wu.T))`` with the gate and up weights stacked in one
    parameter so a single GEMM produces both.

    Parameters:
        gate_up_proj: (2 * intermediate_size, hidden_size) = [gate rows; up rows]
        down_proj: (hidden_size, intermediate_size)
        gate_up_bias: (2 * intermediate_size,), down_bias: (hidden_size,)  (only with ``bias=True``)

    Loading a Hugging Face ``LlamaMLP`` (also Mistral/Qwen2/Gemma MLPs with the same names)::

        gate_up_proj.weight = cat([gate_proj.weight, up_proj.weight], dim=0)
        down_proj.weight    = down_proj.weight
        gate_up_bias        = cat([gate_proj.bias, up_proj.bias])   (when bias=True)
        down_bias           = down_proj.bias                        (when bias=True)

    Use ``load_llama_mlp_state_dict(module.state_dict())`` or ``GLUFeedForward.from_llama_mlp(module)``.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str = "silu", bias: bool = False,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if hidden_size < 1 or intermediate_size < 1:
            raise ValueError(f"hidden_size and intermediate_size must be >= 1, got {hidden_size}, {intermediate_size}")
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.activation = activation
        self.backend = backend
        kw = dict(device=device, dtype=dtype)
        self.gate_up_proj = nn.Parameter(torch.empty(2 * intermediate_size, hidden_size, **kw))
        self.down_proj = nn.Parameter(torch.empty(hidden_size, intermediate_size, **kw))
        if bias:
            self.gate_up_bias = nn.Parameter(torch.empty(2 * intermediate_size, **kw))
            self.down_bias = nn.Parameter(torch.empty(hidden_size, **kw))
        else:
            self.register_parameter("gate_up_bias", None)
            self.register_parameter("down_bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the nn.Linear initialisation of the three projections
        for w in (self.gate_up_proj, self.down_proj):
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        if self.gate_up_bias is not None:
            for b, fan_in in ((self.gate_up_bias, self.hidden_size), (self.down_bias, self.intermediate_size)):
                bound = 1 / math.sqrt(fan_in)
                nn.init.uniform_(b, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return glu_ffn(x, self.gate_up_proj, self.down_proj, activation=self.activation,
                       bias_gate_up=self.gate_up_bias, bias_down=self.down_bias, backend=self.backend)

    @staticmethod
    def llama_mlp_to_state_dict(sd: Mapping[str, torch.Tensor], prefix: str = "") -> Dict[str, torch.Tensor]:
        """Map a LlamaMLP state dict (``gate_proj.weight``, ``up_proj.weight``, ``down_proj.weight`` and
        optional ``.bias`` entries, under ``prefix``) to this module's parameter names."""
        try:
            out = {"gate_up_proj": torch.cat([sd[prefix + "gate_proj.weight"], sd[prefix + "up_proj.weight"]], 0),
                   "down_proj": sd[prefix + "down_proj.weight"]}
        except KeyError as exc:
            raise KeyError(f"LlamaMLP state dict is missing {exc.args[0]!r}; expected gate_proj.weight, "
                           f"up_proj.weight and down_proj.weight") from None
        if prefix + "gate_proj.bias" in sd:
            out["gate_up_bias"] = torch.cat([sd[prefix + "gate_proj.bias"], sd[prefix + "up_proj.bias"]], 0)
        if prefix + "down_proj.bias" in sd:
            out["down_bias"] = sd[prefix + "down_proj.bias"]
        return out

    def load_llama_mlp_state_dict(self, sd: Mapping[str, torch.Tensor], prefix: str = "", strict: bool = True):
        """Load weights from a Hugging Face LlamaMLP state dict (see the class docstring for the mapping)."""
        mapped = self.llama_mlp_to_state_dict(sd, prefix)
        if strict and (("gate_up_bias" in mapped) != (self.gate_up_bias is not None)):
            raise ValueError(f"bias mismatch: the LlamaMLP state dict {'has' if 'gate_up_bias' in mapped else 'lacks'} "
                             f"biases but this module was built with bias={self.gate_up_bias is not None}")
        return self.load_state_dict(mapped, strict=strict)

    @classmethod
    def from_llama_mlp(cls, module: nn.Module, activation: Optional[str] = None,
                       backend: Optional[str] = None) -> "GLUFeedForward":
        """Build from a LlamaMLP-like module (gate_proj, up_proj, down_proj Linear layers).

        The activation is read from ``module.config.hidden_act`` when not given (default "silu")."""
        if activation is None:
            hidden_act = getattr(getattr(module, "config", None), "hidden_act", "silu")
            if hidden_act not in HF_ACTIVATIONS:
                raise ValueError(f"hidden_act {hidden_act!r} has no pyattn equivalent ({sorted(HF_ACTIVATIONS)})")
            activation = HF_ACTIVATIONS[hidden_act]
        w = module.gate_proj.weight
        ffn = cls(w.shape[1], w.shape[0], activation=activation, bias=module.gate_proj.bias is not None,
                  backend=backend, device=w.device, dtype=w.dtype)
        ffn.load_llama_mlp_state_dict(module.state_dict())
        return ffn

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, "
                f"activation={self.activation!r}, bias={self.gate_up_bias is not None}")
