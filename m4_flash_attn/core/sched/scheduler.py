"""The scheduler: which sequences run in the next step (continuous batching).

Introduced in M2; M3 hands out KV cache blocks instead of slots, and preempts. New
requests wait in a first-come-first-served queue. The decision of what runs is made
again at every step (iteration-level scheduling, as in Orca and vLLM), so a request that
finishes leaves after the step that finished it and a waiting one can join in the very
next step. A step is either

- a prefill: newly admitted sequences, each one's whole prompt, in one forward pass.
  Admission goes in arrival order while the batch stays within `max_batch_size`
  sequences (the running ones included), the prompts within `max_num_batched_tokens`
  tokens, and the free blocks hold the prompt with a few to spare (a watermark kept
  for the running sequences' next tokens). A prompt longer than the token budget is
  admitted alone, so it never waits forever; or
- a decode: every running sequence, one token each. Each needs room for that token;
  when the pool runs out, the newest running sequence is preempted: its blocks are
  freed and it goes back to the front of the waiting queue, to be recomputed (a prefill
  of its prompt and the tokens generated so far) when blocks are free again.

Prefills go first whenever one can be admitted (vLLM v0's policy; mixing prefills and
decodes in one step is M5's lesson). Either way the output has one shape (vLLM v1's):
per sequence, the tokens it computes from `num_computed_tokens` on, and its block ids
(`core/sched/output.py`; M4: only the ones the worker has not seen, and the requests
whose blocks were freed). After the step, `update_from_output` advances each one's
`num_computed_tokens`. The scheduler only keeps books: it never touches the model, so
it can be driven, and tested, without one.
"""

from collections import deque

from ...config import EngineConfig
from ...request import Sequence, SequenceStatus
from ...utils import cdiv
from ..kv_cache_manager import KVCacheManager
from .output import ScheduledSequence, SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_blocks: int) -> None:
        self.config = config
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
        self.freed_request_ids: list[str] = []  # since the last step, for the worker (M4)

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
        # The freed requests go with the next step that runs (a step with nothing to run
        # never reaches the worker).
        freed, self.freed_request_ids = (self.freed_request_ids, []) if admitted \
            else ([], self.freed_request_ids)
        out = SchedulerOutput([self._scheduled(seq) for seq in admitted], admitted,
                              sum(num_new_tokens(seq) for seq in admitted), freed)
        self._record_usage(out)
        return out

    def _schedule_running(self) -> list[Sequence]:
        """Every running sequence, oldest first, gets room for its new token; if the pool
        is empty, the newest running sequence is preempted to free its blocks."""
        kv = self.kv_cache_manager
        scheduled: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
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
        return scheduled

    def _scheduled(self, seq: Sequence) -> ScheduledSequence:
        """A sequence with nothing computed yet (new, restarted after a preemption, or
        retried after a failed first step) sends its whole block table; a running one the
        blocks past those that hold its first num_computed_tokens tokens, which the
        worker has."""
        start = seq.num_computed_tokens
        is_new = start == 0
        seen = 0 if is_new else cdiv(start, self.kv_cache_manager.block_size)
        return ScheduledSequence(seq.request_id, seq.token_ids[start:], start,
                                 self.kv_cache_manager.block_table(seq, seen), is_new)

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the K/V of every scheduled token are in the cache now."""
        for seq, scheduled in zip(out.seqs, out.scheduled):
            seq.num_computed_tokens += len(scheduled.new_token_ids)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits first in line and will be recomputed."""
        self.kv_cache_manager.free(seq)
        self.freed_request_ids.append(seq.request_id)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache_manager.free(seq)
        self.freed_request_ids.append(seq.request_id)

    def _record_usage(self, out: SchedulerOutput) -> None:
        # After this step a scheduled sequence holds all its tokens but the one it samples.
        used = sum(seq.num_computed_tokens for seq in self.running) + out.num_batched_tokens
        self.used_token_slots_peak = max(self.used_token_slots_peak, used)
        self.reserved_token_slots_peak = max(self.reserved_token_slots_peak,
                                             self.reserved_token_slots)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))


def num_new_tokens(seq: Sequence) -> int:
    """Tokens of `seq` whose K/V are not in the cache yet: its prompt when it starts (its
    prompt and output after a preemption), then the one token sampled in the last step."""
    return len(seq.token_ids) - seq.num_computed_tokens
