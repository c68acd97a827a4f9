"""pyattn: fused attention, RMSNorm and GLU feed-forward kernels for PyTorch.

Every op is a ``torch.library`` custom op with forward and backward on four backends
(triton, cuda, cpu, reference); see ``pyattn.backend_status``.
"""
from ._dispatch import BackendUnavailableError, backend_status
from ._validate import InputError, InputTypeError
from .ops.rms_norm import rms_norm
from .ops.glu import glu, glu_ffn
from .attention import attention, sdpa, varlen_attention
from .masks import pad, unpad
from .ops.decode import decode_attention
from .kv_cache import PagedKVCache
from .lsh import lsh_attention
from .block_mask import BlockMask
from .block_sparse import block_sparse_attention
from . import layouts
from .integrations.patching import patch, unpatch
from . import nn
from .ops.cpu_tuning import info as cpu_tuning

from ._version import __version__

__all__ = ["rms_norm", "glu", "glu_ffn", "attention", "varlen_attention", "sdpa", "block_sparse_attention", "BlockMask", "layouts", "lsh_attention", "decode_attention",
           "PagedKVCache", "pad", "unpad", "patch", "unpatch", "nn", "backend_status", "cpu_tuning",
           "BackendUnavailableError", "InputError", "InputTypeError",
           "__version__"]
