"""Checks of M3's exercises: the block pool, growing into blocks, the slot mapping,
preemption. Each test runs on its exercise's package (the `stage` fixture)."""

import pytest

m31 = pytest.mark.exercise("m3.1")
m32 = pytest.mark.exercise("m3.2")
m33 = pytest.mark.exercise("m3.3")
m34 = pytest.mark.exercise("m3.4")


def free_ids(pool):
    return [block.block_id for block in pool.free_block_queue]


@m31
def test_allocate_takes_the_first_free_blocks(stage):
    pool = stage("core.block_pool").BlockPool(5)
    blocks = pool.allocate(2)
    assert [b.block_id for b in blocks] == [0, 1]
    assert [b.ref_count for b in blocks] == [1, 1]
    assert pool.num_free_blocks == 3 and free_ids(pool) == [2, 3, 4]
    assert pool.allocate(0) == []


@m31
def test_allocate_refuses_more_than_are_free(stage):
    pool = stage("core.block_pool").BlockPool(2)
    pool.allocate(1)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1  # nothing taken by the refused call


@m31
def test_freed_blocks_go_to_the_back_of_the_queue(stage):
    pool = stage("core.block_pool").BlockPool(4)
    a, b = pool.allocate(1), pool.allocate(2)
    pool.free(a)
    assert a[0].ref_count == 0 and free_ids(pool) == [3, 0]
    pool.free(b)
    assert free_ids(pool) == [3, 0, 1, 2]
    assert [blk.block_id for blk in pool.allocate(4)] == [3, 0, 1, 2]


@m31
def test_a_shared_block_is_free_only_when_its_last_holder_lets_go(stage):
    pool = stage("core.block_pool").BlockPool(2)
    [block] = pool.allocate(1)
    block.ref_count = 2  # two sequences hold it (what M6's prefix cache does)
    pool.free([block])
    assert block.ref_count == 1 and pool.num_free_blocks == 1
    pool.free([block])
    assert block.ref_count == 0 and pool.num_free_blocks == 2


@m31
def test_freeing_a_free_block_is_an_error(stage):
    pool = stage("core.block_pool").BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError):
        pool.free(blocks)
    assert pool.num_free_blocks == 2


def sequence(stage, num_tokens, computed=0):
    seq = stage("request").Sequence(0, "r0", list(range(num_tokens)))
    seq.num_computed_tokens = computed
    return seq


@m32
@pytest.mark.parametrize("computed, new, held, needed", [
    (0, 1, 0, 1), (0, 4, 0, 1), (0, 5, 0, 2), (0, 12, 0, 3), (4, 1, 1, 1),
    (3, 1, 1, 0), (7, 1, 2, 0), (8, 1, 2, 1), (0, 0, 0, 0), (5, 2, 3, 0)])
def test_blocks_needed(stage, computed, new, held, needed):
    kv = stage("core.kv_cache_manager").KVCacheManager(num_blocks=8, block_size=4)
    seq = sequence(stage, computed + new, computed)
    seq.kv_blocks = kv.block_pool.allocate(held)
    assert kv.num_blocks_needed(seq, new) == needed


@m32
def test_a_sequence_grows_one_block_at_a_time(stage):
    kv = stage("core.kv_cache_manager").KVCacheManager(num_blocks=8, block_size=4)
    seq = sequence(stage, 6)
    assert kv.allocate_slots(seq, 6)
    assert kv.block_table(seq) == [0, 1] and kv.num_free_blocks == 6
    seq.num_computed_tokens = 6
    for step in range(2):  # tokens 7 and 8 fit in block 1
        assert kv.allocate_slots(seq, 1)
        assert kv.block_table(seq) == [0, 1]
        seq.num_computed_tokens += 1
    assert kv.allocate_slots(seq, 1)  # token 9 needs block 2
    assert kv.block_table(seq) == [0, 1, 2] and kv.num_free_blocks == 5


@m32
def test_allocate_slots_takes_nothing_when_the_pool_is_short(stage):
    kv = stage("core.kv_cache_manager").KVCacheManager(num_blocks=3, block_size=4)
    first, second = sequence(stage, 8), sequence(stage, 9)
    assert kv.allocate_slots(first, 8)
    assert not kv.allocate_slots(second, 9)  # 3 blocks wanted, 1 free
    assert second.kv_blocks == [] and kv.num_free_blocks == 1
    assert kv.allocate_slots(second, 4)
    assert kv.num_free_blocks == 0


@m33
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_slot_of_every_position(stage, block_size):
    slot_of = stage("worker.input_batch").slot_of
    blocks = [7, 2, 5]
    for position in range(len(blocks) * block_size):
        block, offset = divmod(position, block_size)
        assert slot_of(blocks, block_size, position) == blocks[block] * block_size + offset


@m33
def test_the_slot_mapping_of_a_step(stage):
    import torch
    inputs = stage("worker.input_batch").prepare_inputs(
        [[11, 12, 13], [21]], [0, 5], [[3, 0], [1, 4]], 4, torch.device("cpu"))
    # sequence 0: positions 0-2 in block 3; sequence 1: position 5 is offset 1 of block 4
    assert inputs.attn_metadata.slot_mapping.tolist() == [12, 13, 14, 17]


def scheduler(stage, num_blocks, block_size=4):
    config = stage("config").EngineConfig(model="dummy:tiny-llama", block_size=block_size)
    checker = stage("core.sched.stop_checker").StopChecker(None, [0], 1000)
    return stage("core.sched.scheduler").Scheduler(config, num_blocks, checker)


def running(stage, sched, name_and_lengths):
    """Sequences that ran their prompt: each holds blocks for all but its last token."""
    Sequence, Status = stage("request").Sequence, stage("request").SequenceStatus
    seqs = []
    for seq_id, length in name_and_lengths:
        seq = Sequence(seq_id, f"r{seq_id}", list(range(1, length + 1)))
        seq.num_computed_tokens = length - 1
        assert sched.kv_cache_manager.allocate_slots(seq, 0)
        seq.status = Status.RUNNING
        sched.running.append(seq)
        seqs.append(seq)
    return seqs


@m34
def test_every_running_sequence_decodes_when_blocks_suffice(stage):
    sched = scheduler(stage, num_blocks=10)
    a, b = running(stage, sched, [(0, 5), (1, 9)])  # 2 and 2 blocks held; token 9 needs a 3rd
    out = sched._schedule_running()
    assert out == [a, b] and list(sched.running) == [a, b]
    assert len(b.kv_blocks) == 3 and len(a.kv_blocks) == 2
    assert sched.num_preemptions == 0


@m34
def test_the_newest_is_preempted_when_blocks_run_out(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=6)
    old, mid, new = running(stage, sched, [(0, 9), (1, 8), (2, 5)])  # 2 + 2 + 2 blocks
    out = sched._schedule_running()
    # old needs a 3rd block: new (the newest) gives its 2 back and waits first in line
    assert out == [old, mid] and list(sched.running) == [old, mid]
    assert new.status == Status.WAITING and new.kv_blocks == [] and new.num_computed_tokens == 0
    assert list(sched.waiting) == [new] and sched.num_preemptions == 1
    assert len(old.kv_blocks) == 3 and sched.kv_cache_manager.num_free_blocks == 1


@m34
def test_a_sequence_preempts_itself_when_it_is_the_newest_left(stage):
    Status = stage("request").SequenceStatus
    sched = scheduler(stage, num_blocks=4)
    a, b = running(stage, sched, [(0, 9), (1, 9)])  # 2 + 2 blocks, each needs a 3rd
    out = sched._schedule_running()
    # a preempts b and takes a block; nothing left to preempt for... a is served, b waits
    assert out == [a] and list(sched.running) == [a]
    assert b.status == Status.WAITING and list(sched.waiting) == [b]
    sched2 = scheduler(stage, num_blocks=2)
    [c] = running(stage, sched2, [(0, 9)])  # alone, holds both blocks, needs a 3rd
    assert sched2._schedule_running() == [] and list(sched2.waiting) == [c]
    assert c.status == Status.WAITING and sched2.kv_cache_manager.num_free_blocks == 2
