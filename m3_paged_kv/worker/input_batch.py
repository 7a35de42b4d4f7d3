"""The step's inputs: the scheduler's plain ints turned into the model's flat batch.

Introduced in M2 (where a sequence's one block is its whole slot; M3's blocks are
small, and nothing here changes). Each scheduled sequence computes the new tokens at
positions `[num_computed, num_computed + n)`: a whole prompt, or the one token sampled
last step. They are laid one after the other into one flat batch of `T` tokens, with

- `positions`: each token's position in its sequence (for the rotary embedding);
- `slot_mapping`: the cache slot its K/V are written to, from the block table;
- `query_start_loc`, `seq_lens`, padded `block_tables`: where each sequence's tokens
  are in the batch, and how many keys it has once they are written (attention's view);
- `logits_indices`: the row of each sequence's last token, the one whose logits give
  its next token.
"""

from dataclasses import dataclass

import torch

from ..attention.metadata import AttentionMetadata


@dataclass
class ModelInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # [B]


def slot_of(block_ids: list[int], block_size: int, position: int) -> int:
    """Where token `position` of a sequence holding blocks `block_ids` is in the cache."""
    return block_ids[position // block_size] * block_size + position % block_size


def prepare_inputs(new_token_ids: list[list[int]], num_computed_tokens: list[int],
                   block_ids: list[list[int]], block_size: int,
                   device: torch.device) -> ModelInputs:
    """One flat batch from each sequence's new tokens, start position and block ids."""
    token_ids, positions, slots, query_start_loc, seq_lens = [], [], [], [0], []
    for ids, start, blocks in zip(new_token_ids, num_computed_tokens, block_ids):
        end = start + len(ids)
        token_ids.extend(ids)
        positions.extend(range(start, end))
        slots.extend(slot_of(blocks, block_size, p) for p in range(start, end))
        query_start_loc.append(query_start_loc[-1] + len(ids))
        seq_lens.append(end)
    max_blocks = max(len(blocks) for blocks in block_ids)
    block_tables = [blocks + [0] * (max_blocks - len(blocks)) for blocks in block_ids]

    def tensor(values: list) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    starts = tensor(query_start_loc)
    metadata = AttentionMetadata(
        query_start_loc=starts, seq_lens=tensor(seq_lens), block_tables=tensor(block_tables),
        slot_mapping=tensor(slots), max_query_len=max(len(ids) for ids in new_token_ids),
        max_seq_len=max(seq_lens))
    return ModelInputs(tensor(token_ids), tensor(positions), metadata, starts[1:] - 1)
