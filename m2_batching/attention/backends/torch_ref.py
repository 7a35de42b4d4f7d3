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

The gather indices and the mask are the same in every layer, so `build_metadata` makes
them once per step, from the common metadata (the model runner calls it).
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..metadata import AttentionMetadata


@dataclass(kw_only=True)
class TorchRefMetadata(AttentionMetadata):
    query_rows: torch.Tensor  # [B, Q] the flat row of each padded query (row 0 on padding)
    output_rows: torch.Tensor  # [T] the padded row [b * Q + t] of each flat token
    key_slots: torch.Tensor  # [B, L] the cache slot of each key position of each sequence
    mask: torch.Tensor  # [B, 1, Q * group, L] True where a query may see a key


def build_metadata(md: AttentionMetadata, block_size: int, group: int) -> TorchRefMetadata:
    """Add the reference's gather indices and mask; `group` = query heads per kv head."""
    device, num_tokens = md.slot_mapping.device, md.slot_mapping.shape[0]
    starts, ends = md.query_start_loc[:-1], md.query_start_loc[1:]
    query_lens, seq_lens = (ends - starts).unsqueeze(1), md.seq_lens.unsqueeze(1)
    t = torch.arange(md.max_query_len, device=device)
    query_rows = torch.where(t < query_lens, starts.unsqueeze(1) + t, 0)  # [B, Q]
    token = torch.arange(num_tokens, device=device)
    seq_of_token = torch.searchsorted(ends, token, right=True)
    output_rows = seq_of_token * md.max_query_len + token - starts[seq_of_token]
    # Past its end a sequence reads its last key again (masked out): never unwritten memory.
    key_positions = torch.arange(md.max_seq_len, device=device)
    read = torch.minimum(key_positions, seq_lens - 1)  # [B, L]
    key_slots = md.block_tables.gather(1, read // block_size) * block_size + read % block_size
    # A query sees the keys at or before its position (a padding row: the whole sequence,
    # so that no row is empty).
    query_positions = seq_lens - query_lens + t  # [B, Q]
    mask = ((key_positions <= query_positions.unsqueeze(2))
            & (key_positions < seq_lens).unsqueeze(1))  # [B, Q, L]
    mask = mask.repeat_interleave(group, dim=1).unsqueeze(1)  # a row per (query, head)
    common = {f.name: getattr(md, f.name) for f in fields(AttentionMetadata)}
    return TorchRefMetadata(**common, query_rows=query_rows, output_rows=output_rows,
                            key_slots=key_slots, mask=mask)


class TorchRefAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: TorchRefMetadata) -> torch.Tensor:
        """q: [T, heads, d]; caches: [num_blocks, block_size, kv_heads, d] -> [T, heads * d]."""
        batch, num_queries = md.query_rows.shape
        kv_heads, group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        keys = k_cache.flatten(0, 1)[md.key_slots].transpose(1, 2)  # [B, kv_heads, L, d]
        values = v_cache.flatten(0, 1)[md.key_slots].transpose(1, 2)
        # The `group` query heads that share a kv head become that head's rows of queries.
        q = q[md.query_rows].view(batch, num_queries, kv_heads, group, d)
        q = q.permute(0, 2, 1, 3, 4).reshape(batch, kv_heads, num_queries * group, d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=md.mask,
                                             scale=self.scale)
        out = out.view(batch, kv_heads, num_queries, group, d).permute(0, 2, 1, 3, 4)
        return out.reshape(batch * num_queries, -1)[md.output_rows]
