"""Triton kernels of pyattn, one module per op family (installed as ``pyattn.kernels``).

Under ``TRITON_INTERPRET=1`` (set before import) the kernels run on CPU tensors for testing.
"""
