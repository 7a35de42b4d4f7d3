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
decodes in one step is M5's lesson). The scheduler only keeps books: it never touches
the model, so it can be driven, and tested, without one.
"""

from collections import deque
from dataclasses import dataclass, field

from ...config import SchedulerConfig
from ...request import Sequence, SequenceStatus
from ..kv_cache_manager import KVCacheManager


@dataclass
class SchedulerOutput:
    """What runs in one step."""

    seqs: list[Sequence]
    is_prefill: bool  # True: whole prompts of newly admitted sequences; False: one token each
    num_batched_tokens: int  # tokens that go through the model in this step
    preempted: list[Sequence] = field(default_factory=list)  # sent back to wait in this step


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_kv_blocks: int, block_size: int) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # The KV cache is a pool of blocks, taken as sequences grow.
        self.kv_cache_manager = KVCacheManager(num_kv_blocks, block_size)
        self.watermark_blocks = max(1, num_kv_blocks // 100)
        # Statistics, for kv_cache_stats()
        self.used_token_slots_peak = 0  # most tokens held in the KV cache after a step
        self.reserved_token_slots_peak = 0  # most token slots in allocated blocks
        self.max_concurrent_seqs = 0
        self.num_preemptions = 0

    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def used_token_slots(self) -> int:
        """Tokens whose keys and values are in the KV cache now."""
        return sum(seq.num_cached_tokens for seq in self.running)

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
            num_new = len(seq.token_ids)  # a preempted one recomputes its output too
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
            out = SchedulerOutput(admitted, is_prefill=True, num_batched_tokens=num_tokens)
        else:
            out = self._schedule_decode()
        self._record_usage(out)
        return out

    def _schedule_decode(self) -> SchedulerOutput:
        """Every running sequence, oldest first, gets a slot for its next token; if the
        pool is empty, the newest running sequence is preempted to free its blocks."""
        kv = self.kv_cache_manager
        scheduled: list[Sequence] = []
        preempted: list[Sequence] = []
        while self.running:
            seq = self.running.popleft()
            while not kv.allocate_slots(seq, 1):
                # No free block: preempt the newest running sequence (this one, if no
                # newer one is left) and try again.
                victim = self.running.pop() if self.running else seq
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status == SequenceStatus.RUNNING:
                scheduled.append(seq)
        self.running.extend(scheduled)
        return SchedulerOutput(scheduled, is_prefill=False, num_batched_tokens=len(scheduled),
                               preempted=preempted)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits first in line and will be recomputed."""
        self.kv_cache_manager.free(seq)
        seq.num_cached_tokens = 0
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

    def _record_usage(self, out: SchedulerOutput) -> None:
        # After this step a scheduled sequence holds all its tokens but the one it samples.
        used = sum(seq.num_cached_tokens for seq in self.running)
        used += sum(len(seq.token_ids) - seq.num_cached_tokens for seq in out.seqs)
        self.used_token_slots_peak = max(self.used_token_slots_peak, used)
        self.reserved_token_slots_peak = max(self.reserved_token_slots_peak,
                                             self.reserved_token_slots)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))
