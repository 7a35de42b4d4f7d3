"""Attention backends: how attention reads the KV cache.

`flash_attn.py`: Triton kernels that read the cache's blocks in place (the default on
CUDA); `torch_ref.py`: plain PyTorch, the reference the kernels are tested against.

Introduced in M2; changed in M4 (the Triton backend).
"""
