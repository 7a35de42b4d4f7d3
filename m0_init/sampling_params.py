"""Sampling parameters: how to pick each next token and when to stop.

Names follow vLLM. Every invalid value raises `ValueError` naming the field and its
allowed range; a value of the wrong type (a bool where a number is expected included)
raises `TypeError` naming the field.

Introduced in M0 (checked here; generation uses them from M1 on).
"""

import math
import numbers
from dataclasses import dataclass, field

from .config import is_int

# The sampler works in float32: logits / temperature must stay finite. Below 1e-5 it
# overflows for large logits (vLLM treats such temperatures as greedy; we refuse them),
# and a temperature past float32's largest number is inf there.
MIN_TEMPERATURE = 1e-5
FLOAT32_MAX = 3.4028234663852886e38
MAX_LOGPROBS = 20  # vLLM's default max_logprobs


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
    # Log-probabilities returned (vLLM's meaning): None returns none; k returns, per
    # generated token (logprobs) or per prompt token (prompt_logprobs), the token's own
    # log-probability and those of the k most likely tokens (0: only the token's own).
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    stop_strings: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        def check(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{name} must be {allowed}, got {getattr(self, name)!r}")

        def check_type(ok: bool, name: str, expected: str) -> None:
            if not ok:
                value = getattr(self, name)
                raise TypeError(f"{name} must be {expected}, got {value!r} "
                                f"({type(value).__name__})")

        def number(name: str, in_range, allowed: str) -> None:
            """A float field: a number (not a bool), finite (NaN fails every comparison)."""
            value = getattr(self, name)
            check_type(isinstance(value, numbers.Real) and not isinstance(value, bool),
                       name, "a number")
            check(math.isfinite(value) and in_range(value), name, allowed)

        def integer(name: str, in_range, allowed: str, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            check_type(is_int(value), name, ("None or " if optional else "") + "an integer")
            check(in_range(value), name, allowed)

        number("temperature", lambda t: t == 0 or MIN_TEMPERATURE <= t <= FLOAT32_MAX,
               f"0 (greedy) or a number in [{MIN_TEMPERATURE}, {FLOAT32_MAX:.1e}] "
               "(smaller ones overflow logits / temperature in float32)")
        number("top_p", lambda p: 0 < p <= 1, "in (0, 1]")
        integer("top_k", lambda k: k in (-1, 0) or 1 <= k < 2**63,
                "-1 or 0 (disabled) or an integer in [1, 2**63)")
        number("min_p", lambda p: 0 <= p <= 1, "in [0, 1]")
        # Logits are divided or multiplied by it in float32: keep the result finite.
        number("repetition_penalty", lambda r: 1e-5 <= r <= 1e5,
               "in [1e-05, 1e+05] (1 disables it)")
        number("presence_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        number("frequency_penalty", lambda p: -2 <= p <= 2, "in [-2, 2]")
        integer("max_tokens", lambda n: n >= 1, "an integer >= 1")
        integer("min_tokens", lambda n: 0 <= n <= self.max_tokens,
                f"an integer in [0, max_tokens={self.max_tokens}]")
        # torch.Generator.manual_seed takes 64 bits; it maps a negative seed s to
        # 2**64 + s - 1, so two seeds would give one stream: only [0, 2**64) is accepted.
        integer("seed", lambda s: 0 <= s < 2**64, "None or an integer in [0, 2**64)",
                optional=True)
        for name in ("logprobs", "prompt_logprobs"):
            integer(name, lambda n: 0 <= n <= MAX_LOGPROBS,
                    f"None or an integer in [0, {MAX_LOGPROBS}]", optional=True)
        for name in ("include_stop_str_in_output", "ignore_eos"):
            check_type(isinstance(getattr(self, name), bool), name, "a bool")

        if self.stop is None:
            self.stop_strings = []
        elif isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            check_type(isinstance(self.stop, (list, tuple)), "stop",
                       "None, a string or a list of strings")
            self.stop_strings = list(self.stop)
        check_type(all(isinstance(s, str) for s in self.stop_strings), "stop",
                   "None, a string or a list of strings")
        check(all(self.stop_strings), "stop", "a non-empty string or a list of them")
        for s in self.stop_strings:  # a lone surrogate ("\ud800") can never be in the text
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                check(False, "stop", f"valid UTF-8 text ({s!r} is not)")
        check_type(self.stop_token_ids is None
                   or isinstance(self.stop_token_ids, (list, tuple)),
                   "stop_token_ids", "None or a list of integers")
        self.stop_token_ids = list(self.stop_token_ids or [])
        check_type(all(is_int(t) for t in self.stop_token_ids), "stop_token_ids",
                   "None or a list of integers")
        check(all(t >= 0 for t in self.stop_token_ids),
              "stop_token_ids", "a list of token ids >= 0")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
