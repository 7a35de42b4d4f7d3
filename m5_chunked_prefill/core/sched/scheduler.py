"""The scheduler: which sequences run in the next step, and how many tokens each computes.

Introduced in M2; M3 hands out KV cache blocks instead of slots, and preempts; M5 gives
each step a token budget and cuts prompts into chunks. New requests wait in a
first-come-first-served queue. The decision of what runs is made again at every step
(iteration-level scheduling, as in Orca and vLLM), so a request that finishes leaves
after the step that finished it and a waiting one can join in the very next step.

M5 (chunked prefill, vLLM v1's scheduler): a step has no phase. Every sequence has
`num_computed_tokens`, the tokens whose K/V are in the cache; a step gives each
scheduled sequence a number of new tokens to compute, all within one budget of
`max_num_batched_tokens` tokens (and `max_batch_size` running sequences):

1. the running sequences first, oldest first: one token for a decode, the next chunk
   for a prompt that is part way through its prefill. Each needs room for its tokens;
   when the pool runs out, the newest running sequence is preempted: its blocks are
   freed and it goes back to the front of the waiting queue, to be recomputed (its
   prompt and the tokens generated so far) when blocks are free again;
2. then, if nothing was preempted, waiting sequences in arrival order, each with as
   much of its prompt as the budget left allows (at most `max_chunk_size` tokens), while
   the free blocks hold its chunk with a few to spare (a watermark kept for the running
   sequences' next tokens).

So a long prompt is spread over several steps, each beside the decodes of the running
sequences, which never wait a whole prefill for their next token (as long as the budget
holds a token for each of them). Blocks are taken chunk by chunk, as the prompt grows:
a prompt admitted with its first chunk may find the pool empty at a later one and, the
newest running sequence, be preempted and start again later (vLLM does the same). A sequence samples
its next token only in the step that computes its last known token (its prompt's last
chunk, or a decode). With `enable_chunked_prefill=False` the scheduler is M4's:
a step either admits whole prompts (prefills first; a prompt longer than the budget
alone), or decodes every running sequence.

Either way the output has one shape (vLLM v1's): per sequence, the tokens it computes
from `num_computed_tokens` on, and its new block ids (`core/sched/output.py`). After
the step, `update_from_output` advances each one's `num_computed_tokens`. The scheduler
only keeps books: it never touches the model, so it can be driven, and tested, without
one.
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
        """Choose the sequences of the next step and how many new tokens each computes:
        by token budget (M5), or M4's prefills-first with `enable_chunked_prefill=False`."""
        if self.config.enable_chunked_prefill:
            chosen = self._schedule_by_budget()
        else:
            chosen = self._schedule_prefills_first()
        # The freed requests go with the next step that runs (a step with nothing to run
        # never reaches the worker).
        freed, self.freed_request_ids = (self.freed_request_ids, []) if chosen \
            else ([], self.freed_request_ids)
        out = SchedulerOutput([self._scheduled(seq, n) for seq, n in chosen],
                              [seq for seq, _ in chosen], sum(n for _, n in chosen), freed)
        self._record_usage(out)
        return out

    def _schedule_by_budget(self) -> list[tuple[Sequence, int]]:
        """M5: the running sequences' tokens first (a decode's one, a prompt's next chunk),
        then chunks of waiting prompts, until `max_num_batched_tokens` are spent."""
        cfg, kv = self.config, self.kv_cache_manager
        budget = cfg.max_num_batched_tokens
        chosen: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):  # oldest first
            if budget == 0:
                break
            if seq.status != SequenceStatus.RUNNING:
                continue  # preempted in this loop, to make room for an older one
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
        while self.waiting and budget > 0 and len(self.running) < cfg.max_batch_size:
            seq = self.waiting[0]
            num_new = self._chunk(seq, budget)
            if not self._admit(seq, num_new, others_running=bool(self.running)):
                break
            self.running.append(seq)
            chosen.append((seq, num_new))
            budget -= num_new
        return chosen

    def _admit(self, seq: Sequence, num_new: int, others_running: bool) -> bool:
        """Take the first waiting sequence out of the queue with blocks for num_new of its
        tokens, if the pool has them (and, when others run, a few to spare for them)."""
        kv = self.kv_cache_manager
        if others_running and (kv.num_free_blocks - kv.num_blocks_needed(seq, num_new)
                               < self.watermark_blocks):
            return False  # keep some blocks for the running ones (alone, it may take all)
        if not kv.allocate_slots(seq, num_new):
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        return True

    def _chunk(self, seq: Sequence, budget: int) -> int:
        """How many of `seq`'s uncomputed tokens run now: all of them, or as many as the
        budget left (and `max_chunk_size`) allows."""
        cap = self.config.max_chunk_size or budget
        return min(num_new_tokens(seq), budget, cap)

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
        next_token_id = seq.token_ids[end] if end < len(seq.token_ids) else None
        return ScheduledSequence(seq.request_id, seq.token_ids[start:end], start,
                                 self.kv_cache_manager.block_table(seq, seen), is_new,
                                 next_token_id)

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
