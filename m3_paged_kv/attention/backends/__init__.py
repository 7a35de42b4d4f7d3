"""Attention backends: how attention reads the KV cache. M2: the PyTorch reference."""
