"""The sampler: turns each row of logits into one next token.

Per row, in this order: penalties (repetition over prompt and output, presence and
frequency over the output), min_tokens (EOS and stop tokens masked), then greedy argmax
for temperature 0, or temperature -> top-k -> top-p -> min-p -> a random draw: the
exponential race (argmax of p / E, E ~ Exp(1)) picks token i with probability p_i and
lets seeded and unseeded rows share one batched argmax. `token_logprobs` gives vLLM's
`logprobs` / `prompt_logprobs`: log-probabilities of the model's raw distribution.

Introduced in M1; changed in M4 (per-row parameters come as kept `SamplingTensors`;
logits in the model's dtype, fp32 only where sampling computes).
"""

from dataclasses import dataclass

import torch
from torch import nn

from ...sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's sampling inputs."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None  # a per-request generator when params.seed is set
    blocked_token_ids: list[int]  # masked while fewer than min_tokens are out


@dataclass
class SamplingTensors:
    """The step's per-row sampling parameters as tensors [B] on the logits' device."""

    temperature: torch.Tensor  # 1.0 for greedy rows (their draw is not used)
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    is_greedy: torch.Tensor
    all_greedy: bool  # known on the host: then nothing above is needed

    @classmethod
    def from_params(cls, params: list[SamplingParams], device) -> "SamplingTensors":
        """Built from scratch (tests, profiling); the worker gathers its kept copies."""
        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)
        return cls(tensor([p.temperature or 1.0 for p in params]),
                   tensor([p.top_k for p in params], torch.long),
                   tensor([p.top_p for p in params]), tensor([p.min_p for p in params]),
                   tensor([p.greedy for p in params], torch.bool),
                   all(p.greedy for p in params))


def reads_history(params: SamplingParams) -> bool:
    """Whether sampling this row reads its tokens so far (penalties, min_tokens)."""
    return (params.repetition_penalty != 1.0 or bool(params.presence_penalty)
            or bool(params.frequency_penalty) or params.min_tokens > 0)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The rows' penalties, in fp32 (the logits come in the model's dtype)."""
    for i, row in enumerate(rows):
        p = row.params
        if p.repetition_penalty != 1.0:
            logits = logits.float()  # a copy from bf16, itself once fp32
            seen = torch.tensor(sorted(set(row.prompt_token_ids + row.output_token_ids)),
                                device=logits.device, dtype=torch.long)
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / p.repetition_penalty,
                                          values * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and row.output_token_ids:
            logits = logits.float()
            out = torch.tensor(row.output_token_ids, device=logits.device, dtype=torch.long)
            counts = torch.zeros_like(logits[i]).scatter_add_(0, out, torch.ones_like(out, dtype=logits.dtype))
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


def apply_min_tokens(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        if len(row.output_token_ids) < row.params.min_tokens and row.blocked_token_ids:
            logits[i, row.blocked_token_ids] = float("-inf")
    return logits


def top_k_mask(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k largest logits (top_k[i] <= 0 keeps all)."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1).unsqueeze(-1))
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_mask(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
    # top_p = 1 keeps every token: the summed mass can round to 1 before the last ones
    drop_sorted = (mass_before >= top_p.unsqueeze(-1)) & (top_p < 1).unsqueeze(-1)
    drop_sorted[:, 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_mask(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely one's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.unsqueeze(-1) * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                   num_top: int) -> list[dict[int, tuple[float, int]]]:
    """Per row: token id -> (log-probability, rank) for `token_ids[i]` and for the
    `num_top` most likely tokens; rank 1 is the most likely."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, token_ids.view(-1, 1).long())
    ranks = (logprobs > chosen).sum(dim=-1) + 1
    top = logprobs.topk(num_top, dim=-1) if num_top > 0 else None
    rows = []
    for i, (token, logprob, rank) in enumerate(zip(token_ids.tolist(), chosen.view(-1).tolist(),
                                                   ranks.tolist())):
        row = {token: (logprob, rank)}
        if top is not None:
            for r, (value, top_token) in enumerate(zip(top.values[i].tolist(),
                                                       top.indices[i].tolist())):
                row.setdefault(top_token, (value, r + 1))
        rows.append(row)
    return rows


class Sampler(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self.generator: torch.Generator | None = None  # for rows without their own seed

    def forward(self, logits: torch.Tensor, rows: list[SamplingRow],
                tensors: SamplingTensors | None = None) -> torch.Tensor:
        """logits: [B, vocab] in the model's dtype -> next token ids [B]. The greedy
        argmax reads them as they are (bf16 -> fp32 is exact: no order changes); penalties
        and sampling work in fp32."""
        if tensors is None:
            tensors = SamplingTensors.from_params([row.params for row in rows], logits.device)
        logits = apply_min_tokens(apply_penalties(logits, rows), rows)
        greedy = logits.argmax(dim=-1)
        if tensors.all_greedy:
            return greedy
        logits = logits.float() / tensors.temperature.unsqueeze(-1)
        logits = top_k_mask(logits, tensors.top_k)
        logits = top_p_mask(logits, tensors.top_p)
        logits = min_p_mask(logits, tensors.min_p)
        sampled = (logits.softmax(dim=-1) / self._exponential_noise(logits, rows)).argmax(dim=-1)
        return torch.where(tensors.is_greedy, greedy, sampled)

    def _exponential_noise(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(logits.device).manual_seed(self.seed)
        noise = torch.empty_like(logits).exponential_(generator=self.generator)
        for i, row in enumerate(rows):
            if row.generator is not None:
                noise[i].exponential_(generator=row.generator)
        return noise
