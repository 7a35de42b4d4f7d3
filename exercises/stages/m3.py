"""M3 · paged KV: the block pool, blocks taken as a sequence grows, the slot mapping,
and preemption."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m3.1", "the block pool: take free blocks, give them back",
        ("core/block_pool.py::BlockPool.allocate", "core/block_pool.py::BlockPool.free"),
        "easy",
        "Every block of the paged cache is in one pool; a sequence holds blocks, not a "
        "slot sized for its longest case. The ref count says who holds a block (M6 shares "
        "blocks through it).",
        "allocate: refuse more than are free (RuntimeError), pop n blocks from the left of\n"
        "free_block_queue, set each one's ref_count to 1. free: drop each block's ref_count\n"
        "by one (a block at 0 is freed twice: RuntimeError); at 0 it goes back, at the right."),
    Exercise(
        "m3.2", "grow a sequence into blocks as its tokens arrive",
        ("core/kv_cache_manager.py::KVCacheManager.num_blocks_needed",
         "core/kv_cache_manager.py::KVCacheManager.allocate_slots"),
        "easy",
        "Blocks are taken only when the tokens need them, so at most one block per "
        "sequence is partly empty: the waste of M2's slots is gone.",
        "The sequence will hold num_computed_tokens + num_new_tokens tokens: cdiv(that,\n"
        "block_size) blocks, of which it has len(seq.kv_blocks). allocate_slots takes the\n"
        "missing ones from the pool, or returns False (taking none) if too few are free."),
    Exercise(
        "m3.3", "the slot mapping: where a token's K/V go",
        ("worker/input_batch.py::slot_of",),
        "easy",
        "The attention reads and writes K/V through the block table: a token's position "
        "names a block of the table and an offset in it.",
        "Token p is at offset p % block_size of block block_ids[p // block_size]; the cache\n"
        "is [num_blocks * block_size] slots, block b's first slot is b * block_size."),
    Exercise(
        "m3.4", "preemption: the newest gives way when blocks run out",
        ("core/sched/scheduler.py::Scheduler._schedule_running",),
        "medium",
        "When the pool runs dry mid-decode, something must give: the newest sequence is "
        "preempted (its blocks freed, recomputed later) so the older ones finish.",
        "Take running sequences oldest first (popleft). For each, kv.allocate_slots(seq,\n"
        "num_new_tokens(seq)); while that fails, preempt the newest still running\n"
        "(self.running.pop(); the sequence itself when none is left) with self._preempt.\n"
        "Return the ones still RUNNING, in order, and put them back in self.running."),
]
