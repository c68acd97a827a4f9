"""Reference GLU feed-forward in plain PyTorch: the eager LlamaMLP formula and closed-form gradients.

Activation codes (shared by every backend): 0 silu, 1 gelu (exact erf), 2 gelu_tanh, 3 relu, 4 sigmoid.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "sigmoid")


def activation_code(activation: str) -> int:
    return ACTIVATIONS.index(activation)


def act_fn(g: torch.Tensor, activation: str) -> torch.Tensor:
    """The activation as Hugging Face applies it (ACT2FN): silu, gelu, gelu_pytorch_tanh, relu, sigmoid."""
    if activation == "silu":
        return F.silu(g)
    if activation == "gelu":
        return F.gelu(g)
    if activation == "gelu_tanh":
        return F.gelu(g, approximate="tanh")
    if activation == "relu":
        return F.relu(g)
    if activation == "sigmoid":
        return torch.sigmoid(g)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def act_and_grad(g: torch.Tensor, activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(act(g), act'(g)) in closed form, computed in g's dtype."""
    if activation == "silu":
        s = torch.sigmoid(g)
        return g * s, s * (1 + g * (1 - s))
    if activation == "gelu":
        cdf = 0.5 * (1 + torch.erf(g * (1 / math.sqrt(2))))
        pdf = torch.exp(-0.5 * g * g) * (1 / math.sqrt(2 * math.pi))
        return g * cdf, cdf + g * pdf
    if activation == "gelu_tanh":
        k0, k1 = math.sqrt(2 / math.pi), 0.044715
        t = torch.tanh(k0 * (g + k1 * g * g * g))
        return 0.5 * g * (1 + t), 0.5 * (1 + t) + 0.5 * g * (1 - t * t) * k0 * (1 + 3 * k1 * g * g)
    if activation == "relu":
        pos = g > 0
        return torch.where(pos, g, torch.zeros_like(g)), pos.to(g.dtype)
    if activation == "sigmoid":
        s = torch.sigmoid(g)
        return s, s * (1 - s)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def glu_reference(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu") -> torch.Tensor:
    """act(gate) * up, eager (two rounded ops in low precision, like Hugging Face)."""
    return act_fn(gate, activation) * up


def glu_backward_reference(dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor,
                           activation: str = "silu") -> Tuple[torch.Tensor, torch.Tensor]:
    """(dgate, dup) of act(gate) * up, math in fp32 (fp64 for fp64 inputs), returned in gate's dtype."""
    stat = torch.float64 if gate.dtype == torch.float64 else torch.float32
    g, u, d = gate.to(stat), up.to(stat), dout.to(stat)
    a, da = act_and_grad(g, activation)
    return (d * u * da).to(gate.dtype), (d * a).to(gate.dtype)


def glu_ffn_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, activation: str = "silu",
                      bias_gate_up: Optional[torch.Tensor] = None,
                      bias_down: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The eager LlamaMLP formula with a stacked gate/up weight.

    x: (..., H); w_gate_up: (2I, H) = [gate_proj.weight; up_proj.weight]; w_down: (H_out, I).
    Equivalent to ``down_proj(act(gate_proj(x)) * up_proj(x))``.
    """
    inter = w_gate_up.shape[0] // 2
    bg = bu = None
    if bias_gate_up is not None:
        bg, bu = bias_gate_up[:inter], bias_gate_up[inter:]
    gate = F.linear(x, w_gate_up[:inter], bg)
    up = F.linear(x, w_gate_up[inter:], bu)
    return F.linear(act_fn(gate, activation) * up, w_down, bias_down)


def glu_ffn_forward_reference(x2: torch.Tensor, w_gate_up: torch.Tensor, bias_gate_up: Optional[torch.Tensor],
                              w_down: torch.Tensor, bias_down: Optional[torch.Tensor],
                              activation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward of the fused op on x2 (T, H): returns (out (T, H_out), pre (T, 2I))."""
    inter = w_gate_up.shape[0] // 2
    pre = F.linear(x2, w_gate_up, bias_gate_up)
    h = glu_reference(pre[:, :inter], pre[:, inter:], activation)
    return F.linear(h, w_down, bias_down), pre


def glu_ffn_backward_reference(dout: torch.Tensor, x2: torch.Tensor, pre: torch.Tensor, w_gate_up: torch.Tensor,
                               w_down: torch.Tensor, activation: str):
    """Backward of the fused op, recomputing h from pre. Returns (dx, dw_gate_up, db_gate_up, dw_down, db_down)."""
    inter = w_gate_up.shape[0] // 2
    gate, up = pre[:, :inter], pre[:, inter:]
    h = glu_reference(gate, up, activation)
    dh = dout @ w_down
    dgate, dup = glu_backward_reference(dh, gate, up, activation)
    dpre = torch.cat([dgate, dup], dim=1)
    dx = dpre @ w_gate_up
    return dx, dpre.t() @ x2, dpre.sum(0), dout.t() @ h, dout.sum(0)
