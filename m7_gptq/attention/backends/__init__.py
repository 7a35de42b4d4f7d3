"""Attention backends: how attention reads the KV cache. M2: the PyTorch reference;
M4: Triton kernels (`flash_attn.py`)."""
