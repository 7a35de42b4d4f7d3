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

`--input-len` / `--output-len` replace the default lengths with a fixed length N or a
range LO:HI drawn uniformly (for `prefix`, `--input-len` is the question's length; the
prefix is `--prefix-len`).
"""

import random
from dataclasses import asdict, dataclass

WORKLOADS = ("concurrent", "latency", "throughput", "online", "prefix")

# workload -> defaults: number of prompts, input and output length ranges (inclusive)
DEFAULTS = {
    "concurrent": dict(num_prompts=16, input_len=(32, 128), output_len=(32, 128)),
    "latency": dict(num_prompts=4, input_len=(128, 128), output_len=(128, 128)),
    "throughput": dict(num_prompts=256, input_len=(100, 1024), output_len=(100, 1024)),
    "online": dict(num_prompts=64, input_len=(128, 128), output_len=(128, 128)),
    "prefix": dict(num_prompts=32, input_len=(32, 32), output_len=(64, 64)),
}
DEFAULT_REQUEST_RATE = 4.0
DEFAULT_PREFIX_LEN = 512


@dataclass
class Workload:
    name: str
    seed: int
    prompts: list[list[int]]  # token ids
    output_lens: list[int]  # exact number of tokens each request generates
    arrival_times: list[float]  # seconds after the start (all 0 except `online`)
    input_len: list[int]  # [low, high] the prompt lengths were drawn from
    output_len: list[int]  # [low, high] the output lengths were drawn from
    request_rate: float | None = None
    prefix_len: int = 0  # tokens every prompt shares at its start (`prefix`)

    @property
    def num_prompts(self) -> int:
        return len(self.prompts)

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
                   prefix_len: int | None = None) -> Workload:
    """Draw the workload's prompts, lengths and arrival times from `seed`."""
    if name not in WORKLOADS:
        raise ValueError(f"workload: unknown {name!r}; choose one of {', '.join(WORKLOADS)}")
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
