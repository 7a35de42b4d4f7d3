"""The scheduler: which sequences run in the next step, and what a step's results do.

New requests wait in a first-come-first-served queue; the decision of what runs is made
again at every step (iteration-level scheduling, as in Orca and vLLM). A step is either
a prefill (newly admitted sequences' whole prompts, within `max_batch_size` sequences,
`max_num_batched_tokens` tokens and the free KV slots; a longer prompt goes alone) or a
decode (every running sequence, one token each). After the step, `update_from_output`
is the one place its results change the sequences: computed tokens, sampled tokens, the
stop rules, finishing. The scheduler never touches the model or a tensor.

Introduced in M2.
"""

import time
from collections import deque

from ...config import EngineConfig
from ...request import Sequence, SequenceStatus
from .output import NewSequenceData, ScheduledSequence, SchedulerOutput
from .stop_checker import StopChecker


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_slots: int,
                 stop_checker: StopChecker) -> None:
        self.config = config
        self.stop_checker = stop_checker
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # The KV cache has one slot per sequence that may run at once.
        self.num_kv_slots = num_kv_slots
        self.free_slots: deque[int] = deque(range(num_kv_slots))
        # Statistics, for kv_cache_stats()
        self.used_token_slots_peak = 0  # most tokens held in the KV cache after a step
        self.max_concurrent_seqs = 0
        self.finished_seq_names: list[str] = []  # since the last step, for the worker

    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reset_stats(self) -> None:
        """Start the peaks over from now (the bench calls it after its warm-up)."""
        self.used_token_slots_peak = self.used_token_slots
        self.max_concurrent_seqs = len(self.running)

    @property
    def used_token_slots(self) -> int:
        """Tokens whose keys and values are in the KV cache now."""
        return sum(seq.num_computed_tokens for seq in self.running)

    # -- KV cache slots --------------------------------------------------------------
    def allocate_slot(self, seq: Sequence) -> bool:
        if not self.free_slots:
            return False
        seq.kv_slot = self.free_slots.popleft()
        return True

    def free_slot(self, seq: Sequence) -> None:
        if seq.kv_slot is not None:
            self.free_slots.append(seq.kv_slot)
            seq.kv_slot = None

    # -- one decision ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Admit waiting sequences as a prefill batch if any fit; else decode all running."""
        # exercise m2.1 begin
        cfg = self.config
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            seq = self.waiting[0]
            num_new = num_new_tokens(seq)
            if admitted and num_tokens + num_new > cfg.max_num_batched_tokens:
                break  # the budget is spent (a first prompt always goes, even if longer)
            if not self.allocate_slot(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            num_tokens += num_new
        if admitted:
            self.running.extend(admitted)
        else:
            admitted = list(self.running)
        # exercise m2.1 end
        # They go with the next step that runs (an empty step never reaches the worker).
        finished, self.finished_seq_names = (self.finished_seq_names, []) if admitted \
            else ([], self.finished_seq_names)
        out = SchedulerOutput([self._scheduled(seq) for seq in admitted], admitted,
                              sum(num_new_tokens(seq) for seq in admitted), finished)
        self._record_usage(out)
        return out

    def _scheduled(self, seq: Sequence) -> ScheduledSequence:
        start = seq.num_computed_tokens
        new = self._new_sequence_data(seq) if start == 0 else None
        return ScheduledSequence(seq.name, seq.token_ids[start:], start, [seq.kv_slot], new)

    def _new_sequence_data(self, seq: Sequence) -> NewSequenceData:
        params = seq.sampling_params
        blocked = [] if params.min_tokens == 0 else \
            self.stop_checker.eos_token_ids + params.stop_token_ids
        return NewSequenceData(params, seq.token_ids[:seq.num_prompt_tokens], params.seed,
                               blocked)

    # -- after the step --------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, runner_output) -> list[Sequence]:
        """The step ran: its tokens' K/V are in the cache, and each sequence sampled a
        token. Append them, apply the stop rules, let the finished ones go. Returns the
        sequences that advanced, for the engine's outputs."""
        # exercise m2.3 begin
        advanced = []
        for seq, scheduled, token, prompt_logprobs, logprobs in zip(
                out.seqs, out.scheduled, runner_output.sampled_token_ids,
                runner_output.prompt_logprobs, runner_output.logprobs):
            self.stop_checker.append_token(seq, token)
            self.stop_checker.record_logprobs(seq, scheduled.num_computed_tokens,
                                              prompt_logprobs, logprobs)
            seq.num_computed_tokens += len(scheduled.new_token_ids)
            advanced.append(seq)
            if seq.status.is_finished:
                self._finish(seq)
        return advanced
        # exercise m2.3 end

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence: it finishes now, and frees its slot."""
        seq.status = SequenceStatus.FINISHED_ABORTED
        seq.metrics.finish_time = time.perf_counter()
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its slot."""
        # exercise m2.3 begin
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_slot(seq)
        self.finished_seq_names.append(seq.name)
        # exercise m2.3 end

    def _record_usage(self, out: SchedulerOutput) -> None:
        # After this step a scheduled sequence holds all its tokens but the one it samples.
        used = sum(seq.num_computed_tokens for seq in self.running) + out.num_batched_tokens
        self.used_token_slots_peak = max(self.used_token_slots_peak, used)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))


def num_new_tokens(seq: Sequence) -> int:
    """Tokens of `seq` whose K/V are not in the cache yet: its prompt when it starts (its
    prompt and output after a preemption), then the one token sampled in the last step."""
    return len(seq.token_ids) - seq.num_computed_tokens
