"""``torch.nn`` modules built on pyattn ops."""
from .attention import MultiheadAttention
from .block_sparse import BlockSparseSelfAttention
from .glu import GLUFeedForward
from .rms_norm import RMSNorm
from .lsh import LSHSelfAttention
from .local import LocalSelfAttention

__all__ = ["RMSNorm", "MultiheadAttention", "BlockSparseSelfAttention", "GLUFeedForward", "LSHSelfAttention",
           "LocalSelfAttention"]
