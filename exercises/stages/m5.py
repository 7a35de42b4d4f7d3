"""M5 · chunked prefill: one token budget per step, running sequences first, prompts cut
into chunks in what is left, admitted only with room for the whole prompt."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m5.1", "cut a chunk, and name the token after it",
        ("core/sched/scheduler.py::Scheduler._chunk",
         "core/sched/scheduler.py::Scheduler._scheduled"),
        "easy",
        "A prompt no longer runs whole: each step computes as many of its tokens as the "
        "budget leaves, and a chunk that stops inside the prompt samples nothing; it names "
        "the prompt's next token instead.",
        "_chunk: the sequence's uncomputed tokens (num_new_tokens(seq)), at most the budget\n"
        "left and config.max_chunk_size (None: no cap). _scheduled: next_token_id is\n"
        "seq.token_ids[end] when the chunk ends before the last known token, else None\n"
        "(the step samples the sequence's next token)."),
    Exercise(
        "m5.2", "running sequences first: decodes and chunks",
        ("core/sched/scheduler.py::Scheduler._schedule_by_budget",),
        "medium",
        "The running sequences spend the budget before any new prompt, oldest first: a "
        "decode's one token, a started prompt's next chunk. So a long prompt arriving "
        "never stalls the ones that are generating.",
        "Oldest first, over list(self.running): stop once budget is 0; skip a seq not\n"
        "RUNNING or with stop_checker.ends_by_length(seq, seq.num_pending_tokens).\n"
        "num_new = self._chunk(...); while kv.allocate_slots fails, self._preempt the newest\n"
        "(self.running.pop(); seq itself: give up). Any preemption: return chosen, no admits."),
    Exercise(
        "m5.3", "admit waiting prompts into what the budget leaves",
        ("core/sched/scheduler.py::Scheduler._schedule_by_budget",),
        "medium",
        "What the running sequences leave of the budget goes to waiting prompts, first come "
        "first served, each as much of its prompt as fits: several short prompts share a "
        "step, a long one starts with a chunk.",
        "promised = self._blocks_promised() (if any wait). While a prompt waits, budget is\n"
        "left and fewer than max_batch_size run: chunk the first waiting one, self._admit it\n"
        "(others_running, promised) or stop; add the blocks its whole prompt still needs to\n"
        "promised, append it to self.running and chosen, spend the budget. Return chosen."),
    Exercise(
        "m5.4", "room for the whole prompt, not just its chunk",
        ("core/sched/scheduler.py::Scheduler._blocks_promised",
         "core/sched/scheduler.py::Scheduler._admit"),
        "medium",
        "A prompt admitted chunk by chunk holds blocks for its first chunk only; if its "
        "later chunks found the pool empty, running sequences would be preempted and "
        "computed again. Admission reserves room for every started prompt's rest.",
        "_blocks_promised: the sum of kv.num_blocks_needed(seq, num_new_tokens(seq)) over\n"
        "self.running. _admit: with others running, refuse (return False) when the free\n"
        "blocks less promised less the blocks of seq's whole rest fall below\n"
        "self.watermark_blocks; alone, a prompt may take the whole pool."),
]
