"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

Each request gets its own contiguous cache, one (K, V) pair per layer of shape [max_len,
kv_heads, head_dim], allocated once for the longest the sequence can grow (prompt +
max_tokens) and freed when it finishes. A prefill writes the prompt's keys and values
into it; each decode step then runs the model on one token only. The engine says which
sequence runs; the runner computes its tokens from `num_computed_tokens` on and samples
the next one.

Introduced in M0; changed in M1 (the KV cache, sampling).
"""

from dataclasses import dataclass

import torch

from ..attention.layer import AttentionMetadata
from ..config import EngineConfig, ModelConfig
from ..model_executor.layers.sampler import Sampler, SamplingRow, token_logprobs
from ..model_executor.model_loader import load_model
from ..request import Sequence

# Log-probabilities of one position: token id -> (log-probability, rank); 1 = most likely.
PositionLogprobs = dict[int, tuple[float, int]]


@dataclass
class ModelRunnerOutput:
    """Per sequence that ran, in order: its sampled token, and log-probabilities where its
    sampling parameters ask for them (else None)."""

    sampled_token_ids: list[int]
    logprobs: list[PositionLogprobs | None]  # of the sampled token (and the top ones)
    prompt_logprobs: list[list[PositionLogprobs] | None]  # of new tokens 1 .. n - 1


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but torch sees no GPU")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        self.config, self.model_config = config, model_config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        if self.device.type == "cuda":
            # cuDNN's attention builds a plan for every new shape, and decode changes the
            # key length every step: planning then costs more than the attention itself.
            torch.backends.cuda.enable_cudnn_sdp(False)
        self.model = load_model(config.model, model_config, self.dtype, self.device,
                                seed=config.seed)
        self.sampler = Sampler(seed=config.seed)
        self.kv_caches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def allocate_kv_cache(self, seq: Sequence, max_len: int) -> None:
        """One contiguous (K, V) pair per layer, big enough for `max_len` tokens."""
        mc = self.model_config
        shape = (max_len, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches[seq.seq_id] = [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(mc.num_hidden_layers)
        ]

    def free_kv_cache(self, seq: Sequence) -> None:
        self.kv_caches.pop(seq.seq_id, None)

    def kv_cache_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize

    @torch.inference_mode()
    def forward(self, seq: Sequence, start_pos: int) -> torch.Tensor:
        """Run the tokens of `seq` from `start_pos` on; logits [T, vocab] (float32)."""
        token_ids = seq.token_ids[start_pos:]
        input_ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.arange(start_pos, start_pos + len(token_ids), device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches[seq.seq_id],
                            AttentionMetadata(start_pos=start_pos))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def execute_model(self, seq: Sequence, sampling_row: SamplingRow) -> ModelRunnerOutput:
        """Prefill (nothing cached yet) or decode one step, then sample the next token."""
        start = seq.num_computed_tokens
        logits = self.forward(seq, start)
        params = sampling_row.params
        # The sampler edits its input: keep the raw logits when log-probabilities are asked for.
        raw_logits = logits[-1:].clone() if params.logprobs is not None else None
        token = self.sampler(logits[-1:], [sampling_row])
        logprobs = (None if raw_logits is None
                    else token_logprobs(raw_logits, token, params.logprobs)[0])
        prompt_logprobs = None
        if params.prompt_logprobs is not None and start == 0:
            targets = torch.tensor(seq.token_ids[1:], device=logits.device)
            prompt_logprobs = token_logprobs(logits[:-1], targets, params.prompt_logprobs)
        return ModelRunnerOutput([int(token[0])], [logprobs], [prompt_logprobs])
