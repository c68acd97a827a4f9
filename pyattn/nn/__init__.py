"""``torch.nn`` modules built on pyattn ops."""
from .rms_norm import RMSNorm

__all__ = ["RMSNorm"]
