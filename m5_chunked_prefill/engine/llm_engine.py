"""The engine: takes requests, and on each `step` advances many of them by one token.

Requests go to the scheduler's waiting queue. A step is three calls: the scheduler says
what runs, the model runner runs it in one forward pass and samples, and the scheduler's
`update_from_output` applies the results (tokens, stop rules, finishing). The engine
then turns the sequences that advanced into outputs. New requests may be added, and
any aborted, between two steps. A prompt that could not fit in the whole KV cache is
refused at `add_request`, and no sequence grows past what the cache holds.

Introduced in M1; changed in M2 (a scheduler picks many sequences per step), M3 (the
cache's size caps a sequence's length).
"""

import itertools
import time
import warnings

from ..config import EngineConfig
from ..core.sched.scheduler import Scheduler
from ..core.sched.stop_checker import StopChecker
from ..model_executor.model_loader import load_model_config, resolve_model_path
from ..outputs import RequestMetrics, RequestOutput
from ..request import Request, Sequence
from ..sampling_params import SamplingParams
from ..tokenizer import get_tokenizer
from ..utils import cdiv
from ..worker.model_runner import ModelRunner
from .input_processor import check_sampling_params, encode_prompt
from .output_processor import make_output


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        model_config = load_model_config(config.model)
        self.config = config = config.resolve(model_config)  # a resolved copy
        self.model_runner = ModelRunner(config, model_config)
        self.vocab_size = model_config.vocab_size
        self.tokenizer = get_tokenizer(resolve_model_path(config.model), self.vocab_size,
                                       model_config.eos_token_ids[0]
                                       if model_config.eos_token_ids else None)
        tokenizer_eos = getattr(self.tokenizer, "eos_token_id", None)
        self.eos_token_ids = sorted(set(model_config.eos_token_ids) | (
            {tokenizer_eos} if tokenizer_eos is not None else set()))
        # No sequence can hold more tokens than the whole cache: that caps its length too.
        self.longest_sequence = min(config.max_model_len,
                                    self.model_runner.num_kv_blocks * config.block_size)
        if self.longest_sequence < config.max_model_len:
            warnings.warn(f"the KV cache holds {self.longest_sequence} tokens, fewer than "
                          f"max_model_len={config.max_model_len}: longer sequences stop there")
        self.scheduler = Scheduler(config, self.model_runner.num_kv_blocks,
                                   StopChecker(self.tokenizer, self.eos_token_ids,
                                               self.longest_sequence))
        self.requests: dict[str, Request] = {}
        self.sequences: dict[str, Sequence] = {}
        self.undelivered: dict[str, RequestOutput] = {}  # see `hold_outputs`
        self._seq_ids = itertools.count()

    # -- requests in ------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        """Token ids for a prompt, checked: not empty, in the vocabulary, short enough."""
        token_ids = encode_prompt(prompt, self.tokenizer, self.vocab_size)
        if len(token_ids) >= self.config.max_model_len:
            raise ValueError(f"prompt: {len(token_ids)} tokens leave no room to generate "
                             f"within max_model_len={self.config.max_model_len}")
        return token_ids

    def add_request(self, request_id: str, prompt: str | list[int],
                    sampling_params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        params = check_sampling_params(sampling_params, self.vocab_size)
        token_ids = self.encode(prompt)
        if len(token_ids) + 1 > self.longest_sequence:
            raise ValueError(
                f"prompt: {len(token_ids)} tokens and one to generate need "
                f"{cdiv(len(token_ids) + 1, self.config.block_size)} KV cache blocks of "
                f"{self.config.block_size} tokens, but the whole cache has "
                f"{self.model_runner.num_kv_blocks}; raise kv_cache_memory (or "
                "gpu_memory_utilization) or shorten the prompt")
        request = Request(request_id, prompt if isinstance(prompt, str) else None, params,
                          arrival_time if arrival_time is not None else time.perf_counter(),
                          prompt_token_ids=list(token_ids))
        seq = Sequence(next(self._seq_ids), request_id, list(token_ids), params,
                       metrics=RequestMetrics(arrival_time=request.arrival_time))
        self.requests[request_id] = request
        self.sequences[request_id] = seq
        self.scheduler.add_sequence(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a waiting or running request; its KV blocks are freed, no output follows."""
        self.undelivered.pop(request_id, None)
        seq = self.sequences.get(request_id)
        if seq is None or seq.status.is_finished:
            return
        self.scheduler.abort(seq)
        self._forget(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or waits, or an output waits to be returned."""
        return bool(self.undelivered) or self.scheduler.has_unfinished()

    def kv_cache_stats(self) -> dict:
        """How much of the KV cache is reserved (in held blocks), and how much holds tokens."""
        s, kv = self.scheduler, self.scheduler.kv_cache_manager
        capacity = kv.num_blocks * kv.block_size
        return {"kind": "paged", "num_blocks": kv.num_blocks, "block_size": kv.block_size,
                "kv_cache_bytes": capacity * self.model_runner.kv_cache_bytes_per_token(),
                "capacity_token_slots": capacity,
                "reserved_token_slots": s.reserved_token_slots,
                "reserved_token_slots_peak": s.reserved_token_slots_peak,
                "used_token_slots": s.used_token_slots,
                "used_token_slots_peak": s.used_token_slots_peak,
                "max_concurrent_seqs": s.max_concurrent_seqs,
                "num_preemptions": s.num_preemptions}

    def describe_runner(self) -> dict:
        """How the model runner runs steps (attention backend, CUDA graphs), for the demo."""
        return self.model_runner.describe()

    def reset_stats(self) -> None:
        """Start kv_cache_stats()'s peaks over from now, e.g. after an untimed warm-up."""
        self.scheduler.reset_stats()

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for each sequence that advanced (and
        any that `hold_outputs` kept for this call)."""
        outputs = dict(self.undelivered)  # emptied only once this step has succeeded
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.seqs:
            self.undelivered = {}
            return list(outputs.values())
        runner_output = self.model_runner.execute_model(scheduler_output)
        advanced = self.scheduler.update_from_output(scheduler_output, runner_output)
        for seq in advanced:
            outputs[seq.request_id] = make_output(seq, self.requests[seq.request_id])
        for seq in advanced:
            if seq.status.is_finished:
                self._forget(seq)
        self.undelivered = {}
        return list(outputs.values())

    def hold_outputs(self, outputs: list[RequestOutput]) -> None:
        """Keep outputs that a caller stepped past (`LLM.generate` runs only its own
        requests to the end): the next `step` returns them, so none is lost."""
        for output in outputs:
            self.undelivered[output.request_id] = output

    def _forget(self, seq: Sequence) -> None:
        """A finished sequence's request leaves the engine (the scheduler let it go)."""
        del self.requests[seq.request_id], self.sequences[seq.request_id]
