"""The attention layer: softmax(q k^T / sqrt(d)) v, reading past keys from a KV cache.

Introduced in M0; M1 adds the KV cache; M2 runs a batch of sequences at once. The new
tokens of all sequences come flat, `[num_tokens, heads, d]`; each writes its key and
value into its sequence's cache slot at its position. Then, in

- a prefill, each sequence's prompt attends causally to itself only (one small
  attention per sequence, over the keys just computed), and in
- a decode, each sequence has one query; the keys of all sequences are gathered from
  their slots into one padded batch `[B, kv_heads, max_context_len, d]` and one
  attention call runs over it, a mask hiding the padding past each sequence's length.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMetadata:
    """What attention needs to know about the current batch besides q, k, v."""

    is_prefill: bool
    slots: torch.Tensor  # [num_tokens] the KV cache slot of each new token's sequence
    positions: torch.Tensor  # [num_tokens] each new token's position in its sequence
    query_start_loc: list[int]  # prefill: sequence i's tokens are [loc[i], loc[i + 1])
    max_context_len: int = 0  # decode: the longest sequence in the batch
    context_mask: torch.Tensor | None = None  # decode: [B, 1, 1, max_context_len], True
    #                                           where the sequence has a key
    context_positions: torch.Tensor | None = None  # decode: [B, max_context_len] the
    #                                     position each key is read from (padding: the last)


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                kv_cache: tuple[torch.Tensor, torch.Tensor],
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d]; k, v: [T, kv_heads, d]; cache: [slots, max_len, kv_heads, d]."""
        k_cache, v_cache = kv_cache
        k_cache[attn_metadata.slots, attn_metadata.positions] = k
        v_cache[attn_metadata.slots, attn_metadata.positions] = v
        if attn_metadata.is_prefill:
            return self._prefill(q, k, v, attn_metadata.query_start_loc)
        return self._decode(q, k_cache, v_cache, attn_metadata)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 query_start_loc: list[int]) -> torch.Tensor:
        """Each sequence's whole prompt, causal within the sequence."""
        out = torch.empty_like(q)
        for start, end in zip(query_start_loc[:-1], query_start_loc[1:]):
            out[start:end] = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1), k[start:end].transpose(0, 1),
                v[start:end].transpose(0, 1), is_causal=True, scale=self.scale,
                enable_gqa=True,
            ).transpose(0, 1)
        return out.reshape(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> torch.Tensor:
        """One query per sequence against its slot's keys, all sequences in one call."""
        batch = q.shape[0]
        slots = attn_metadata.slots.unsqueeze(1)
        keys = k_cache[slots, attn_metadata.context_positions].transpose(1, 2)  # [B, kv, L, d]
        values = v_cache[slots, attn_metadata.context_positions].transpose(1, 2)
        # The query heads that share a kv head become that head's rows of queries.
        q = q.view(batch, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        out = F.scaled_dot_product_attention(q, keys, values,
                                             attn_mask=attn_metadata.context_mask,
                                             scale=self.scale)
        return out.reshape(batch, -1)
