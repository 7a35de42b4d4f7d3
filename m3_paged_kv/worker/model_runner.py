"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

The cache is allocated once, at start: per layer a (K, V) pair of shape [num_blocks,
block_size, kv_heads, head_dim]. `num_blocks` fills a memory budget: `kv_cache_memory`
bytes if given, else on CUDA what `gpu_memory_utilization` of the card leaves after the
weights and a profiling forward pass, and 1 GiB on the CPU. Each step, `execute_model`
takes the scheduler's output (plain ints: per sequence its new tokens, where they start,
its block ids), lets `InputBatch` flatten it into one batch, runs the model once, and
samples one token per sequence with the sampling rows the `InputBatch` keeps.

Introduced in M0; changed in M1 (KV cache, sampling), M2 (a batch of sequences per
step), M3 (a paged cache sized by a memory budget).
"""

from dataclasses import dataclass

import torch

from ..attention.backends.torch_ref import build_metadata as build_attn_metadata
from ..config import EngineConfig, ModelConfig
from ..model_executor.layers.sampler import Sampler, SamplingRow, token_logprobs
from ..model_executor.model_loader import load_model
from ..sampling_params import SamplingParams
from ..utils import cdiv
from .input_batch import InputBatch, ModelInputs, prepare_inputs

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
        self.block_size = config.block_size
        self.input_batch = InputBatch(self.block_size, self.device)
        self.num_kv_blocks = self._count_kv_blocks()
        self.kv_caches = self.allocate_kv_cache(self.num_kv_blocks)

    def _count_kv_blocks(self) -> int:
        """As many blocks as the memory budget holds."""
        cfg = self.config
        block_bytes = self.kv_cache_bytes_per_token() * cfg.block_size
        if cfg.kv_cache_memory is not None:
            budget, name = cfg.kv_cache_memory, "kv_cache_memory"
        elif self.device.type == "cuda":
            budget, name = self._profile_free_memory(), "gpu_memory_utilization"
        else:
            budget, name = DEFAULT_CPU_KV_CACHE_MEMORY, "kv_cache_memory"
        num_blocks = budget // block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"{name}: leaves {budget} bytes for the KV cache, less than one block of "
                f"{cfg.block_size} tokens ({block_bytes} bytes); give the cache more memory")
        return num_blocks

    @torch.inference_mode()
    def _profile_free_memory(self) -> int:
        """Bytes for the KV cache on CUDA: gpu_memory_utilization of the card, less what is
        in use now (weights, other processes) and the peak of the largest step: a prefill
        of max_num_batched_tokens tokens (or of one max_model_len prompt), and a sampler
        over max_batch_size rows of logits."""
        cfg = self.config
        num_tokens = max(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
        lengths = [min(cfg.max_model_len - 1, num_tokens - i)
                   for i in range(0, num_tokens, cfg.max_model_len - 1)]
        blocks_per_seq = cdiv(cfg.max_model_len, self.block_size)
        self.kv_caches = self.allocate_kv_cache(blocks_per_seq * len(lengths))
        block_ids = [list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
                     for i in range(len(lengths))]
        inputs = prepare_inputs([[0] * n for n in lengths], [0] * len(lengths), block_ids,
                                self.block_size, self.device)
        torch.cuda.synchronize(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.model.compute_logits(self._run_model(inputs)[inputs.logits_indices])
        hidden = torch.zeros(cfg.max_batch_size, self.model_config.hidden_size,
                             dtype=self.dtype, device=self.device)
        params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, min_p=0.01)
        rows = [SamplingRow(params, [0], [], None, []) for _ in range(cfg.max_batch_size)]
        self.sampler(self.model.compute_logits(hidden), rows)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        self.kv_caches = None
        self.sampler.generator = None  # sampling starts from its seed, as without profiling
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * cfg.gpu_memory_utilization) - (total - free) - peak

    def allocate_kv_cache(self, num_blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (K, V) pair per layer, [num_blocks, block_size, kv_heads, head_dim] each.

        Left uninitialized: attention reads only slots a sequence has written."""
        mc = self.model_config
        shape = (num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
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
