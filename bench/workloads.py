"""The bench workloads: the same token-id prompts, lengths and arrival times for every row.

Introduced with the bench (M1). Prompts are random token ids drawn from the model's
vocabulary with a seed (for dummy and real models alike), so every stage and the `hf`
row see exactly the same requests. Requests always run greedy with `ignore_eos`, so
each one produces exactly its `output_len` tokens.

- `concurrent` (compare.py's default): a small batch of requests all arriving at t=0
  (16 prompts, input and output lengths uniform in [32, 128]). Small enough for a
  laptop CPU (m1, m2 and m3 together in a few minutes on the default model), big enough
  that batching shows: a stage that runs many sequences per step finishes far sooner.
- `latency`: one request at a time, sequentially (default 4 prompts, 128 in, 128 out).
- `throughput`: nano-vllm's offline workload: every prompt arrives at t=0, input and
  output lengths uniform in [100, 1024] (default 256 prompts).
- `online`: Poisson arrivals at `request_rate` requests/s (default 64 prompts, 4 req/s,
  128 in, 128 out); the first request arrives at t=0.
- `prefix`: a shared few-shot prefix (512 tokens) followed by a distinct 32-token
  question, 64 output tokens, all at t=0 (default 32 prompts).
- `chat`: multi-turn conversations (default 16 conversations of 4 turns; a turn is one
  request). Every conversation starts at t=0 and they run side by side; inside one, a
  turn is sent when the turn before it has finished. The first turn's prompt is 256
  random tokens (a system prompt and the first question); each later turn's prompt is the
  previous turn's prompt, the tokens the engine generated for it, then a new user message
  of 64 tokens (`turn_len`). 128 output tokens per turn. The user messages are drawn here,
  from the seed, so every row gets the same ones; the replies are each row's own, so the
  driver (bench/worker.py) builds a later turn's prompt with `turn_prompt` once the turn
  before has finished.

`--input-len` / `--output-len` replace the default lengths with a fixed length N or a
range LO:HI drawn uniformly (for `prefix`, `--input-len` is the question's length; the
prefix is `--prefix-len`; for `chat`, it is the first turn's prompt, and `--turn-len` the
later turns' user messages).

Requests are numbered conversation by conversation (`chat`: request c * turns + t is turn
t of conversation c; the other workloads have one turn per "conversation"). `prompts[i]`
holds the tokens request i brings: its whole prompt, except for a later chat turn, where
it is the new user message that follows the conversation so far. `prompt_lens` gives the
whole prompt lengths (known in advance: every reply has exactly its output length).
"""

import random
from dataclasses import asdict, dataclass

WORKLOADS = ("concurrent", "latency", "throughput", "online", "prefix", "chat")

# workload -> defaults: number of prompts, input and output length ranges (inclusive)
DEFAULTS = {
    "concurrent": dict(num_prompts=16, input_len=(32, 128), output_len=(32, 128)),
    "latency": dict(num_prompts=4, input_len=(128, 128), output_len=(128, 128)),
    "throughput": dict(num_prompts=256, input_len=(100, 1024), output_len=(100, 1024)),
    "online": dict(num_prompts=64, input_len=(128, 128), output_len=(128, 128)),
    "prefix": dict(num_prompts=32, input_len=(32, 32), output_len=(64, 64)),
    "chat": dict(num_prompts=16, input_len=(256, 256), output_len=(128, 128)),  # conversations
}
DEFAULT_REQUEST_RATE = 4.0
DEFAULT_PREFIX_LEN = 512
DEFAULT_TURNS = 4  # chat: turns per conversation
DEFAULT_TURN_LEN = (64, 64)  # chat: a later turn's user message


@dataclass
class Workload:
    name: str
    seed: int
    prompts: list[list[int]]  # token ids
    output_lens: list[int]  # exact number of tokens each request generates
    # seconds after the start (all 0 except `online`); a later chat turn: seconds after
    # the turn before it finished (0)
    arrival_times: list[float]
    input_len: list[int]  # [low, high] the prompt lengths were drawn from
    output_len: list[int]  # [low, high] the output lengths were drawn from
    request_rate: float | None = None
    prefix_len: int = 0  # tokens every prompt shares at its start (`prefix`)
    turns: int = 1  # requests per conversation (`chat`), one after another
    turn_len: list[int] | None = None  # [low, high] of a later chat turn's user message

    @property
    def num_prompts(self) -> int:
        """The number of requests (for `chat`: conversations x turns)."""
        return len(self.prompts)

    @property
    def num_conversations(self) -> int:
        return self.num_prompts // self.turns

    def turn_of(self, i: int) -> int:
        """Request i's turn in its conversation (0 for the first; always 0 unless chat)."""
        return i % self.turns

    def previous(self, i: int) -> int | None:
        """The request that must finish before request i is sent (the turn before it)."""
        return i - 1 if self.turn_of(i) else None

    def next_turn(self, i: int) -> int | None:
        """The request sent once request i has finished (its conversation's next turn)."""
        return i + 1 if self.turn_of(i) + 1 < self.turns else None

    def turn_prompt(self, i: int, previous_prompt: list[int] | None = None,
                    reply: list[int] | None = None) -> list[int]:
        """Request i's whole prompt. A later chat turn: the turn before's prompt, the
        tokens generated for it (`reply`), then this turn's user message."""
        if self.previous(i) is None:
            return list(self.prompts[i])
        if previous_prompt is None or reply is None:
            raise ValueError(f"request {i} is turn {self.turn_of(i)} of a conversation: it "
                             "needs the previous turn's prompt and reply")
        return list(previous_prompt) + list(reply) + list(self.prompts[i])

    @property
    def prompt_lens(self) -> list[int]:
        """Every request's whole prompt length (a chat turn's includes the conversation
        before it: each reply has exactly its output length)."""
        lens: list[int] = []
        for i, p in enumerate(self.prompts):
            before = self.previous(i)
            lens.append(len(p) + (0 if before is None
                                  else lens[before] + self.output_lens[before]))
        return lens

    @property
    def cached_lens(self) -> list[int]:
        """Per request, the prompt tokens whose K/V the turn before it already computed
        (the best a prefix cache can do): a later chat turn's conversation before its
        user message, less the previous reply's last token (sampled, never fed back); 0
        for a first turn (the `prefix` workload's shared prefix is `prefix_len`)."""
        lens = self.prompt_lens
        return [0 if (j := self.previous(i)) is None else lens[j] + self.output_lens[j] - 1
                for i in range(self.num_prompts)]

    @property
    def sequential(self) -> bool:
        """Latency: each request starts only when the one before has finished."""
        return self.name == "latency"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Workload":
        return cls(**d)


def _length_range(value, default: tuple[int, int]) -> tuple[int, int]:
    """None -> the default range; N -> (N, N); (LO, HI) as it is."""
    if value is None:
        return tuple(default)
    if isinstance(value, int):
        return (value, value)
    lo, hi = value
    return (lo, hi)


def build_workload(name: str, vocab_size: int, seed: int = 0, num_prompts: int | None = None,
                   input_len: int | tuple[int, int] | None = None,
                   output_len: int | tuple[int, int] | None = None,
                   request_rate: float | None = None,
                   prefix_len: int | None = None, turns: int | None = None,
                   turn_len: int | tuple[int, int] | None = None) -> Workload:
    """Draw the workload's prompts, lengths and arrival times from `seed` (`chat`: the
    number of conversations is `num_prompts`)."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown {name!r}; choose one of {', '.join(WORKLOADS)}")
    if name != "chat" and (turns is not None or turn_len is not None):
        raise ValueError("turns and turn_len apply to the chat workload only")
    d = DEFAULTS[name]
    n = d["num_prompts"] if num_prompts is None else num_prompts
    in_range = _length_range(input_len, d["input_len"])
    out_range = _length_range(output_len, d["output_len"])
    if n < 1:
        raise ValueError(f"num_prompts: must be >= 1, got {n}")
    for what, (lo, hi) in (("input_len", in_range), ("output_len", out_range)):
        if not 1 <= lo <= hi:
            raise ValueError(f"{what}: need 1 <= low <= high, got {lo}..{hi}")
    rng = random.Random(seed)
    if name == "chat":
        return _build_chat(rng, vocab_size, seed, n, in_range, out_range,
                           DEFAULT_TURNS if turns is None else turns,
                           _length_range(turn_len, DEFAULT_TURN_LEN))
    shared: list[int] = []
    if name == "prefix":
        prefix_len = DEFAULT_PREFIX_LEN if prefix_len is None else prefix_len
        if prefix_len < 1:
            raise ValueError(f"prefix_len: must be >= 1, got {prefix_len}")
        shared = [rng.randrange(vocab_size) for _ in range(prefix_len)]
    else:
        prefix_len = 0
    input_lens = [rng.randint(*in_range) for _ in range(n)]
    output_lens = [rng.randint(*out_range) for _ in range(n)]
    prompts = [shared + [rng.randrange(vocab_size) for _ in range(length)]
               for length in input_lens]
    arrivals = [0.0] * n
    rate = None
    if name == "online":
        rate = DEFAULT_REQUEST_RATE if request_rate is None else request_rate
        if rate <= 0:
            raise ValueError(f"request_rate: must be > 0, got {rate}")
        t = 0.0
        for i in range(1, n):  # exponential gaps: a Poisson process; the first at t=0
            t += rng.expovariate(rate)
            arrivals[i] = t
    return Workload(name=name, seed=seed, prompts=prompts, output_lens=output_lens,
                    arrival_times=arrivals, input_len=list(in_range),
                    output_len=list(out_range), request_rate=rate, prefix_len=prefix_len)


def _build_chat(rng: random.Random, vocab_size: int, seed: int, conversations: int,
                in_range: tuple[int, int], out_range: tuple[int, int], turns: int,
                turn_range: tuple[int, int]) -> Workload:
    """`chat`: per conversation, its first prompt, then each later turn's user message,
    and one output length per turn; requests conversation by conversation."""
    if turns < 1:
        raise ValueError(f"turns: must be >= 1, got {turns}")
    lo, hi = turn_range
    if not 1 <= lo <= hi:
        raise ValueError(f"turn_len: need 1 <= low <= high, got {lo}..{hi}")
    prompts, output_lens = [], []
    for _ in range(conversations):
        for turn in range(turns):
            length = rng.randint(*(in_range if turn == 0 else turn_range))
            prompts.append([rng.randrange(vocab_size) for _ in range(length)])
            output_lens.append(rng.randint(*out_range))
    return Workload(name="chat", seed=seed, prompts=prompts, output_lens=output_lens,
                    arrival_times=[0.0] * len(prompts), input_len=list(in_range),
                    output_len=list(out_range), turns=turns, turn_len=list(turn_range))
