"""What the scheduler decides for one step, in plain ints: the worker's only input.

For every sequence that runs, the new tokens it computes this step (positions
`[num_computed_tokens, num_computed_tokens + len(new_token_ids))`: a whole prompt, or the
one token sampled last step) and its block table: the ids of the cache blocks that hold
its tokens. A sequence's first step also brings what the worker keeps to sample it; the
step names the sequences that finished since the last one, which the worker forgets.
The worker never sees a `Sequence`.

Introduced in M2.
"""

from dataclasses import dataclass, field

from ...request import Sequence
from ...sampling_params import SamplingParams


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
    new_token_ids: list[int]  # the tokens whose K/V this step computes
    num_computed_tokens: int  # tokens before them whose K/V are already in the cache
    block_ids: list[int]  # its block table: the cache blocks that hold its tokens, in order
    new_sequence: NewSequenceData | None = None  # with its first step only


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]  # for the worker
    seqs: list[Sequence]  # the same sequences, for `update_from_output`
    num_batched_tokens: int  # tokens that go through the model in this step
    finished_seq_names: list[str] = field(default_factory=list)  # since the last step
