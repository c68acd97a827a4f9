"""``torch.nn`` modules built on pyattn ops."""
from .attention import GroupedQueryAttention, MultiheadAttention
from .block_sparse import BlockSparseSelfAttention
from .glu import GLUFeedForward
from .rms_norm import RMSNorm
from .lsh import LSHSelfAttention
from .local import LocalSelfAttention

__all__ = ["RMSNorm", "MultiheadAttention", "GroupedQueryAttention", "BlockSparseSelfAttention", "GLUFeedForward",
           "LSHSelfAttention", "LocalSelfAttention"]
