"""The attention layer: softmax(q k^T / sqrt(d)) v, reading past keys from a KV cache.

Each forward pass writes the new tokens' keys and values into the cache at their
positions, then attends over everything the cache holds up to the last new token: a
prefill writes the whole prompt, a decode one token, and nothing is computed twice.

Introduced in M0; changed in M1 (the KV cache).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """What attention needs to know about the current forward pass besides q, k, v."""

    start_pos: int  # tokens of this sequence already in the cache


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d]; cache: [max_len, kv_heads, d] each."""
        # exercise m1.1 begin
        num_new = q.shape[0]
        start = attn_metadata.start_pos
        end = start + num_new
        k_cache, v_cache = kv_cache
        k_cache[start:end] = k
        v_cache[start:end] = v
        # Query i (at position start + i) may look at keys 0 .. start + i.
        mask = None
        if num_new > 1:
            mask = torch.ones(num_new, end, dtype=torch.bool, device=q.device).tril(start)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k_cache[:end].transpose(0, 1), v_cache[:end].transpose(0, 1),
            attn_mask=mask, scale=self.scale, enable_gqa=True,
        )
        return out.transpose(0, 1).reshape(num_new, -1)
        # exercise m1.1 end
