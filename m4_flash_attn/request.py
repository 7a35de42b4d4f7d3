"""Requests and sequences: the engine's bookkeeping for one prompt.

A `Request` is what the user asked for; a `Sequence` is the tokens the engine is
producing for it, with a status, how many tokens the KV cache holds, the text so far and
the timing metrics. The engine makes them; from then on only `core/` changes a sequence.

Introduced in M0; changed in M1 (generation state), M2 (a KV cache slot; the sampling
parameters travel with the sequence), M3 (KV blocks, not a slot), M4 (tokens pending on
the device; a status flag cheap to read).
"""

import enum
import time
from dataclasses import dataclass, field

from .outputs import RequestMetrics
from .sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token or a stop string
    FINISHED_LENGTH_CAPPED = "length"  # max_tokens or max_model_len reached
    FINISHED_ABORTED = "abort"

    def __init__(self, value: str) -> None:
        # A plain attribute, not a property: it is read several times per sequence per
        # step, and at batch 256 those reads add up on the host.
        self.is_finished = value in ("stop", "length", "abort")


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
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    kv_blocks: list = field(default_factory=list)  # M3: its KVBlocks, in token order
    status: SequenceStatus = SequenceStatus.WAITING
    num_prompt_tokens: int = field(init=False)
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache or in a scheduled step
    num_pending_tokens: int = 0  # sampled by steps still on the device, not yet appended
    output_text: str = ""
    stop_reason: str | int | None = None
    # Incremental detokenization: text is decoded from token prefix_offset on.
    prefix_offset: int = 0
    read_offset: int = 0
    metrics: RequestMetrics | None = None
    output_logprobs: list = field(default_factory=list)  # per output token, if asked for
    prompt_logprobs: list | None = None  # per prompt token, if asked for

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)
        self.read_offset = self.num_prompt_tokens
        self.prefix_offset = max(0, self.num_prompt_tokens - 5)

    @property
    def name(self) -> str:
        """What the scheduler and the worker call it: its request's id."""
        return self.request_id

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
