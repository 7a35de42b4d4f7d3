"""The reference attention backend: plain PyTorch over the KV cache's blocks.

Sequence i's new tokens (the queries) sit at positions `[seq_len - num_new, seq_len)`
and attend to its keys `[0, seq_len)`, each no later than the query. The keys and values
are gathered (copied) out of the cache through the block table into a padded batch, and
one `scaled_dot_product_attention` call runs over it with a mask for the future and the
padding: all the decodes share one call, each prompt has its own. `build_metadata` makes
the gather indices and masks once per step. Every attention kernel is tested against
this backend.

Introduced in M2.
"""

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ..metadata import AttentionMetadata


@dataclass
class AttentionCall:
    """B sequences with Q new tokens each, attended to in one call."""

    token_rows: torch.Tensor  # [B * Q] the flat rows of their new tokens, sequence by sequence
    key_slots: torch.Tensor  # [B, L] the cache slot of each key position (past the end: the last)
    mask: torch.Tensor  # [B, 1, Q * group, L] True where a (query, head) row may see a key


@dataclass(kw_only=True)
class TorchRefMetadata(AttentionMetadata):
    calls: list[AttentionCall]


def build_metadata(md: AttentionMetadata, block_size: int, group: int) -> TorchRefMetadata:
    """The common metadata plus the calls; `group` = query heads per kv head."""
    starts, seq_lens = md.query_start_loc.tolist(), md.seq_lens.tolist()
    query_lens = [end - start for start, end in zip(starts, starts[1:])]
    decodes = [i for i, n in enumerate(query_lens) if n == 1]
    groups = ([decodes] if decodes else []) + [[i] for i, n in enumerate(query_lens) if n > 1]
    calls = []
    for seqs in groups:
        num_queries = query_lens[seqs[0]]
        rows = [starts[i] + t for i in seqs for t in range(num_queries)]
        calls.append(_call(md, seqs, rows, num_queries, max(seq_lens[i] for i in seqs),
                           block_size, group))
    common = {f.name: getattr(md, f.name) for f in fields(AttentionMetadata)}
    return TorchRefMetadata(**common, calls=calls)


def _call(md: AttentionMetadata, seqs: list[int], rows: list[int], num_queries: int,
          max_len: int, block_size: int, group: int) -> AttentionCall:
    # exercise m2.4 begin
    device = md.seq_lens.device
    index = torch.tensor(seqs, device=device)
    seq_lens = md.seq_lens[index].unsqueeze(1)  # [B, 1]
    key_positions = torch.arange(max_len, device=device)
    read = torch.minimum(key_positions, seq_lens - 1)  # [B, L]: never unwritten memory
    key_slots = (md.block_tables[index].gather(1, read // block_size) * block_size
                 + read % block_size)
    query_positions = seq_lens - num_queries + torch.arange(num_queries, device=device)
    mask = ((key_positions <= query_positions.unsqueeze(2))
            & (key_positions < seq_lens).unsqueeze(1))  # [B, Q, L]
    mask = mask.repeat_interleave(group, dim=1).unsqueeze(1)  # a row per (query, head)
    return AttentionCall(torch.tensor(rows, device=device), key_slots, mask)
    # exercise m2.4 end


class TorchRefAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim, self.scale = head_dim, scale

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                md: TorchRefMetadata) -> torch.Tensor:
        """q: [T, heads, d]; caches: [num_blocks, block_size, kv_heads, d] -> [T, heads * d]."""
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for call in md.calls:
            out[call.token_rows] = self._attend(q[call.token_rows], k_cache, v_cache, call)
        return out

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                call: AttentionCall) -> torch.Tensor:
        batch = call.key_slots.shape[0]
        num_queries = q.shape[0] // batch
        kv_heads, group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        keys = k_cache.flatten(0, 1)[call.key_slots].transpose(1, 2)  # [B, kv_heads, L, d]
        values = v_cache.flatten(0, 1)[call.key_slots].transpose(1, 2)
        # The `group` query heads that share a kv head become that head's rows of queries.
        q = q.view(batch, num_queries, kv_heads, group, d).permute(0, 2, 1, 3, 4)
        q = q.reshape(batch, kv_heads, num_queries * group, d)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=call.mask,
                                             scale=self.scale)
        out = out.view(batch, kv_heads, num_queries, group, d).permute(0, 2, 1, 3, 4)
        return out.reshape(batch * num_queries, -1)
