"""Attention backends: how attention reads the KV cache.

`torch_ref.py`: plain PyTorch, the reference that attention kernels are tested against.

Introduced in M2.
"""
