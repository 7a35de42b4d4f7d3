"""Attention metadata: what attention needs to know about a step besides q, k and v.

The batch is flat: the new tokens of every scheduled sequence, one after the other.
Sequence i's new tokens are rows `[query_start_loc[i], query_start_loc[i + 1])`; they
sit at positions `[seq_lens[i] - num_new, seq_lens[i])` and attend causally to the keys
at positions `[0, seq_lens[i])`, which attention reads from the KV cache through the
block table. A decode is one new token, a whole prompt every token; nothing else is
special. The fields are neutral (no backend's own layout), built by
`worker/input_batch.py`.

Introduced in M2.
"""

from dataclasses import dataclass

import torch


@dataclass(kw_only=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] where each sequence's new tokens start, then T
    seq_lens: torch.Tensor  # [B] tokens of each sequence in the cache after this step
    block_tables: torch.Tensor  # [B, max_blocks] each sequence's cache blocks (0-padded)
    slot_mapping: torch.Tensor  # [T] the cache slot each new token's K/V is written to
    max_query_len: int  # the most new tokens of one sequence
    max_seq_len: int  # the longest sequence (its keys) in the batch
