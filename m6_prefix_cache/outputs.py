"""What `LLM.generate` returns: vLLM-style `RequestOutput` with timing metrics.

A `RequestOutput` holds its `CompletionOutput`s (text, token ids, why it finished, and
the log-probabilities when asked for; n of them when n samples were asked for), the
request's `RequestMetrics`, and `num_cached_tokens`: how many prompt tokens came from
the prefix cache.

Introduced in M0 (filled in by generation, from M1 on); changed in M6 (n completions,
cached tokens).
"""

from dataclasses import dataclass, field


@dataclass
class RequestMetrics:
    """Wall-clock times (time.perf_counter seconds) of one request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_output_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token: arrival to the first generated token."""
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first one."""
        if self.finish_time is None or self.first_token_time is None:
            return None
        if self.num_output_tokens < 2:
            return 0.0
        return (self.finish_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e_latency(self) -> float | None:
        if self.finish_time is None:
            return None
        return self.finish_time - self.arrival_time


@dataclass
class Logprob:
    """How likely the model found one token at one position (vLLM's `Logprob`)."""

    logprob: float  # natural log of its probability, from the raw logits
    rank: int  # 1 for the most likely token at this position
    decoded_token: str | None = None


# One position: the chosen token's Logprob and those of the most likely tokens, by id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or token id that fired
    logprobs: list[PositionLogprobs] | None = None  # one per token, if asked for


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    # One per prompt token (None for the first, which nothing predicts), if asked for.
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    # Prompt tokens whose K/V the prefix cache held when it was first admitted
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason
