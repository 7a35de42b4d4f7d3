"""The paged KV cache (M3 on): block pool, block tables, preemption, sizing, bad input.

Introduced in M3 (issue 4). The block pool and the KV cache manager are tested alone
(and with hypothesis over random operations); the engine over random workloads with a
fake forward pass, checking block ownership at every step; preemption and block sizes
with a tiny model, whose tokens must not change when the pool is small.
"""

import collections

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import load_stage, model_runner, stages_with
from test_batching import (assert_kv_cache_empty, computed_before_step,  # noqa: F401
                           drive_random_workload, tiny_kv_bytes_per_token, workloads)  # (a fixture, for tests here)

PAGED_STAGES = stages_with("paged")


def core(stage: str, name: str):
    return load_stage(f"{stage}.core.{name}")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def tiny(stage: str, **kwargs):
    kwargs = {"max_model_len": 128, "device": "cpu", "dtype": "float32", **kwargs}
    return load_stage(stage).LLM("dummy:tiny-llama", **kwargs)


def sampling(stage: str, **kwargs):
    return load_stage(stage).SamplingParams(**kwargs)


def steps(engine, limit: int = 2000):
    """The engine's step outputs until it is done; fails rather than hang."""
    for _ in range(limit):
        if not engine.has_unfinished_requests():
            return
        yield engine.step()
    raise AssertionError(f"not finished after {limit} steps")


# --- the block pool --------------------------------------------------------------------

@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_block_pool_allocate_and_free(stage):
    pool = core(stage, "block_pool").BlockPool(4)
    assert pool.num_free_blocks == 4
    a = pool.allocate(3)
    assert [b.ref_count for b in a] == [1, 1, 1] and len({b.block_id for b in a}) == 3
    assert pool.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        pool.allocate(2)  # only one is free
    assert pool.num_free_blocks == 1  # and nothing was taken
    pool.free(a[:2])
    assert pool.num_free_blocks == 3 and [b.ref_count for b in a] == [0, 0, 1]
    with pytest.raises(RuntimeError, match="twice"):
        pool.free([a[0]])
    assert a[0].ref_count == 0  # never negative
    b = pool.allocate(3)  # freed blocks come back
    assert {blk.block_id for blk in b} | {a[2].block_id} == {0, 1, 2, 3}


@pytest.mark.parametrize("stage", PAGED_STAGES)
@settings(max_examples=40, deadline=None)
@given(num_blocks=st.integers(1, 12),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 5), st.integers(0, 4)),
                    max_size=40))
def test_block_pool_random_operations(stage, num_blocks, ops):
    """Owners allocate and free at random: counts add up, no block has two owners."""
    pool = core(stage, "block_pool").BlockPool(num_blocks)
    owners: list[list] = [[] for _ in range(5)]
    for allocate, n, who in ops:
        if allocate:
            if n <= pool.num_free_blocks:
                owners[who] += pool.allocate(n)
            else:
                with pytest.raises(RuntimeError):
                    pool.allocate(n)
        else:
            pool.free(owners[who])
            owners[who] = []
        held = [b.block_id for blocks in owners for b in blocks]
        assert len(held) == len(set(held)), "a block has two owners"
        assert len(held) + pool.num_free_blocks == num_blocks
        assert all(b.ref_count == (1 if b.block_id in held else 0) for b in pool.blocks)
    for blocks in owners:
        pool.free(blocks)
    assert pool.num_free_blocks == num_blocks


@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_kv_cache_manager_grows_a_sequence_block_by_block(stage):
    manager = core(stage, "kv_cache_manager").KVCacheManager(num_blocks=5, block_size=4)
    Sequence = load_stage(f"{stage}.request").Sequence
    seq = Sequence(0, "s", list(range(10, 20)))  # 10 tokens
    assert manager.allocate_slots(seq, 10)
    assert len(seq.kv_blocks) == 3 and manager.num_free_blocks == 2
    table = manager.block_table(seq)
    assert table == [b.block_id for b in seq.kv_blocks]
    # The worker turns the table into slots: token i at offset i % 4 of block table[i // 4].
    slot_of = load_stage(f"{stage}.worker.input_batch").slot_of
    assert [slot_of(table, 4, i) for i in range(10)] == [table[i // 4] * 4 + i % 4
                                                         for i in range(10)]
    assert len({slot_of(table, 4, i) for i in range(10)}) == 10
    seq.num_computed_tokens = 10
    for total in range(11, 21):  # one token at a time: a new block every 4 tokens
        assert manager.allocate_slots(seq, 1)
        assert len(seq.kv_blocks) == cdiv(total, 4)
        seq.num_computed_tokens = total
    assert manager.num_free_blocks == 0
    other = Sequence(1, "t", [1, 2])
    assert not manager.allocate_slots(other, 2)  # the pool is empty
    assert other.kv_blocks == []
    assert not manager.allocate_slots(seq, 1)  # 21 tokens need a sixth block
    assert len(seq.kv_blocks) == 5
    manager.free(seq)
    assert seq.kv_blocks == [] and manager.num_free_blocks == 5
    assert manager.allocate_slots(other, 2) and len(other.kv_blocks) == 1


# --- the engine over random workloads (fake forward pass) --------------------------------

def free_blocks(pool) -> list:
    """The pool's free blocks, in queue order (M6 keeps them in an OrderedDict by id)."""
    if hasattr(pool, "free_blocks"):
        return list(pool.free_blocks.values())
    return list(pool.free_block_queue)


def check_blocks(engine, seqs, is_prefill, num_new) -> None:
    """Every step: each sequence holds exactly the blocks its tokens need, a block's ref
    count is the number of sequences that hold it (1 before M6's prefix cache shares
    blocks), free blocks are held by none, and held + free = all blocks."""
    scheduler = engine.scheduler
    kv = scheduler.kv_cache_manager
    pool, size = kv.block_pool, kv.block_size
    holders = collections.Counter()
    for seq in scheduler.running:
        tokens = computed_before_step(seq, num_new) + num_new.get(seq.seq_id, 0)
        assert len(seq.kv_blocks) == cdiv(tokens, size)
        assert len(set(map(id, seq.kv_blocks))) == len(seq.kv_blocks)
        holders.update(b.block_id for b in seq.kv_blocks)
    for block_id, count in holders.items():
        assert pool.blocks[block_id].ref_count == count
    if not hasattr(pool, "cached_blocks"):  # before M6 no block is shared
        assert set(holders.values()) <= {1}, "a block is held by two sequences"
    assert all(seq.kv_blocks == [] for seq in scheduler.waiting)
    free = [b.block_id for b in free_blocks(pool)]
    assert len(free) == len(set(free)) and not set(free) & set(holders)
    assert len(holders) + len(free) == pool.num_blocks
    assert all(pool.blocks[i].ref_count == 0 for i in free)


@pytest.mark.parametrize("stage", PAGED_STAGES)
@settings(max_examples=30, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(workload=workloads(max_kv_tokens=128, min_max_tokens=8, last_arrival=3,
                          min_requests=3, min_batch_size=2),
       block_size=st.sampled_from([1, 4, 16]))
def test_random_workloads_blocks(stage, workload, block_size, tiny_kv_bytes_per_token):
    engine = drive_random_workload(stage, workload, tiny_kv_bytes_per_token, check_blocks,
                                   block_size=block_size)
    stats = engine.kv_cache_stats()
    assert stats["block_size"] == block_size
    assert stats["num_blocks"] == workload["kv_tokens"] // block_size
    assert stats["used_token_slots_peak"] <= stats["reserved_token_slots_peak"]
    assert stats["reserved_token_slots_peak"] <= stats["capacity_token_slots"]
    event("preempted" if stats["num_preemptions"] else "no preemption")


# --- preemption ------------------------------------------------------------------------

PREEMPT_PROMPTS = [[3 + (11 * i + 5 * k) % 250 for k in range(20 + 3 * i)] for i in range(6)]


@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_preemption_keeps_every_token(stage):
    """A pool of 12 blocks (192 tokens) for 6 requests that reach 60-75 tokens each."""
    params = [sampling(stage, temperature=0 if i % 2 else 0.9, seed=100 + i, max_tokens=40,
                       ignore_eos=True) for i in range(6)]
    roomy = tiny(stage)
    expected = roomy.generate(PREEMPT_PROMPTS, params, use_tqdm=False)
    assert roomy.engine.kv_cache_stats()["num_preemptions"] == 0
    bytes_per_token = model_runner(roomy).kv_cache_bytes_per_token()
    small = tiny(stage, kv_cache_memory=12 * 16 * bytes_per_token)
    assert small.engine.kv_cache_stats()["num_blocks"] == 12
    outputs, finished = {}, {}
    for i, (prompt, sp) in enumerate(zip(PREEMPT_PROMPTS, params)):
        small.engine.add_request(f"p{i}", prompt, sp)
    for step in steps(small.engine):
        for out in step:
            assert out.request_id not in finished
            # Streaming never repeats or loses a token across a preemption.
            assert len(out.token_ids) == len(outputs.get(out.request_id, [])) + 1
            assert out.token_ids[:-1] == outputs.get(out.request_id, [])
            outputs[out.request_id] = out.token_ids
            if out.finished:
                finished[out.request_id] = out
    stats = small.engine.kv_cache_stats()
    assert stats["num_preemptions"] > 0
    assert stats["reserved_token_slots_peak"] <= 12 * 16
    for i, ref in enumerate(expected):
        out = finished[f"p{i}"]
        assert out.token_ids == ref.token_ids, f"{stage}: p{i} changed after preemption"
        assert out.text == ref.text and out.finish_reason == "length"
    assert_kv_cache_empty(small.engine)


@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_block_size_does_not_change_tokens(stage):
    prompts = [PREEMPT_PROMPTS[0], PREEMPT_PROMPTS[5][:37], [7]]
    sp = sampling(stage, temperature=0, max_tokens=20, ignore_eos=True)
    results = {}
    for block_size in (1, 4, 16, 64):
        llm = tiny(stage, block_size=block_size, kv_cache_memory=2**20)
        results[block_size] = [o.token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        assert model_runner(llm).kv_caches[0][0].shape[1] == block_size
    assert results[1] == results[4] == results[16] == results[64]


@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_paged_runs_more_sequences_than_whole_slots(stage, tiny_kv_bytes_per_token):
    """The memory of 2 contiguous max_model_len slots (M2) runs all 8 requests at once."""
    budget = 2 * 512 * tiny_kv_bytes_per_token
    paged = tiny(stage, max_model_len=512, kv_cache_memory=budget)
    sp = sampling(stage, temperature=0, max_tokens=20, ignore_eos=True)
    prompts = [[5 + i] * (30 + 10 * i) for i in range(8)]  # 30 .. 100 tokens
    paged.generate(prompts, sp, use_tqdm=False)
    stats = paged.engine.kv_cache_stats()
    assert stats["max_concurrent_seqs"] == 8 and stats["num_preemptions"] == 0
    # All 8 prompts with their outputs fit in the blocks of 2 slots: 520 + 8 * 20 tokens.
    assert stats["used_token_slots_peak"] == sum(len(p) for p in prompts) + 8 * 19
    assert stats["reserved_token_slots_peak"] - stats["used_token_slots_peak"] < 8 * 16


# --- sizing and bad input --------------------------------------------------------------

@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_num_blocks_from_kv_cache_memory(stage):
    llm = tiny(stage, block_size=8, kv_cache_memory=10**6)
    per_token = model_runner(llm).kv_cache_bytes_per_token()
    num_blocks = 10**6 // (8 * per_token)
    assert llm.engine.kv_cache_stats()["num_blocks"] == num_blocks
    k_cache, v_cache = model_runner(llm).kv_caches[0]
    mc = model_runner(llm).model_config
    assert k_cache.shape == v_cache.shape == (num_blocks, 8, mc.num_key_value_heads,
                                              mc.head_dim)
    assert len(model_runner(llm).kv_caches) == mc.num_hidden_layers
    # On the CPU, without a budget: 1 GiB.
    default = tiny(stage)
    assert default.engine.kv_cache_stats()["kv_cache_bytes"] == (
        2**30 // (16 * per_token) * 16 * per_token)


@pytest.mark.parametrize("stage", PAGED_STAGES)
@pytest.mark.parametrize("block_size", [0, 3, 12, 24, -16])
def test_block_size_must_be_a_power_of_two(stage, block_size):
    with pytest.raises(ValueError, match="block_size.*power of two"):
        load_stage(stage).EngineConfig(block_size=block_size)


@pytest.mark.parametrize("stage", PAGED_STAGES)
@pytest.mark.parametrize("field,value,match", [
    ("gpu_memory_utilization", 0, "gpu_memory_utilization"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization"),
])
def test_bad_paged_settings(stage, field, value, match):
    with pytest.raises(ValueError, match=match):
        load_stage(stage).EngineConfig(**{field: value})


@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_request_larger_than_the_pool_is_refused(stage, tiny_kv_bytes_per_token):
    per_token = tiny_kv_bytes_per_token
    with pytest.warns(UserWarning, match="fewer than max_model_len"):
        llm = tiny(stage, kv_cache_memory=4 * 16 * per_token)  # 64 tokens
    engine = llm.engine
    sp = sampling(stage, temperature=0, max_tokens=40, ignore_eos=True)
    with pytest.raises(ValueError, match="prompt.*KV cache blocks.*kv_cache_memory"):
        engine.add_request("big", [5] * 64, sp)  # 64 + 1 tokens do not fit in 64
    assert not engine.has_unfinished_requests()
    # 63 fit; the output stops where the cache is full, as at max_model_len.
    engine.add_request("big", [5] * 50, sp)
    finished = {}
    for step in steps(engine):
        finished.update({o.request_id: o for o in step if o.finished})
    assert len(finished["big"].token_ids) == 64 - 50
    assert finished["big"].finish_reason == "length"
    assert_kv_cache_empty(engine)


@pytest.mark.gpu
@pytest.mark.parametrize("stage", PAGED_STAGES)
def test_cuda_sizing_uses_gpu_memory_utilization(stage):
    """On CUDA, without kv_cache_memory: the blocks fill what gpu_memory_utilization leaves."""
    mod = load_stage(stage)
    torch.cuda.empty_cache()
    free_before, total = torch.cuda.mem_get_info()
    llm = mod.LLM("dummy:qwen2.5-0.5b", device="cuda", gpu_memory_utilization=0.9,
                  max_model_len=1024, max_num_batched_tokens=2048)
    stats = llm.engine.kv_cache_stats()
    assert stats["num_blocks"] > 0
    assert 0 < stats["kv_cache_bytes"] <= 0.9 * total - (total - free_before)
    assert torch.cuda.memory_allocated() <= 0.9 * total
    out = llm.generate([[5] * 100, [6] * 900], mod.SamplingParams(temperature=0, max_tokens=8,
                                                                  ignore_eos=True),
                       use_tqdm=False)
    assert [len(o.token_ids) for o in out] == [8, 8]
    del llm
    torch.cuda.empty_cache()
