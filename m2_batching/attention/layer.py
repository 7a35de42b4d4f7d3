"""The attention layer: softmax(q k^T / sqrt(d)) v, reading past keys from a KV cache.

The new tokens of all scheduled sequences come flat, `[num_tokens, heads, d]`. The layer
writes each one's key and value into the cache slot the slot mapping gives it, then
hands the queries and the cache to the backend (`attention/backends/`), which reads
every sequence's keys through its block table.

Introduced in M0; changed in M1 (the KV cache), M2 (a batch of sequences, a backend).
"""

import torch
from torch import nn

from .backends.torch_ref import TorchRefAttention
from .metadata import AttentionMetadata

__all__ = ["Attention", "AttentionMetadata"]


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.backend = TorchRefAttention(num_heads, num_kv_heads, head_dim, scale)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d]; cache: [blocks, block_size, kv_heads, d]."""
        k_cache, v_cache = kv_cache
        # One row per token slot: slot = block_id * block_size + offset.
        k_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, attn_metadata.slot_mapping, k)
        v_cache.view(-1, self.num_kv_heads, self.head_dim).index_copy_(
            0, attn_metadata.slot_mapping, v)
        return self.backend.forward(q, k_cache, v_cache, attn_metadata)
