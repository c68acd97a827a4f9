"""``torch.nn`` modules built on pyattn ops."""
from .attention import MultiheadAttention
from .glu import GLUFeedForward
from .rms_norm import RMSNorm

__all__ = ["RMSNorm", "MultiheadAttention", "GLUFeedForward"]
