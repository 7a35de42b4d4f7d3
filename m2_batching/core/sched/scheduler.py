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
decodes in one step is M5's lesson). Either way the output has one shape (vLLM v1's):
per sequence, the tokens it computes from `num_computed_tokens` on, and its block ids
(`core/sched/output.py`). After the step, `update_from_output` advances each one's
`num_computed_tokens`. The scheduler only keeps books: it never touches the model, so
it can be driven, and tested, without one.
"""

from collections import deque

from ...config import EngineConfig
from ...request import Sequence, SequenceStatus
from .output import ScheduledSequence, SchedulerOutput


class Scheduler:
    def __init__(self, config: EngineConfig, num_kv_slots: int) -> None:
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
        out = SchedulerOutput([self._scheduled(seq) for seq in admitted], admitted,
                              sum(num_new_tokens(seq) for seq in admitted))
        self._record_usage(out)
        return out

    def _scheduled(self, seq: Sequence) -> ScheduledSequence:
        start = seq.num_computed_tokens
        return ScheduledSequence(seq.request_id, seq.token_ids[start:], start, [seq.kv_slot])

    def update_from_output(self, out: SchedulerOutput) -> None:
        """The step ran: the K/V of every scheduled token are in the cache now."""
        for seq, scheduled in zip(out.seqs, out.scheduled):
            seq.num_computed_tokens += len(scheduled.new_token_ids)

    def finish(self, seq: Sequence) -> None:
        """A sequence finished or was aborted: it leaves its queue and frees its slot."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.free_slot(seq)

    def _record_usage(self, out: SchedulerOutput) -> None:
        # After this step a scheduled sequence holds all its tokens but the one it samples.
        used = sum(seq.num_computed_tokens for seq in self.running) + out.num_batched_tokens
        self.used_token_slots_peak = max(self.used_token_slots_peak, used)
        self.max_concurrent_seqs = max(self.max_concurrent_seqs, len(self.running))


def num_new_tokens(seq: Sequence) -> int:
    """Tokens of `seq` whose K/V are not in the cache yet: its prompt when it starts (its
    prompt and output after a preemption), then the one token sampled in the last step."""
    return len(seq.token_ids) - seq.num_computed_tokens
