"""The reference attention backend: plain PyTorch over the KV cache's blocks.

Introduced in M2; every later attention kernel is tested against it. For sequence i, its
new tokens (the queries) are at positions `[seq_len - num_new, seq_len)` and attend to
the keys at positions `[0, seq_len)`, each key no later than the query. Keys and values
are read from the cache through the block table: position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size`. All sequences go through
one batched call: queries padded to the longest query, keys gathered (copied) into a
padded `[B, kv_heads, max_seq_len, d]` batch, and one mask that hides both the future
(causality) and the padding. Gathering copies every key once per step: simple and
exact, and the cost that M4's kernels, which read the blocks where they lie, remove.
"""

import torch
import torch.nn.functional as F

from ..metadata import AttentionMetadata


class TorchRefAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        """q: [T, heads, d]; caches: [num_blocks, block_size, kv_heads, d] -> [T, heads * d]."""
        batch, num_queries = md.seq_lens.shape[0], md.max_query_len
        group = self.num_heads // self.num_kv_heads
        query_lens = (md.query_start_loc[1:] - md.query_start_loc[:-1]).unsqueeze(1)  # [B, 1]
        seq_lens = md.seq_lens.unsqueeze(1)
        # Queries, padded: row t of sequence i is flat token query_start_loc[i] + t.
        t = torch.arange(num_queries, device=q.device)
        is_query = t < query_lens  # [B, Q]; False on padding
        rows = torch.where(is_query, md.query_start_loc[:-1].unsqueeze(1) + t, 0)
        query_positions = seq_lens - query_lens + t  # [B, Q]
        # Keys and values of positions 0 .. max_seq_len - 1 through the block table. Past
        # its end a sequence reads its last key again (masked out): never unwritten memory.
        key_positions = torch.arange(md.max_seq_len, device=q.device)
        read = torch.minimum(key_positions, seq_lens - 1)  # [B, L]
        block_size = k_cache.shape[1]
        slots = md.block_tables.gather(1, read // block_size) * block_size + read % block_size
        keys = k_cache.flatten(0, 1)[slots].transpose(1, 2)  # [B, kv_heads, L, d]
        values = v_cache.flatten(0, 1)[slots].transpose(1, 2)
        # A query sees the keys at or before its position (padding rows: the whole sequence).
        mask = ((key_positions <= query_positions.unsqueeze(2))
                & (key_positions < seq_lens).unsqueeze(1))  # [B, Q, L]
        # The `group` query heads that share a kv head become that head's rows of queries.
        q = q[rows].view(batch, num_queries, self.num_kv_heads, group, self.head_dim)
        q = q.permute(0, 2, 1, 3, 4).reshape(batch, self.num_kv_heads, num_queries * group,
                                             self.head_dim)
        mask = mask.repeat_interleave(group, dim=1).unsqueeze(1)  # [B, 1, Q * group, L]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale)
        out = out.view(batch, self.num_kv_heads, num_queries, group, self.head_dim)
        out = out.permute(0, 2, 1, 3, 4).reshape(batch, num_queries, -1)
        return out[is_query]
