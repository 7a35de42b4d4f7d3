"""The step's inputs: the scheduler's plain ints turned into the model's flat batch.

Each scheduled sequence computes the new tokens at positions `[num_computed, num_computed
+ n)`: a whole prompt, or the one token sampled last step. They are laid one after the
other into one flat batch of `T` tokens, with `positions` (for the rotary embedding),
`slot_mapping` (where each token's K/V go), `query_start_loc`, `seq_lens` and padded
`block_tables` (attention's view), and `logits_indices` (each sequence's last token,
whose logits give its next one). `InputBatch` keeps each sequence's sampling row, made
at its first step (its generator, its token history) until it finishes.

Introduced in M2.
"""

from dataclasses import dataclass

import torch

from ..attention.metadata import AttentionMetadata
from ..model_executor.layers.sampler import SamplingRow


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
    # exercise m2.2 begin
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
    # exercise m2.2 end


def keep_history(row: SamplingRow, end: int) -> None:
    """A row's history holds its tokens before position `end`, where the step that
    samples its next token ends: a token sampled in a step whose results were then lost
    (an error after it ran; the step runs again) leaves it."""
    del row.output_token_ids[end - len(row.prompt_token_ids):]


class InputBatch:
    """The worker's lasting view of the sequences it runs: how to sample each one."""

    def __init__(self, block_size: int, device: torch.device) -> None:
        self.block_size, self.device = block_size, device
        self.sampling_rows: dict[str, SamplingRow] = {}  # by sequence name

    def update(self, scheduler_output) -> list[SamplingRow]:
        """Forget the sequences that finished, make rows for those that start; return the
        step's rows in order."""
        for name in scheduler_output.finished_seq_names:
            self.sampling_rows.pop(name, None)
        for s in scheduler_output.scheduled:
            if s.new_sequence is not None and s.seq_name not in self.sampling_rows:
                self.sampling_rows[s.seq_name] = self._new_row(s.new_sequence)
        rows = [self.sampling_rows[s.seq_name] for s in scheduler_output.scheduled]
        for s, row in zip(scheduler_output.scheduled, rows):
            keep_history(row, s.num_computed_tokens + len(s.new_token_ids))
        return rows

    def _new_row(self, new) -> SamplingRow:
        """A row of its own: a private random stream when the request has a seed (so its
        samples do not depend on what runs beside it), and its token history."""
        generator = None if new.seed is None else \
            torch.Generator(self.device).manual_seed(new.seed)
        return SamplingRow(new.sampling_params, list(new.prompt_token_ids), [], generator,
                           list(new.blocked_token_ids))

    def prepare(self, scheduled: list) -> ModelInputs:
        """The model's inputs for the scheduled sequences."""
        return prepare_inputs([s.new_token_ids for s in scheduled],
                              [s.num_computed_tokens for s in scheduled],
                              [s.block_ids for s in scheduled], self.block_size, self.device)

    @staticmethod
    def append_sampled(rows: list[SamplingRow], tokens: list[int]) -> None:
        """The sampled tokens join their rows' histories (for the penalties)."""
        for row, token in zip(rows, tokens):
            row.output_token_ids.append(token)
