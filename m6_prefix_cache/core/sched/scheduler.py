"""The scheduler: which sequences run in the next step, and how many tokens each computes.

Introduced in M2; M3 hands out KV cache blocks instead of slots, and preempts; M5 gives
each step a token budget and cuts prompts into chunks; M6 starts a request after the
part of its prompt that the prefix cache holds, and forks a request's n samples. New
requests wait in a first-come-first-served queue. The decision of what runs is made
again at every step (iteration-level scheduling, as in Orca and vLLM), so a request
that finishes leaves after the step that finished it and a waiting one can join in the
very next step.

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

M6 (prefix caching): before a waiting sequence is admitted, the KV cache manager looks
its tokens up in the prefix cache; the sequence takes the cached blocks it hits (shared
with whoever else holds them) and starts at `num_computed_tokens` = the tokens they
hold, so its chunks cover only the rest. A preempted sequence's blocks stay cached
until evicted, so its recomputation may hit them too. A request with n samples runs its
first one alone until that has sampled its first token; the others then fork from it
(`fork`): they share its blocks and start at its prompt's last token, which each
computes itself to sample its own first token.
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
        self.kv_cache_manager = KVCacheManager(num_kv_blocks, config.block_size,
                                               config.enable_prefix_caching)
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
        copies, self.kv_cache_manager.blocks_to_copy = self.kv_cache_manager.blocks_to_copy, []
        out = SchedulerOutput([self._scheduled(seq, n) for seq, n in chosen],
                              [seq for seq, _ in chosen], sum(n for _, n in chosen), freed,
                              copies)
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
            cached = kv.cached_prefix(seq)  # M6: the blocks that hold its prefix already
            num_new = self._chunk(seq, budget, num_cached=len(cached) * kv.block_size)
            if not self._admit(seq, num_new, others_running=bool(self.running), cached=cached):
                break
            self.running.append(seq)
            chosen.append((seq, num_new))
            budget -= num_new
        return chosen

    def _admit(self, seq: Sequence, num_new: int, others_running: bool,
               cached: list = ()) -> bool:
        """Take the first waiting sequence out of the queue with blocks for num_new of its
        tokens after its `cached` ones (M6), if the pool has them (and, when others run,
        a few to spare for them)."""
        kv = self.kv_cache_manager
        if others_running and (kv.num_free_blocks - kv.num_blocks_needed(seq, num_new, cached)
                               < self.watermark_blocks):
            return False  # keep some blocks for the running ones (alone, it may take all)
        if not kv.allocate_slots(seq, num_new, cached):
            return False
        self.waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * kv.block_size
        if seq.num_prompt_cached_tokens is None:  # its first admission: what it reports
            seq.num_prompt_cached_tokens = seq.num_cached_tokens
            kv.record_lookup(seq, seq.num_cached_tokens)
        return True

    def _chunk(self, seq: Sequence, budget: int, num_cached: int = 0) -> int:
        """How many of `seq`'s uncomputed tokens (M6: past the num_cached ones it will
        start with) run now: all of them, or as many as the budget left (and
        `max_chunk_size`) allows."""
        cap = self.config.max_chunk_size or budget
        return min(num_new_tokens(seq) - num_cached, budget, cap)

    def _schedule_prefills_first(self) -> list[tuple[Sequence, int]]:
        """M4's policy: admit waiting sequences' whole prompts as a prefill step if any
        fit; else decode every running sequence."""
        cfg, kv = self.config, self.kv_cache_manager
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            seq = self.waiting[0]
            cached = kv.cached_prefix(seq)  # M6
            # a preempted one recomputes its output too
            num_new = num_new_tokens(seq) - len(cached) * kv.block_size
            if admitted and num_tokens + num_new > cfg.max_num_batched_tokens:
                break  # the budget is spent (a first prompt always goes, even if longer)
            if not self._admit(seq, num_new, others_running=bool(self.running or admitted),
                               cached=cached):
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
        retried after a failed first step; M6: nothing but the tokens it started with
        cached) sends its whole block table; a running one the
        blocks past those that hold its first num_computed_tokens tokens, which the
        worker has. A chunk that stops short of the sequence's last token names the token
        after it (M5): nothing is sampled for it this step."""
        start = seq.num_computed_tokens
        end = start + num_new
        is_new = start == seq.num_cached_tokens
        seen = 0 if is_new else cdiv(start, self.kv_cache_manager.block_size)
        next_token_id = seq.token_ids[end] if end < len(seq.token_ids) else None
        return ScheduledSequence(seq.name, seq.token_ids[start:end], start,
                                 self.kv_cache_manager.block_table(seq, seen), is_new,
                                 next_token_id)

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the K/V of every scheduled token are in the cache now."""
        for seq, scheduled in zip(out.seqs, out.scheduled):
            seq.num_computed_tokens += len(scheduled.new_token_ids)

    def _preempt(self, seq: Sequence) -> None:
        """Free the sequence's blocks; it waits first in line and will be recomputed."""
        self._requeue(seq)
        self.num_preemptions += 1

    def _requeue(self, seq: Sequence) -> None:
        self.kv_cache_manager.free(seq)
        self.freed_request_ids.append(seq.name)
        seq.num_computed_tokens = seq.num_cached_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def undo_step(self, out: SchedulerOutput) -> None:
        """The step failed before its K/V were surely written (M6): the blocks it was to
        fill leave the prefix cache, and a sequence that started in it (perhaps on such
        blocks, or on a copy that was never made) goes back to wait, to start again."""
        for seq in out.seqs:
            self.kv_cache_manager.forget_uncomputed(seq)
        for seq, scheduled in reversed(list(zip(out.seqs, out.scheduled))):
            if scheduled.is_new and seq.status == SequenceStatus.RUNNING:
                self.running.remove(seq)
                self._requeue(seq)

    def fork(self, parent: Sequence, children: list[Sequence]) -> None:
        """M6: `parent` sampled its first token; its siblings start from its prompt but
        the last token, on its blocks (shared, not recomputed; a partly filled last one
        is copied at a child's first write), and each computes that last token itself to
        sample its own first token. A child with no room in the running batch (the
        parent's place counts if it has just finished) waits instead, and computes its
        prompt (from the prefix cache where it can)."""
        num_tokens = parent.num_prompt_tokens - 1
        room = self.config.max_batch_size - len(self.running) + parent.status.is_finished
        no_room = children[max(0, room):]
        self.waiting.extendleft(reversed(no_room))  # first in line, in order
        for child in children[:len(children) - len(no_room)]:
            self.kv_cache_manager.fork(parent, child, num_tokens)
            child.num_computed_tokens = child.num_cached_tokens = num_tokens
            child.status = SequenceStatus.RUNNING
            self.running.append(child)

    def finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its blocks."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache_manager.free(seq)
        self.freed_request_ids.append(seq.name)

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
