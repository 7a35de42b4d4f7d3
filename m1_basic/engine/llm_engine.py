"""The engine: takes requests, and on each `step` advances one of them by one token.

Requests wait in a first-come-first-served queue and run one at a time: the first step
of a request is its prefill (the whole prompt in one forward pass, filling its KV cache,
giving the first token); every later step is a decode (one token in, one token out)
until a stop rule fires. Only then does the next request start.

Introduced in M1.
"""

import itertools
import time
from collections import deque

import torch

from ..config import EngineConfig
from ..model_executor.layers.sampler import SamplingRow
from ..model_executor.model_loader import load_model_config, resolve_model_path
from ..outputs import RequestMetrics, RequestOutput
from ..request import Request, Sequence, SequenceStatus
from ..sampling_params import SamplingParams
from ..tokenizer import get_tokenizer
from ..worker.model_runner import ModelRunner
from .input_processor import check_sampling_params, encode_prompt
from .output_processor import make_output, process_token, to_logprobs


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
        self.waiting: deque[Sequence] = deque()
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
        request = Request(request_id, prompt if isinstance(prompt, str) else None, params,
                          arrival_time if arrival_time is not None else time.perf_counter(),
                          prompt_token_ids=list(token_ids))
        seq = Sequence(next(self._seq_ids), request_id, list(token_ids))
        seq.metrics = RequestMetrics(arrival_time=request.arrival_time)
        if params.seed is not None:  # a private random stream makes sampling reproducible
            seq.generator = torch.Generator(self.model_runner.device).manual_seed(params.seed)
        self.requests[request_id] = request
        self.sequences[request_id] = seq
        self.waiting.append(seq)

    def abort_request(self, request_id: str) -> None:
        """Drop a request; its KV cache is freed and no output follows."""
        self.undelivered.pop(request_id, None)
        seq = self.sequences.get(request_id)
        if seq is None or seq.status.is_finished:
            return
        seq.status = SequenceStatus.FINISHED_ABORTED
        seq.metrics.finish_time = time.perf_counter()
        self._finish(seq)

    def has_unfinished_requests(self) -> bool:
        """True while a request runs or waits, or an output waits to be returned."""
        return bool(self.undelivered or self.waiting)

    # -- one step ---------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance the oldest unfinished request by one token; return its output (and any
        that `hold_outputs` kept for this call)."""
        outputs = dict(self.undelivered)  # emptied only once this step has succeeded
        if not self.waiting:
            self.undelivered = {}
            return list(outputs.values())
        seq = self.waiting[0]
        request = self.requests[seq.request_id]
        if seq.status == SequenceStatus.WAITING:  # first step: allocate and prefill
            max_len = min(seq.num_prompt_tokens + request.sampling_params.max_tokens,
                          self.config.max_model_len)
            self.model_runner.allocate_kv_cache(seq, max_len)
            seq.status = SequenceStatus.RUNNING
        runner_output = self.model_runner.execute_model(seq, self._sampling_row(seq))
        num_computed = len(seq.token_ids)  # the K/V of all its tokens are in the cache now
        self._record_logprobs(seq, runner_output.prompt_logprobs[0], runner_output.logprobs[0])
        process_token(seq, request, runner_output.sampled_token_ids[0], self.tokenizer,
                      self.eos_token_ids, self.config.max_model_len)
        outputs[seq.request_id] = make_output(seq, request)
        if seq.status.is_finished:
            self._finish(seq)
        seq.num_computed_tokens = num_computed
        self.undelivered = {}
        return list(outputs.values())

    def hold_outputs(self, outputs: list[RequestOutput]) -> None:
        """Keep outputs that a caller stepped past (`LLM.generate` runs only its own
        requests to the end): the next `step` returns them, so none is lost."""
        for output in outputs:
            self.undelivered[output.request_id] = output

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        params = self.requests[seq.request_id].sampling_params
        blocked = [] if params.min_tokens == 0 else self.eos_token_ids + params.stop_token_ids
        return SamplingRow(params, self.requests[seq.request_id].prompt_token_ids,
                           seq.output_token_ids, seq.generator, blocked)

    def _record_logprobs(self, seq: Sequence, prompt_logprobs, logprobs) -> None:
        if prompt_logprobs is not None and seq.prompt_logprobs is None:  # once, not on recompute
            seq.prompt_logprobs = [None] + [to_logprobs(p, self.tokenizer) for p in
                                            prompt_logprobs[:seq.num_prompt_tokens - 1]]
        if logprobs is not None:
            seq.output_logprobs.append(to_logprobs(logprobs, self.tokenizer))

    def _finish(self, seq: Sequence) -> None:
        self.model_runner.free_kv_cache(seq)
        if seq in self.waiting:
            self.waiting.remove(seq)
        del self.requests[seq.request_id], self.sequences[seq.request_id]
