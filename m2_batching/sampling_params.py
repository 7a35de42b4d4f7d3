"""Sampling parameters: how to pick each next token and when to stop.

Introduced in M0 (validated here; used from M1 on). Names follow vLLM. Every invalid
value raises `ValueError` naming the field and its allowed range.
"""

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) keeps all
    min_p: float = 0.0  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # >1 discourages tokens already in prompt or output
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    max_tokens: int = 16
    min_tokens: int = 0  # EOS and stop tokens are suppressed until this many are out
    stop: list[str] | str | None = None  # stop strings (not included in the text)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    seed: int | None = None  # a per-request random generator, for reproducible sampling
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        check(self.temperature >= 0, "temperature", ">= 0 (0 is greedy)")
        check(0 < self.top_p <= 1, "top_p", "in (0, 1]")
        check(isinstance(self.top_k, int) and (self.top_k >= 0 or self.top_k == -1),
              "top_k", "-1 (disabled), 0 (disabled) or a positive integer")
        check(0 <= self.min_p <= 1, "min_p", "in [0, 1]")
        check(self.repetition_penalty > 0, "repetition_penalty", "> 0 (1 disables it)")
        check(-2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(-2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]")
        check(isinstance(self.max_tokens, int) and self.max_tokens >= 1, "max_tokens",
              "an integer >= 1")
        check(isinstance(self.min_tokens, int) and 0 <= self.min_tokens <= self.max_tokens,
              "min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")
        check(self.seed is None or isinstance(self.seed, int), "seed", "None or an integer")
        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop)
        check(all(isinstance(s, str) and s for s in self.stop_strings), "stop",
              "a non-empty string or a list of them")
        self.stop_token_ids = list(self.stop_token_ids or [])
        check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
