"""The attention layer: softmax(q k^T / sqrt(d)) v, reading past keys from a KV cache.

The new tokens of all scheduled sequences come flat, `[num_tokens, heads, d]`. The layer
has the backend norm q and k per head (Qwen3), rotate them by their positions (RoPE),
write each token's key and value into the cache slot the slot mapping gives it, then
attend, reading every sequence's keys through its block table. The model runner picks
the backend (`set_attention_backend`): `flash`, the Triton kernels, or `torch`.

Introduced in M0; changed in M1 (the KV cache), M2 (a batch of sequences, a backend), M4
(a choice of backends, each rotating and writing the cache its own way).
"""

import torch
from torch import nn

from .backends.torch_ref import TorchRefAttention
from .metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata", "set_attention_backend"]


def make_backend(name: str, num_heads: int, num_kv_heads: int, head_dim: int, scale: float):
    if name == "torch":
        return TorchRefAttention(num_heads, num_kv_heads, head_dim, scale)
    from .backends.flash_attn import FlashAttention  # the attention kernels, when asked for
    return FlashAttention(num_heads, num_kv_heads, head_dim, scale)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 rotary: nn.Module, qk_norm: tuple[nn.Module, nn.Module] | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale, self.rotary = scale, rotary
        self.qk_norm = qk_norm  # Qwen3's per-head norms (the model's modules, not ours)
        self.backend = make_backend("torch", num_heads, num_kv_heads, head_dim, scale)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """positions: [T]; q: [T, heads, d]; k, v: [T, kv_heads, d], q and k not yet
        normed or rotated; cache: [blocks, block_size, kv_heads, d]."""
        k_cache, v_cache = kv_cache
        q = self.backend.rotate_and_write_kv(self.rotary, self.qk_norm, positions, q, k, v,
                                             k_cache, v_cache, attn_metadata.slot_mapping)
        return self.backend.forward(q, k_cache, v_cache, attn_metadata)


def set_attention_backend(model: nn.Module, name: str) -> None:
    """Give every attention layer of `model` the backend `name` ("flash" or "torch")."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.backend = make_backend(name, module.num_heads, module.num_kv_heads,
                                          module.head_dim, module.scale)
