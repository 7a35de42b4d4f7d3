"""The attention layer: softmax(q k^T / sqrt(d)) v over one sequence, causal.

There is no KV cache: every forward pass attends over the whole sequence it is given.

Introduced in M0.
"""

import torch
import torch.nn.functional as F
from torch import nn


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d] -> [T, heads * d]."""
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, scale=self.scale, enable_gqa=True,
        )
        return out.transpose(0, 1).reshape(q.shape[0], -1)
