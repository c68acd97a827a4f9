"""Plain-PyTorch references: the oracle for tests and the ``reference`` backend."""
from .rms_norm import rms_norm_reference

__all__ = ["rms_norm_reference"]
