"""Rotary position embedding (RoPE), with Llama-3 and linear frequency scaling.

The cos/sin tables are computed once for every position up to the model's limit; a
forward pass just indexes them by each token's position. On CUDA one Triton kernel
rotates q and k together (`ops/rotary.py`); the flash backend takes the tables to rotate
and write the KV cache in one kernel.

Introduced in M0; changed in M4 (one fused Triton kernel).
"""

import math

import torch
from torch import nn

from ...ops.rotary import apply_rotary


def _inverse_frequencies(head_dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    if scaling is None:
        return inv_freq
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    raise ValueError(f"rope_scaling: type {kind!r} is not supported (default, linear, llama3)")


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    blend = (old_len / wavelen - low) / (high - low)
    blended = (1 - blend) * scaled / factor + blend * scaled
    in_between = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(in_between, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float,
                 scaling: dict | None = None) -> None:
        super().__init__()
        self.inv_freq = _inverse_frequencies(head_dim, theta, scaling)
        self.max_position = max_position
        self.cos = self.sin = None  # float32 tables, built on first use on the right device

    def _build_tables(self, device: torch.device) -> None:
        positions = torch.arange(self.max_position, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, self.inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # [max_position, head_dim]
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)

    def tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The float32 (cos, sin) tables, [max_position, head_dim], on `device`."""
        if self.cos is None or self.cos.device != device:
            self._build_tables(device)
        return self.cos, self.sin

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """q: [T, heads, head_dim], k: [T, kv_heads, head_dim], positions: [T]."""
        self.tables(positions.device)
        if q.is_cuda:
            return apply_rotary(q, k, positions, self.cos, self.sin)
        cos = self.cos[positions].unsqueeze(1).to(q.dtype)
        sin = self.sin[positions].unsqueeze(1).to(q.dtype)
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
