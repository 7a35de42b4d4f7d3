"""M2 · batching: admitting waiting requests each step, the flat batch, a step's results,
and the batched attention's mask."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m2.1", "admit waiting requests within the step's limits",
        ("core/sched/scheduler.py::Scheduler.schedule",),
        "medium",
        "Continuous batching decides again at every step what runs: waiting requests join "
        "as soon as a slot and the step's budget allow, oldest first.",
        "Oldest first, while len(running) + len(admitted) < max_batch_size: stop at a prompt\n"
        "(num_new_tokens) past max_num_batched_tokens (the first one always goes) or with no\n"
        "free slot (allocate_slot). An admitted one leaves waiting, is RUNNING, joins running.\n"
        "The code below runs `admitted`: those admitted, or (if none) every running sequence."),
    Exercise(
        "m2.2", "the flat batch: positions, query starts, slots",
        ("worker/input_batch.py::prepare_inputs",),
        "medium",
        "One forward pass runs every scheduled sequence: their new tokens are laid end to "
        "end, and the metadata tells attention where each sequence starts and ends.",
        "Per sequence: its tokens at positions start .. start + n - 1, each token's slot_of,\n"
        "query_start_loc (a running sum from 0), seq_lens = start + n. block_tables padded\n"
        "with 0 to the longest; logits_indices: each sequence's last row. Tensors are long."),
    Exercise(
        "m2.3", "after a step: append, advance, finish, free the slot",
        ("core/sched/scheduler.py::Scheduler.update_from_output",
         "core/sched/scheduler.py::Scheduler._finish"),
        "easy",
        "A finished request leaves right after the step that finished it and frees its slot, "
        "so a waiting one can take it in the very next step.",
        "Per sequence of out.seqs (with its scheduled entry and runner outputs): stop_checker\n"
        "append_token and record_logprobs (from scheduled.num_computed_tokens); its computed\n"
        "tokens grow by the new ones; a finished one goes (_finish). _finish: leave running\n"
        "or waiting, free_slot, and its name joins finished_seq_names."),
    Exercise(
        "m2.4", "batched attention: gather keys, mask future and padding",
        ("attention/backends/torch_ref.py::_call",),
        "hard",
        "Sequences of different lengths share one attention call: each one's keys are "
        "gathered into a padded row, and the mask hides the future and the padding.",
        "For the seqs: key positions 0 .. max_len - 1 (past seq_len - 1 read position\n"
        "seq_len - 1); key_slots through block_tables (block * block_size + offset). Query j\n"
        "is at seq_len - num_queries + j: it sees keys <= itself and < seq_len. Mask [B, Q, L]\n"
        "repeat_interleave(group) on Q, then unsqueeze(1); AttentionCall(rows, slots, mask)."),
]
