"""What the scheduler decides for one step, in plain ints: the worker's only input.

Introduced in M2. For every sequence that runs, the new tokens it computes this step
(positions `[num_computed_tokens, num_computed_tokens + len(new_token_ids))`: a whole
prompt, or the one token sampled last step) and the ids of the cache blocks that hold
it (M2: one block, its whole slot; M3: blocks of block_size tokens). The worker builds the model's inputs from this alone; it
never sees a `Sequence` or a `KVBlock`.

M4: the worker keeps each running sequence's block table from step to step, so only
what changed is sent: the whole table when a sequence starts (or restarts after a
preemption), then only the blocks it was given since; and the requests whose blocks
were freed (finished, aborted, preempted), whose tables the worker forgets. A step's
message no longer grows with the sequences' lengths.
"""

from dataclasses import dataclass

from ...request import Sequence


@dataclass
class ScheduledSequence:
    request_id: str
    new_token_ids: list[int]  # the tokens whose K/V this step computes
    num_computed_tokens: int  # tokens before them whose K/V are already in the cache
    # Its block table's new entries, in order: all of them when the sequence (re)starts
    # (`is_new`), else the blocks it got since the last step (usually none).
    new_block_ids: list[int]
    is_new: bool  # nothing computed yet (new, recomputed, or retried): a whole table
    # The token after new_token_ids when they stop inside the prompt (a chunk): the step
    # then samples nothing for this sequence. None: they end at its last token, and the
    # step samples its next one (always here: M4 schedules whole prompts).
    next_token_id: int | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # for the worker
    seqs: list[Sequence]  # the same sequences, for the engine and `update_from_output`
    num_batched_tokens: int  # tokens that go through the model in this step
    freed_request_ids: list[str]  # blocks freed since the last step: forget their tables
