"""Requests and sequences: the engine's bookkeeping for one prompt.

A `Request` is what the user asked for; a `Sequence` is the tokens the engine is
producing for it, with a status.

Introduced in M0.
"""

import enum
import time
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH_CAPPED = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.name.startswith("FINISHED")


@dataclass
class Request:
    request_id: str
    prompt: str | None
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    prompt_token_ids: list[int] = field(default_factory=list)


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    token_ids: list[int]  # prompt tokens, then generated ones
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
