"""What the scheduler decides for one step, in plain ints: the worker's only input.

For every sequence that runs, the new tokens it computes this step (positions
`[num_computed_tokens, num_computed_tokens + len(new_token_ids))`: a whole prompt, a
chunk of one, or the token sampled last step, `PENDING_TOKEN` while it is on the device)
and the block table entries the worker has not seen. A sequence's first step also
brings what the worker keeps to sample it. The step names the sequences freed since the
last one (preempted: the worker forgets their tables; finished: it forgets them), and
the shared blocks to copy before it runs. The worker never sees a `Sequence`.

Introduced in M2; changed in M4 (only what changed is sent; pending tokens), M5 (a chunk
names the token after it), M6 (a start after cached tokens; block copies).
"""

from dataclasses import dataclass, field

from ...request import Sequence
from ...sampling_params import SamplingParams

PENDING_TOKEN = -1  # a new token sampled by the step before, not yet known on the host


@dataclass
class NewSequenceData:
    """How to sample a sequence: sent with its first step, kept by the worker until it
    finishes."""

    sampling_params: SamplingParams
    prompt_token_ids: list[int]
    seed: int | None  # its own random stream, when its request has a seed
    blocked_token_ids: list[int]  # masked while fewer than min_tokens are out


@dataclass
class ScheduledSequence:
    seq_name: str  # `Sequence.name`
    new_token_ids: list[int]  # the tokens whose K/V this step computes (or PENDING_TOKEN)
    num_computed_tokens: int  # tokens before them whose K/V are already in the cache
    # Its block table's new entries, in order: all of them when the sequence (re)starts
    # (`is_new`), else the blocks it got since the last step (usually none).
    new_block_ids: list[int]
    is_new: bool  # nothing computed yet (M6: but what it started with cached): a whole table
    new_sequence: NewSequenceData | None = None  # with its first step only
    # The token after new_token_ids when they stop inside the prompt (a chunk): the step
    # then samples nothing for this sequence. None: they end at its last token, and the
    # step samples its next one.
    next_token_id: int | None = None


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # for the worker
    seqs: list[Sequence]  # the same sequences, for `update_from_output`
    num_batched_tokens: int  # tokens that go through the model in this step
    finished_seq_names: list[str] = field(default_factory=list)  # since the last step
    preempted_seq_names: list[str] = field(default_factory=list)  # since the last step
    # (source, destination) block ids to copy in every layer before the step runs (M6)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
