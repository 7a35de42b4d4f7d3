"""The scheduler: which sequences run in the next step (continuous batching).

Introduced in M2. New requests wait in a first-come-first-served queue. The decision of
what runs is made again at every step (iteration-level scheduling, as in Orca and
vLLM), so a request that finishes leaves after the step that finished it and a waiting
one can join in the very next step. A step is either

- a prefill: newly admitted sequences, each one's whole prompt, in one forward pass.
  Admission goes in arrival order while the batch stays within `max_batch_size`
  sequences (the running ones included), the prompts within `max_num_batched_tokens`
  tokens, and a KV cache slot is free. A prompt longer than the token budget is
  admitted alone, so it never waits forever; or
- a decode: every running sequence, one token each.

Prefills go first whenever one can be admitted (vLLM v0's policy; mixing prefills and
decodes in one step is M5's lesson). The scheduler only keeps books: it never touches
the model, so it can be driven, and tested, without one.
"""

from collections import deque
from dataclasses import dataclass

from ...config import SchedulerConfig
from ...request import Sequence, SequenceStatus


@dataclass
class SchedulerOutput:
    """What runs in one step."""

    seqs: list[Sequence]
    is_prefill: bool  # True: whole prompts of newly admitted sequences; False: one token each
    num_batched_tokens: int  # tokens that go through the model in this step


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_kv_slots: int) -> None:
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        # The KV cache has one slot per sequence that may run at once.
        self.num_kv_slots = num_kv_slots
        self.free_slots: deque[int] = deque(range(num_kv_slots))
        # Statistics, for kv_cache_stats()
        self.used_token_slots_peak = 0  # most tokens held in the KV cache after a step
        self.max_concurrent_seqs = 0

    def add_sequence(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def used_token_slots(self) -> int:
        """Tokens whose keys and values are in the KV cache now."""
        return sum(seq.num_cached_tokens for seq in self.running)

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
        cfg = self.config
        admitted: list[Sequence] = []
        num_tokens = 0
        while self.waiting and len(self.running) + len(admitted) < cfg.max_batch_size:
            seq = self.waiting[0]
            num_new = len(seq.token_ids)
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
            out = SchedulerOutput(admitted, is_prefill=True, num_batched_tokens=num_tokens)
        else:
            out = SchedulerOutput(list(self.running), is_prefill=False,
                                  num_batched_tokens=len(self.running))
        self._record_usage(out)
        return out

    def finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_slot(seq)

    def _record_usage(self, out: SchedulerOutput) -> None:
        # After this step a scheduled sequence holds all its tokens but the one it samples.
        used = sum(seq.num_cached_tokens for seq in self.running)
        used += sum(len(seq.token_ids) - seq.num_cached_tokens for seq in out.seqs)
        self.used_token_slots_peak = max(self.used_token_slots_peak, used)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))
