"""The engine: takes requests, and on each `step` advances many of them by one token.

A step is three calls: the scheduler says what runs, the model runner runs it in one
forward pass and samples, and the scheduler's `update_from_output` applies the results;
the engine turns the sequences that advanced into outputs (a request's n samples: one
output). With async scheduling the next step is launched before the last one's results
are applied. Requests may be added or aborted between two steps; a prompt too long for
the whole KV cache is refused, and no sequence grows past what it holds.

Introduced in M1; changed in M2 (a scheduler picks many sequences per step), M3 (the
cache's size caps a sequence's length), M4 (async scheduling), M6 (n samples).
"""

import itertools
import time
import warnings

from ..config import EngineConfig
from ..core.sched.output import SchedulerOutput
from ..core.sched.scheduler import Scheduler
from ..core.sched.stop_checker import StopChecker
from ..model_executor.model_loader import load_model_config, resolve_model_path
from ..outputs import RequestMetrics, RequestOutput
from ..request import Request, Sequence
from ..sampling_params import SamplingParams
from ..tokenizer import get_tokenizer
from ..utils import cdiv
from ..worker.model_runner import LaunchedStep, ModelRunner
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
        self.sequences: dict[str, Sequence] = {}  # by name (M6: n per request)
        self.undelivered: dict[str, RequestOutput] = {}  # see `hold_outputs`
        # Async scheduling: the step on the device whose results are not applied yet.
        self.async_scheduling = config.async_scheduling
        self.in_flight: tuple[SchedulerOutput, LaunchedStep] | None = None
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
        if request_id in self.requests or request_id in self.sequences:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        params = check_sampling_params(sampling_params, self.vocab_size)
        if params.n > self.config.max_batch_size:
            raise ValueError(f"n: {params.n} samples cannot run together in batches of "
                             f"max_batch_size={self.config.max_batch_size}")
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
        request.sequences = [self._new_sequence(request, i) for i in range(params.n)]
        taken = [seq.name for seq in request.sequences if seq.name in self.sequences]
        if taken:
            raise ValueError(f"request_id: the names of its samples {taken} are in use")
        self.requests[request_id] = request
        for seq in request.sequences:
            self.sequences[seq.name] = seq
        # The others fork from the first once it has sampled its first token (M6).
        self.scheduler.add_sequence(request.sequences[0], request.sequences[1:])

    def _new_sequence(self, request: Request, index: int) -> Sequence:
        """The request's `index`-th sample (M6; the only one when n = 1). Cached tokens
        are not computed, so they have no log-probabilities: the first sample, whose
        output carries them, computes its whole prompt when they are asked for."""
        params = request.sampling_params
        return Sequence(next(self._seq_ids), request.request_id,
                        list(request.prompt_token_ids), params,
                        metrics=RequestMetrics(arrival_time=request.arrival_time),
                        index=index,
                        reads_prefix_cache=index > 0 or params.prompt_logprobs is None)

    def abort_request(self, request_id: str) -> None:
        """Drop a waiting or running request; its KV blocks are freed, no output follows."""
        self.undelivered.pop(request_id, None)
        request = self.requests.get(request_id)
        for seq in request.sequences if request is not None else []:
            if not seq.status.is_finished:
                self.scheduler.abort(seq)
                self._forget(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or waits, or an output waits to be returned."""
        return bool(self.undelivered) or self.scheduler.has_unfinished() or \
            self.in_flight is not None

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
                "num_preemptions": s.num_preemptions,
                # M6: prompt tokens looked up in the prefix cache, and those found there
                "prefix_cache_queries": kv.prefix_cache_queries,
                "prefix_cache_hits": kv.prefix_cache_hits,
                "prefix_cache_hit_rate": kv.prefix_cache_hits / kv.prefix_cache_queries
                if kv.prefix_cache_queries else None}

    def describe_runner(self) -> dict:
        """How steps run (attention backend, CUDA graphs, async scheduling), for the demo."""
        return {**self.model_runner.describe(), "async_scheduling": self.async_scheduling}

    def reset_stats(self) -> None:
        """Start kv_cache_stats()'s peaks over from now, e.g. after an untimed warm-up."""
        self.scheduler.reset_stats()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (M6), e.g. to time a run from a cold cache. Refused
        while requests run: their blocks are in use."""
        if self.scheduler.has_unfinished():
            raise RuntimeError("reset_prefix_cache: requests are running or waiting; "
                               "finish or abort them first")
        self.scheduler.kv_cache_manager.reset_prefix_cache()

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; return an output for each sequence that advanced (and
        any that `hold_outputs` kept for this call). With async scheduling, the next
        batch is launched first, and the outputs are those of the batch before it."""
        outputs = dict(self.undelivered)  # emptied only once this step has succeeded
        launched = self._launch_step()
        if self.async_scheduling:
            launched, self.in_flight = self.in_flight, launched
        if launched is not None:
            advanced = self._apply_step(*launched)
            for seq in advanced:
                outputs[seq.request_id] = make_output(self.requests[seq.request_id])
            for seq in advanced:
                if seq.status.is_finished:
                    self._forget(seq)
        if self.in_flight is not None and not self.scheduler.has_unfinished():
            # Its sequences all finished meanwhile: let it end, its tokens are dropped.
            last, self.in_flight = self.in_flight, None
            self._apply_step(*last)
        self.undelivered = {}
        return list(outputs.values())

    def _launch_step(self) -> tuple[SchedulerOutput, LaunchedStep] | None:
        """Schedule a batch and queue it on the device (None: nothing to run)."""
        scheduler_output = self.scheduler.schedule()
        if not scheduler_output.seqs:
            return None
        try:
            return scheduler_output, self.model_runner.launch_model(scheduler_output)
        except BaseException:
            self.scheduler.undo_step(scheduler_output)  # it did not run: run it again
            raise

    def _apply_step(self, scheduler_output: SchedulerOutput,
                    launched: LaunchedStep) -> list[Sequence]:
        """Wait for a launched batch's tokens and apply them; the sequences that advanced.
        If that fails, the batch (and any launched after it) will run again."""
        try:
            runner_output = launched.result()
        except BaseException:
            self.scheduler.undo_step(scheduler_output)
            self._take_back_in_flight()
            raise
        try:
            return self.scheduler.update_from_output(scheduler_output, runner_output)
        except BaseException:
            self._take_back_in_flight()  # it was built on tokens that are now lost
            raise

    def _take_back_in_flight(self) -> None:
        """The step on the device was built on results that are lost: it ends, and is
        taken back to run again."""
        if self.in_flight is not None:
            scheduler_output, launched = self.in_flight
            self.in_flight = None
            try:
                launched.result()  # let it end before its sequences are scheduled again
            finally:
                self.scheduler.undo_step(scheduler_output)

    def hold_outputs(self, outputs: list[RequestOutput]) -> None:
        """Keep outputs that a caller stepped past (`LLM.generate` runs only its own
        requests to the end): the next `step` returns them, so none is lost."""
        for output in outputs:
            self.undelivered[output.request_id] = output

    def _forget(self, seq: Sequence) -> None:
        """A finished sequence leaves the engine (the scheduler let it go); its request
        too once all its samples have (M6)."""
        del self.sequences[seq.name]
        request = self.requests[seq.request_id]
        if not any(s.name in self.sequences for s in request.sequences):
            del self.requests[seq.request_id]
