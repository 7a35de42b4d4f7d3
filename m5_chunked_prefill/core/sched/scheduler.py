"""The scheduler: which sequences run in the next step, and what a step's results do.

A step has no phase: every sequence has `num_computed_tokens` (its tokens whose K/V are
in the cache), and a step gives each scheduled one a number of new tokens, all within a
budget of `max_num_batched_tokens`: the running sequences first (a decode's one token, a
prompt's next chunk; when the pool runs out, the newest is preempted and recomputed
later), then chunks of waiting prompts while the free blocks hold their whole prompts
too. A scheduled step counts at once, its sampled token as pending, so the next step can
be scheduled before its results are back. `update_from_output` applies the results.

Introduced in M2; changed in M3 (blocks; preemption), M4 (only new blocks sent; steps
scheduled ahead), M5 (one token budget; prompts in chunks).
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
        """Choose the sequences of the next step and how many new tokens each computes:
        by token budget (M5), or M4's prefills-first with `enable_chunked_prefill=False`."""
        if self.config.enable_chunked_prefill:
            chosen = self._schedule_by_budget()
        else:
            chosen = self._schedule_prefills_first()
        # They go with the next step that runs (an empty step never reaches the worker).
        finished, preempted = self._take_freed() if chosen else ([], [])
        out = SchedulerOutput([self._scheduled(seq, n) for seq, n in chosen],
                              [seq for seq, _ in chosen], sum(n for _, n in chosen), finished,
                              preempted)
        for seq, scheduled in zip(out.seqs, out.scheduled):
            advance(seq, scheduled)
        self._record_usage()
        return out

    def _schedule_by_budget(self) -> list[tuple[Sequence, int]]:
        """M5: the running sequences' tokens first (a decode's one, a prompt's next chunk),
        then chunks of waiting prompts, until `max_num_batched_tokens` are spent."""
        cfg, kv = self.config, self.kv_cache_manager
        budget = cfg.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        # exercise m5.2 begin
        preempted = False
        for seq in list(self.running):  # oldest first
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted in this loop, to make room for an older one
            if self.stop_checker.ends_by_length(seq, seq.num_pending_tokens):
                continue  # its last token is on the device already
            num_new = self._chunk(seq, budget)
            while not kv.allocate_slots(seq, num_new):
                # No free block: preempt the newest running sequence (this one, if no
                # newer one is left) and try again.
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                chosen.append((seq, num_new))
                budget -= num_new
        if preempted:
            return chosen  # the pool is short: no new prompt now
        # exercise m5.2 end
        # exercise m5.3 begin
        promised = self._blocks_promised() if self.waiting else 0  # only for admissions
        while self.waiting and budget > 0 and len(self.running) < cfg.max_batch_size:
            seq = self.waiting[0]
            num_new = self._chunk(seq, budget)
            if not self._admit(seq, num_new, others_running=bool(self.running),
                               promised=promised):
                break
            promised += kv.num_blocks_needed(seq, num_new_tokens(seq))  # its later chunks
            self.running.append(seq)
            chosen.append((seq, num_new))
            budget -= num_new
        return chosen
        # exercise m5.3 end

    def _blocks_promised(self) -> int:
        """Blocks the running sequences still need for the rest of their prompts (and a
        decode for its next token): room that admitting a new prompt must not take."""
        # exercise m5.4 begin
        kv = self.kv_cache_manager
        return sum(kv.num_blocks_needed(seq, num_new_tokens(seq)) for seq in self.running)
        # exercise m5.4 end

    def _admit(self, seq: Sequence, num_new: int, others_running: bool,
               promised: int = 0) -> bool:
        """Take the first waiting sequence out of the queue with blocks for num_new of its
        tokens, if the pool has them. When others run, the pool must also hold the rest of
        its prompt beside the blocks `promised` to the running ones, and a few to spare:
        a prompt taken in chunk by chunk would otherwise run out of room half way, and
        the newest sequences would be preempted and computed again."""
        kv = self.kv_cache_manager
        if seq.num_pending_tokens:
            return False  # preempted while its last token is on the device: wait for it
        # exercise m5.4 begin
        whole = kv.num_blocks_needed(seq, num_new_tokens(seq))
        if others_running and kv.num_free_blocks - promised - whole < self.watermark_blocks:
            return False  # keep room for the running ones (alone, it may take all)
        # exercise m5.4 end
        if not kv.allocate_slots(seq, num_new):
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        return True

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of `seq`'s uncomputed tokens run now: all of them, or as many as the
        budget left (and `max_chunk_size`) allows."""
        # exercise m5.1 begin
        cap = self.config.max_chunk_size or budget
        return min(num_new_tokens(seq), budget, cap)
        # exercise m5.1 end

    def _schedule_prefills_first(self) -> list[tuple[Sequence, int]]:
        """M4's policy: admit waiting sequences' whole prompts as a prefill step if any
        fit; else decode every running sequence."""
        cfg = self.config
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            seq = self.waiting[0]
            num_new = num_new_tokens(seq)  # a preempted one recomputes its output too
            if admitted and num_tokens + num_new > cfg.max_num_batched_tokens:
                break  # the budget is spent (a first prompt always goes, even if longer)
            if not self._admit(seq, num_new, others_running=bool(self.running or admitted)):
                break
            admitted.append(seq)
            num_tokens += num_new
        if admitted:
            self.running.extend(admitted)
        else:
            admitted = self._schedule_running()
        return [(seq, num_new_tokens(seq)) for seq in admitted]

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

    def _scheduled(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        """A sequence with nothing computed yet (new, restarted after a preemption, or
        retried after a failed first step) sends its whole block table; a running one the
        blocks past those that hold its first num_computed_tokens tokens, which the
        worker has. A chunk that stops short of the sequence's last token names the token
        after it (M5): nothing is sampled for it this step."""
        start = seq.num_computed_tokens
        end = start + num_new
        is_new = start == 0
        seen = 0 if is_new else cdiv(start, self.kv_cache_manager.block_size)
        new = self._new_sequence_data(seq) if is_new else None
        # exercise m5.1 begin
        next_token_id = seq.token_ids[end] if end < len(seq.token_ids) else None
        # exercise m5.1 end
        # A token still on the device goes as a placeholder: the worker has it.
        known = seq.token_ids[start:end]
        new_token_ids = known + [PENDING_TOKEN] * (end - start - len(known))
        return ScheduledSequence(seq.name, new_token_ids, start,
                                 self.kv_cache_manager.block_table(seq, seen), is_new, new,
                                 next_token_id)

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
        """The step ran: each sequence whose new tokens reached its last one sampled a
        token. Append them, apply the stop rules, let the finished ones go. A sequence
        that finished since the step was scheduled (stopped by the token before, or
        aborted) drops its token. Returns the sequences that advanced, for the outputs."""
        advanced = []
        for i, (seq, scheduled, token, prompt_logprobs, logprobs) in enumerate(zip(
                out.seqs, out.scheduled, runner_output.sampled_token_ids,
                runner_output.prompt_logprobs, runner_output.logprobs)):
            if seq.status.is_finished:
                continue
            try:
                if token is not None:  # None: a chunk inside the prompt, no token yet
                    self.stop_checker.append_token(seq, token)
                self.stop_checker.record_logprobs(seq, scheduled.num_computed_tokens,
                                                  prompt_logprobs, logprobs)
            except BaseException:  # this and the later sequences run the step again
                self.undo_step(SchedulerOutput(out.scheduled[i:], out.seqs[i:], 0))
                raise
            if token is None:
                continue
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
