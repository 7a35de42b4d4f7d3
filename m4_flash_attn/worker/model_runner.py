"""The model runner: puts the model on the device, owns the KV cache, runs forward passes.

The cache is allocated once: per layer a (K, V) pair [num_blocks, block_size, kv_heads,
head_dim], as many blocks as `kv_cache_memory` holds (CUDA: what `gpu_memory_utilization`
leaves after the weights, a profiling step and the CUDA graphs' pool; CPU: 1 GiB). Each
step, `execute_model` takes the scheduler's plain ints, has `InputBatch` flatten them,
runs the model once on the chosen attention backend (on CUDA the Triton kernels,
replaying the CUDA graph of the step's padded size), and samples a token for each
sequence whose new tokens end at its last one, with the rows `InputBatch` keeps.

Introduced in M0; changed in M1 (KV cache, sampling), M2 (batches), M3 (paged cache), M4
(attention backends, CUDA graphs).
"""

import itertools
import os

from dataclasses import dataclass

import torch

from ..attention.backends.torch_ref import build_metadata as build_attn_metadata
from ..attention.layer import set_attention_backend
from ..attention.metadata import AttentionMetadata
from ..config import EngineConfig, ModelConfig
from ..model_executor.layers.sampler import (Sampler, SamplingRow, reads_history,
                                               token_logprobs)
from ..model_executor.model_loader import load_model
from ..sampling_params import SamplingParams
from ..utils import cdiv
from .cuda_graph import StepGraphs, graph_token_sizes, padded_size
from .input_batch import InputBatch, ModelInputs, prepare_inputs

DEFAULT_CPU_KV_CACHE_MEMORY = 2**30  # bytes, when kv_cache_memory is None on a CPU

# Log-probabilities of one position: token id -> (log-probability, rank); 1 = most likely.
PositionLogprobs = dict[int, tuple[float, int]]


@dataclass
class ModelRunnerOutput:
    """Per sequence that ran, in order: its sampled token (None where its new tokens
    stop before its last token), and log-probabilities where its sampling parameters ask
    for them (else None)."""

    sampled_token_ids: list[int | None]  # None: new tokens that stop inside the prompt
    logprobs: list[PositionLogprobs | None]  # of the sampled token (and the top ones)
    # of new tokens 1 .. n - 1, and of the next_token_id after them if any; [] if none
    prompt_logprobs: list[list[PositionLogprobs] | None]


@dataclass
class LaunchedStep:
    """A step queued on the device. `result()` waits for its sampled tokens only (a
    step launched after it runs on), adds them to their rows' histories and returns the
    step's output."""

    sampled: list[int]  # which of its sequences sample
    rows: list[SamplingRow]  # their sampling rows
    tokens: torch.Tensor | None  # [len(sampled)] on the host, once `ready`
    ready: torch.cuda.Event | None  # None: on the CPU, the tokens are there
    logprobs: list  # as in ModelRunnerOutput
    prompt_logprobs: list
    output: ModelRunnerOutput | None = None

    def result(self) -> ModelRunnerOutput:
        if self.output is None:
            if self.ready is not None:
                self.ready.synchronize()
            values = [] if self.tokens is None else self.tokens.tolist()
            tokens: list[int | None] = [None] * len(self.logprobs)
            for i, token in zip(self.sampled, values):
                tokens[i] = token
            InputBatch.append_sampled(self.rows, values)
            self.output = ModelRunnerOutput(tokens, self.logprobs, self.prompt_logprobs)
        return self.output


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' was asked for, but torch sees no GPU")
    return torch.device(device)


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """auto: the Triton kernels on CUDA, the torch reference on the CPU. The kernels run
    on the CPU only under Triton's interpreter (slow; for tests)."""
    if name == "auto":
        return "flash" if device.type == "cuda" else "torch"
    if name == "flash" and device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1" \
            and torch.cuda.is_available():
        raise ValueError("attention_backend: 'flash' on the CPU runs Triton's interpreter; "
                         "set TRITON_INTERPRET=1 before starting Python, or use 'torch'")
    return name


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
        self.attention_backend = resolve_attention_backend(config.attention_backend,
                                                           self.device)
        set_attention_backend(self.model, self.attention_backend)
        self.sampler = Sampler(seed=config.seed)
        self.block_size = config.block_size
        self.input_batch = InputBatch(config.max_batch_size, config.max_step_tokens,
                                      cdiv(config.max_model_len, self.block_size),
                                      self.block_size, self.device)
        # On CUDA with the kernels, a step is padded to one of a few sizes (tokens), and
        # each size is captured as a CUDA graph (unless enforce_eager): graphs need a GPU,
        # and attention that reads its metadata on the device.
        on_gpu_kernels = self.device.type == "cuda" and self.attention_backend == "flash"
        self.graph_sizes = graph_token_sizes(config.max_graph_tokens, config.max_batch_size) \
            if on_gpu_kernels else []
        self.graphs = StepGraphs(self.graph_sizes, config.max_batch_size) if on_gpu_kernels \
            and not config.enforce_eager else None
        self.launched: list[LaunchedStep] = []  # the last two steps queued, oldest first
        self.num_kv_blocks = self._count_kv_blocks()
        self.kv_caches = self.allocate_kv_cache(self.num_kv_blocks)
        if self.graphs is not None:
            self._empty_step_buffers()
            self.graphs.capture(self._run_padded)

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
        of the most tokens a step holds (`max_step_tokens`: the budget, or one whole
        max_model_len prompt), and a sampler over max_batch_size rows of logits; and, when
        CUDA graphs will be captured, the memory of their pool: what the largest graph's
        step allocates."""
        cfg = self.config
        num_tokens = min(cfg.max_step_tokens, max(cfg.max_num_batched_tokens,
                                                  cfg.max_model_len - 1))
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
        graph_pool = self._profile_graphs() if self.graphs is not None else 0
        self.kv_caches = None
        self.sampler.generator = None  # sampling starts from its seed, as without profiling
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        return int(total * cfg.gpu_memory_utilization) - (total - free) - peak - graph_pool

    def _profile_graphs(self) -> int:
        """Peak memory of a step of the largest graph's size: the graphs' pool keeps that
        much for good (eager steps cannot reuse it)."""
        self._empty_step_buffers()
        torch.cuda.synchronize(self.device)
        start = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self._run_padded(max(self.graph_sizes), decodes_only=False)
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device) - start

    def _empty_step_buffers(self) -> None:
        """Buffers that make a step harmless: it writes nowhere, its sequences have no
        new token and read no keys."""
        self.input_batch.gpu.slot_mapping.fill_(-1)
        self.input_batch.gpu.query_start_loc.zero_()
        self.input_batch.gpu.seq_lens.zero_()

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

    def describe(self) -> dict:
        """How steps run, for the demo: the attention backend and the CUDA graphs (M4)."""
        g = self.graphs
        info = {"attention_backend": self.attention_backend, "cuda_graphs": None if g is None
                else {"max_tokens": g.token_sizes[-1], "num_graphs": len(g.graphs),
                      "num_sizes": len(g.token_sizes), "capture_seconds": g.capture_seconds,
                      "memory_bytes": g.memory_bytes}}
        return info

    def kv_cache_bytes_per_token(self) -> int:
        mc = self.model_config
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * itemsize

    def _run_model(self, inputs: ModelInputs) -> torch.Tensor:
        """Hidden states [T, hidden] of every token of the batch; their K/V go to the cache."""
        mc = self.model_config
        attn_metadata = inputs.attn_metadata  # the flash kernels take it as it is
        if self.attention_backend == "torch":
            attn_metadata = build_attn_metadata(attn_metadata, self.block_size,
                                                mc.num_attention_heads // mc.num_key_value_heads)
        return self.model(inputs.input_ids, inputs.positions, self.kv_caches, attn_metadata)

    def _padded_shape(self, num_tokens: int) -> tuple[int, int] | None:
        """(tokens, sequences) of the captured size that holds a step of num_tokens
        tokens, or None where there is none (steps then run as they are)."""
        size = padded_size(self.graph_sizes, num_tokens)
        return None if size is None else (size, min(size, self.config.max_batch_size))

    def _run_padded(self, num_tokens: int, decodes_only: bool) -> torch.Tensor:
        """Hidden states [num_tokens, hidden] of a step of a captured size, read from the
        device buffers as they are: what a CUDA graph records and replays. A step of
        decodes only runs the decode kernel alone."""
        g = self.input_batch.gpu
        num_seqs = min(num_tokens, self.config.max_batch_size)
        metadata = AttentionMetadata(
            query_start_loc=g.query_start_loc[:num_seqs + 1], seq_lens=g.seq_lens[:num_seqs],
            block_tables=g.block_tables[:num_seqs], slot_mapping=g.slot_mapping[:num_tokens],
            max_query_len=1 if decodes_only else num_tokens,
            max_seq_len=self.config.max_model_len)
        return self.model(g.input_ids[:num_tokens], g.positions[:num_tokens], self.kv_caches,
                          metadata)

    def _logits_for_step(self, scheduled
                         ) -> tuple[torch.Tensor, list[int], torch.Tensor, ModelInputs]:
        """(logits [S, vocab] of the last new token of each sequence that samples, the
        indices of those S sequences, hidden states of the whole batch, the inputs). A
        step is padded to a captured size and replays its CUDA graph (or, eager, runs the
        same padded shapes)."""
        shape = self._padded_shape(sum(len(s.new_token_ids) for s in scheduled))
        inputs = self.input_batch.prepare(scheduled, pad_to=shape)
        if shape is not None and self.graphs is not None:
            hidden = self.graphs.replay(shape[0], inputs.attn_metadata.max_query_len == 1)
        else:
            hidden = self._run_model(inputs)
        # only the sequences that sample (not new tokens that stop inside the prompt)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits, self.input_batch.sampled, hidden, inputs

    def execute_model(self, scheduler_output) -> ModelRunnerOutput:
        """Run one step in one forward pass, then sample one token for each sequence
        whose new tokens end at its last one (not where they stop inside the prompt)."""
        return self.launch_model(scheduler_output).result()

    @torch.inference_mode()
    def launch_model(self, scheduler_output) -> "LaunchedStep":
        """Queue one step on the device (forward pass and sampling) and return without
        waiting for it: the host can schedule the next step meanwhile. Sampling that reads
        a sequence's history (penalties, min_tokens) first waits for the step before,
        whose tokens are not in the histories until then; log-probabilities are read
        back at once."""
        if len(self.launched) == 2:
            self.launched.pop(0).result()  # its host buffers are about to be reused
        try:
            step, new_tokens = self._launch(scheduler_output)
        except BaseException:
            if self.device.type == "cuda":  # copies from its host buffers may be running:
                torch.cuda.synchronize(self.device)  # they end before the buffers are reused
            raise
        self.input_batch.commit_step(new_tokens)
        self.launched.append(step)
        return step

    def _launch(self, scheduler_output) -> tuple["LaunchedStep", torch.Tensor | None]:
        """The step queued on the device, and its sampled tokens there (None: none)."""
        scheduled = scheduler_output.scheduled
        self.input_batch.update(scheduler_output)
        logits, sampled, hidden, inputs = self._logits_for_step(scheduled)
        sampling_rows = self.input_batch.step_sampling_rows(scheduled)
        rows = [sampling_rows[i] for i in sampled]
        if any(reads_history(row.params) for row in rows) and self.launched:
            self.launched[-1].result()
        new_tokens, host_tokens, ready = None, None, None
        logprobs: list[PositionLogprobs | None] = [None] * len(scheduled)
        if rows:
            wants_logprobs = [row.params.logprobs is not None for row in rows]
            raw_logits = logits.clone() if any(wants_logprobs) else None  # the sampler edits
            new_tokens = self.sampler(logits, rows, self.input_batch.sampling_tensors())
            host_tokens = self.input_batch.tokens_to_host(new_tokens)
            if self.device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()
            if raw_logits is not None:  # a row asks for log-probabilities
                for j, (i, row, wants) in enumerate(zip(sampled, rows, wants_logprobs)):
                    if wants:
                        logprobs[i] = token_logprobs(raw_logits[j:j + 1], new_tokens[j:j + 1],
                                                     row.params.logprobs)[0]
        return LaunchedStep(sampled, rows, host_tokens, ready, logprobs,
                            self._prompt_logprobs(hidden, inputs, scheduled,
                                                  sampling_rows)), new_tokens

    def _prompt_logprobs(self, hidden: torch.Tensor, inputs: ModelInputs, scheduled,
                         sampling_rows: list[SamplingRow]) -> list:
        """For a sequence whose parameters ask for prompt_logprobs: how likely each token
        after its first new one was (and of `next_token_id`, the one after them, where
        they stop inside the prompt), given the tokens before it. The engine keeps those
        of the prompt."""
        result = []
        starts = list(itertools.accumulate((len(s.new_token_ids) for s in scheduled),
                                           initial=0))  # on the host: no copy back
        for i, (s, row) in enumerate(zip(scheduled, sampling_rows)):
            num_top = row.params.prompt_logprobs
            if num_top is None:
                result.append(None)
                continue
            targets = s.new_token_ids[1:] + ([] if s.next_token_id is None
                                             else [s.next_token_id])
            if not targets:
                result.append([])
                continue
            logits = self.model.compute_logits(hidden[starts[i]:starts[i] + len(targets)])
            result.append(token_logprobs(logits, torch.tensor(targets, device=logits.device),
                                         num_top))
        return result
