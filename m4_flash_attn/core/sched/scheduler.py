"""The scheduler: which sequences run in the next step, and what a step's results do.

New requests wait in a first-come-first-served queue; what runs is decided again at
every step (iteration-level scheduling). A step is a prefill (newly admitted prompts,
within `max_batch_size` sequences, `max_num_batched_tokens` tokens and the free blocks
less a watermark) or a decode (every running sequence, one token each; when the pool
runs out, the newest is preempted and waits to be recomputed). A scheduled step counts
at once, its sampled token as pending, so the next step can be scheduled before its
results are back. `update_from_output` is the one place results change the sequences.

Introduced in M2; changed in M3 (blocks, not slots; preemption), M4 (only new blocks
sent; steps scheduled ahead of their results).
"""

import time
from collections import deque

from ...config import EngineConfig
from ...request import Sequence, SequenceStatus
from ...utils import cdiv
from ..kv_cache_manager import KVCacheManager
from .output import PENDING_TOKEN, NewSequenceData, ScheduledSequence, SchedulerOutput
from .stop_checker import StopChecker


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_blocks: int,
                 stop_checker: StopChecker) -> None:
        self.config = config
        self.stop_checker = stop_checker
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # The KV cache is a pool of blocks, taken as sequences grow.
        self.kv_cache_manager = KVCacheManager(num_kv_blocks, config.block_size)
        self.watermark_blocks = max(1, num_kv_blocks // 100)
        # Statistics, for kv_cache_stats()
        self.used_token_slots_peak = 0  # most tokens held in the KV cache after a step
        self.reserved_token_slots_peak = 0  # most token slots in allocated blocks
        self.max_concurrent_seqs = 0
        self.num_preemptions = 0
        self.finished_seq_names: list[str] = []  # since the last step, for the worker
        self.preempted_seq_names: list[str] = []  # since the last step, for the worker

    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def reset_stats(self) -> None:
        """Start the peaks and the preemption count over from now (the bench calls it after
        its warm-up)."""
        self.used_token_slots_peak = self.used_token_slots
        self.reserved_token_slots_peak = self.reserved_token_slots
        self.max_concurrent_seqs = len(self.running)
        self.num_preemptions = 0

    @property
    def used_token_slots(self) -> int:
        """Tokens whose keys and values are in the KV cache now."""
        return sum(seq.num_computed_tokens for seq in self.running)

    @property
    def reserved_token_slots(self) -> int:
        """Token slots in the blocks that sequences hold now."""
        kv = self.kv_cache_manager
        return (kv.num_blocks - kv.num_free_blocks) * kv.block_size

    # -- one decision ----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        """Admit waiting sequences as a prefill batch if any fit; else decode all running."""
        cfg, kv = self.config, self.kv_cache_manager
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            seq = self.waiting[0]
            if seq.num_pending_tokens:
                break  # preempted while its last token is on the device: wait for it
            num_new = num_new_tokens(seq)  # a preempted one recomputes its output too
            if admitted and num_tokens + num_new > cfg.max_num_batched_tokens:
                break  # the budget is spent (a first prompt always goes, even if longer)
            if (self.running or admitted) and (
                    kv.num_free_blocks - kv.num_blocks_needed(seq, num_new)
                    < self.watermark_blocks):
                break  # keep some blocks for the running ones (alone, it may take all)
            if not kv.allocate_slots(seq, num_new):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            admitted.append(seq)
            num_tokens += num_new
        if admitted:
            self.running.extend(admitted)
        else:
            admitted = self._schedule_running()
        # They go with the next step that runs (an empty step never reaches the worker).
        finished, preempted = self._take_freed() if admitted else ([], [])
        out = SchedulerOutput([self._scheduled(seq) for seq in admitted], admitted,
                              sum(num_new_tokens(seq) for seq in admitted), finished,
                              preempted)
        for seq, scheduled in zip(out.seqs, out.scheduled):
            advance(seq, scheduled)
        self._record_usage()
        return out

    def _schedule_running(self) -> list[Sequence]:
        """Every running sequence, oldest first, gets room for its new token; if the pool
        is empty, the newest running sequence is preempted to free its blocks."""
        kv = self.kv_cache_manager
        scheduled: list[Sequence] = []
        waiting_for_last: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            if self.stop_checker.ends_by_length(seq, seq.num_pending_tokens):
                waiting_for_last.append(seq)  # its last token is on the device already
                continue
            while not kv.allocate_slots(seq, num_new_tokens(seq)):
                # No free block: preempt the newest running sequence (this one, if no
                # newer one is left) and try again.
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                scheduled.append(seq)
        self.running.extend(scheduled)
        self.running.extend(waiting_for_last)
        return scheduled

    def _scheduled(self, seq: Sequence) -> ScheduledSequence:
        """A sequence with nothing computed yet (new, restarted after a preemption, or
        retried after a failed first step) sends its whole block table; a running one the
        blocks past those that hold its first num_computed_tokens tokens, which the
        worker has."""
        start = seq.num_computed_tokens
        is_new = start == 0
        seen = 0 if is_new else cdiv(start, self.kv_cache_manager.block_size)
        new = self._new_sequence_data(seq) if is_new else None
        # A token still on the device goes as a placeholder: the worker has it.
        new_token_ids = seq.token_ids[start:] + [PENDING_TOKEN] * seq.num_pending_tokens
        return ScheduledSequence(seq.name, new_token_ids, start,
                                 self.kv_cache_manager.block_table(seq, seen), is_new, new)

    def _take_freed(self) -> tuple[list[str], list[str]]:
        """The sequences finished and preempted since the last step that ran."""
        freed = self.finished_seq_names, self.preempted_seq_names
        self.finished_seq_names, self.preempted_seq_names = [], []
        return freed

    def _new_sequence_data(self, seq: Sequence) -> NewSequenceData:
        params = seq.sampling_params
        blocked = [] if params.min_tokens == 0 else \
            self.stop_checker.eos_token_ids + params.stop_token_ids
        return NewSequenceData(params, seq.token_ids[:seq.num_prompt_tokens], params.seed,
                               blocked)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits first in line and will be recomputed."""
        self.kv_cache_manager.free(seq)
        self.preempted_seq_names.append(seq.name)  # the worker forgets its table
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the step --------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, runner_output) -> list[Sequence]:
        """The step ran: each sequence sampled a token. Append them, apply the stop rules,
        let the finished ones go. A sequence that finished since the step was scheduled
        (stopped by the token before, or aborted) drops its token. Returns the sequences
        that advanced, for the engine's outputs."""
        advanced = []
        for i, (seq, scheduled, token, prompt_logprobs, logprobs) in enumerate(zip(
                out.seqs, out.scheduled, runner_output.sampled_token_ids,
                runner_output.prompt_logprobs, runner_output.logprobs)):
            if seq.status.is_finished:
                continue
            try:
                self.stop_checker.append_token(seq, token)
                self.stop_checker.record_logprobs(seq, scheduled.num_computed_tokens,
                                                  prompt_logprobs, logprobs)
            except BaseException:  # this and the later sequences run the step again
                self.undo_step(SchedulerOutput(out.scheduled[i:], out.seqs[i:], 0))
                raise
            seq.num_pending_tokens -= 1
            advanced.append(seq)
            if seq.status.is_finished:
                self._finish(seq)
        return advanced

    def undo_step(self, out: SchedulerOutput) -> None:
        """The step's results are lost (it failed, or an error came before they were
        applied): its sequences are computed and pending again as before it, so a later
        step computes the same tokens again."""
        for seq, scheduled in zip(out.seqs, out.scheduled):
            if not seq.status.is_finished:
                advance(seq, scheduled, undo=True)

    def abort(self, seq: Sequence) -> None:
        """Drop a waiting or running sequence: it finishes now, and frees its blocks."""
        seq.status = SequenceStatus.FINISHED_ABORTED
        seq.metrics.finish_time = time.perf_counter()
        self._finish(seq)

    def _finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache_manager.free(seq)
        self.finished_seq_names.append(seq.name)

    def _record_usage(self) -> None:
        self.used_token_slots_peak = max(self.used_token_slots_peak, self.used_token_slots)
        self.reserved_token_slots_peak = max(self.reserved_token_slots_peak,
                                             self.reserved_token_slots)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))


def num_new_tokens(seq: Sequence) -> int:
    """Tokens of `seq` whose K/V are not in the cache yet: its prompt when it starts (its
    prompt and output after a preemption), then the one token sampled in the last step
    (perhaps still pending)."""
    return len(seq.token_ids) + seq.num_pending_tokens - seq.num_computed_tokens


def advance(seq: Sequence, scheduled: ScheduledSequence, undo: bool = False) -> None:
    """A scheduled step counts at once: its tokens as computed, the token it samples as
    pending. Undo takes the step back (a sequence preempted meanwhile stays at 0)."""
    num_new, samples = len(scheduled.new_token_ids), scheduled.next_token_id is None
    if undo:
        seq.num_computed_tokens = max(0, seq.num_computed_tokens - num_new)
        seq.num_pending_tokens -= samples
    else:
        seq.num_computed_tokens += num_new
        seq.num_pending_tokens += samples
