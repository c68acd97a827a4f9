"""Input validation shared by all ops: every error names the argument and what was expected."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class InputError(ValueError, RuntimeError):
    """Bad input value: wrong rank, shape, device, range or combination of arguments.

    A ``ValueError`` (Python's convention) and a ``RuntimeError`` (what torch's own ops, such as
    ``F.scaled_dot_product_attention``, raise), so code written for either catches it.
    """


class InputTypeError(TypeError, RuntimeError):
    """Bad input type or dtype; a ``TypeError`` and, like torch's checks, a ``RuntimeError``."""


def _dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, *, ndim: Optional[int] = None, min_ndim: Optional[int] = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise InputTypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes and t.dtype not in dtypes:
        raise InputTypeError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)} ({t.dim()}-D)")
    if min_ndim is not None and t.dim() < min_ndim:
        raise InputError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_same_device(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.device != ref.device:
        raise InputError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; they must be on the same device")


def check_same_dtype(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.dtype != ref.dtype:
        raise InputTypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')} but {ref_name} has "
                        f"{str(ref.dtype).replace('torch.', '')}; they must match")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    if tuple(t.shape) != tuple(expected):
        extra = f" ({what})" if what else ""
        raise InputError(f"{name} must have shape {tuple(expected)}{extra}, got {tuple(t.shape)}")


def check_probability(name: str, p) -> float:
    """A dropout probability: a real number in [0, 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise InputTypeError(f"{name} must be a float, got {type(p).__name__}")
    if not 0.0 <= p < 1.0:
        raise InputError(f"{name} must be in [0, 1), got {p}")
    return float(p)


def check_positive(name: str, value, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputTypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value or (value < 0 if allow_zero else value <= 0):
        bound = ">= 0" if allow_zero else "> 0"
        raise InputError(f"{name} must be {bound}, got {value}")
    return float(value)


def check_int(name: str, value, minimum: int) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputTypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise InputError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_backend_arg(backend) -> None:
    if backend is not None and not isinstance(backend, str):
        raise InputTypeError(f"backend must be a string or None, got {type(backend).__name__}")
