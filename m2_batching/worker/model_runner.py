"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

The KV cache is allocated once, at start: per layer a (K, V) pair of shape [num_slots,
max_model_len, kv_heads, head_dim], one slot for each sequence that may run at once (to
attention a slot is a block of max_model_len tokens). Each step, `execute_model` takes
the scheduler's output (plain ints: per sequence its new tokens, where they start, its
slot), lets `InputBatch` flatten it into one batch, runs the model once, and samples one
token per sequence from the logits of its last new token, with the sampling rows the
`InputBatch` keeps.

Introduced in M0; changed in M1 (KV cache, sampling), M2 (a batch of sequences per step).
"""

from dataclasses import dataclass

import torch

from ..attention.backends.torch_ref import build_metadata as build_attn_metadata
from ..config import EngineConfig, ModelConfig
from ..model_executor.layers.sampler import Sampler, SamplingRow, token_logprobs
from ..model_executor.model_loader import load_model
from .input_batch import InputBatch, ModelInputs

DEFAULT_CPU_KV_CACHE_MEMORY = 2**30  # bytes, when kv_cache_memory is None on a CPU

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
        self.block_size = config.max_model_len  # a slot: one block of max_model_len tokens
        self.input_batch = InputBatch(self.block_size, self.device)
        self.num_kv_slots = self._count_kv_slots()
        self.kv_caches = self.allocate_kv_cache(self.num_kv_slots)

    def _count_kv_slots(self) -> int:
        """max_batch_size slots, or fewer if the memory budget cannot hold them."""
        cfg = self.config
        slot_bytes = self.kv_cache_bytes_per_token() * cfg.max_model_len
        if cfg.kv_cache_memory is not None:
            num_slots = min(cfg.max_batch_size, cfg.kv_cache_memory // slot_bytes)
            if num_slots < 1:
                raise ValueError(
                    f"kv_cache_memory: {cfg.kv_cache_memory} bytes cannot hold one KV slot "
                    f"of max_model_len={cfg.max_model_len} tokens ({slot_bytes} bytes); "
                    "raise kv_cache_memory or lower max_model_len")
            return num_slots
        if self.device.type == "cuda":
            budget = int(torch.cuda.mem_get_info(self.device)[0] * 0.9)
        else:
            budget = DEFAULT_CPU_KV_CACHE_MEMORY
        return max(1, min(cfg.max_batch_size, budget // slot_bytes))

    def allocate_kv_cache(self, num_slots: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) pair per layer, [num_slots, max_model_len, kv_heads, head_dim] each.

        Left uninitialized: attention reads only positions a sequence has written."""
        mc = self.model_config
        shape = (num_slots, self.block_size, mc.num_key_value_heads, mc.head_dim)
        return [
            (torch.empty(shape, dtype=self.dtype, device=self.device),
             torch.empty(shape, dtype=self.dtype, device=self.device))
            for _ in range(mc.num_hidden_layers)
        ]

    def kv_cache_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize

    def _run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the batch; their K/V go to the cache."""
        mc = self.model_config
        attn_metadata = build_attn_metadata(inputs.attn_metadata, self.block_size,
                                            mc.num_attention_heads // mc.num_key_value_heads)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, attn_metadata)

    @torch.inference_mode()
    def execute_model(self, scheduler_output) -> ModelRunnerOutput:
        """Run one step in one forward pass, then sample one token for each sequence."""
        scheduled = scheduler_output.scheduled
        sampling_rows = self.input_batch.update(scheduler_output)
        inputs = self.input_batch.prepare(scheduled)
        hidden = self._run_model(inputs)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        wants_logprobs = [row.params.logprobs is not None for row in sampling_rows]
        raw_logits = logits.clone() if any(wants_logprobs) else None  # the sampler edits
        tokens = self.sampler(logits, sampling_rows)
        logprobs = [token_logprobs(raw_logits[i:i + 1], tokens[i:i + 1], row.params.logprobs)[0]
                    if wants else None
                    for i, (row, wants) in enumerate(zip(sampling_rows, wants_logprobs))]
        prompt_logprobs = self._prompt_logprobs(hidden, inputs, scheduled, sampling_rows)
        tokens = tokens.tolist()
        self.input_batch.append_sampled(sampling_rows, tokens)
        return ModelRunnerOutput(tokens, logprobs, prompt_logprobs)

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs, scheduled,
                         sampling_rows: list[SamplingRow]) -> list:
        """For a sequence whose prompt starts in this step and whose parameters ask for
        prompt_logprobs: how likely each of its new tokens after the first was."""
        result = []
        starts = inputs.attn_metadata.query_start_loc.tolist()
        for i, (s, row) in enumerate(zip(scheduled, sampling_rows)):
            num_top = row.params.prompt_logprobs
            if num_top is None or s.num_computed_tokens != 0:
                result.append(None)
                continue
            logits = self.model.compute_logits(hidden[starts[i]:starts[i + 1] - 1])
            targets = torch.tensor(s.new_token_ids[1:], device=logits.device)
            result.append(token_logprobs(logits, targets, num_top))
        return result
