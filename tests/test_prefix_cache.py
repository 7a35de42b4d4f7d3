"""Prefix caching (M6 on): requests that start alike share the KV cache blocks of their
prefix; n samples of one request fork from the first one's blocks (copy-on-write).

Introduced in M6 (issue 11), for every stage with the `prefix_cache` feature. What is
tested:

- the settings: `enable_prefix_caching` (a bool); `SamplingParams.n` (an int >= 1, not
  a bool; greedy n > 1 refused; seed + n - 1 < 2**64); n > max_batch_size and request
  ids that collide with a live sample's name refused by the engine;
- the block pool alone: the sha256 hash chain, the LRU free queue that keeps freed
  cached blocks until they are evicted, hits revived out of its middle (by hand, and
  with hypothesis against a model of the pool);
- tokens: greedy outputs of `dummy:tiny-llama` (CPU, fp32, blocks of 4 tokens) with the
  cache on equal those with it off and M5's, on prompts full of shared prefixes, for
  several budgets, chunk caps, batch sizes and with chunking off; the hit lengths by
  hand (whole blocks + 1 token, a prompt of exactly k blocks that hits k - 1, a prefix
  that diverges inside a block, a follow-up turn that hits the blocks of the reply but
  not the one its last, never computed, token would fill); hits on freed blocks,
  least-recently-used eviction from a pool of 16 blocks, preemption whose recomputation
  hits, several requests that hit in the step that computes their prefix; tiny
  transformers models (llama, qwen3) with a warm cache give transformers' tokens;
- the scheduler with a fake forward pass that keeps, per cache slot, which tokens its
  K/V stand for (hypothesis, random workloads of shared prefixes, n samples, aborts,
  tiny pools, failed steps): every sequence reads the K/V of its own tokens, ref counts
  are the holders, the free queue and the hash map agree, a cached block holds what its
  hash says and is never written again, a request starts with the blocks its lookup
  found (the longest cached prefix, one token left to compute), forks share the first
  sample's blocks and copy the partly filled one before writing;
- n samples (seeded): each equals the request run alone with seed + i, with and
  without copy-on-write (the copy's K/V equal the source's), when the first sample
  stops at its first token, with no room in the batch for the others, with logprobs;
  abort before and after the fork frees everything; prompt_logprobs skip the cache;
- a failed step undoes its cache entries; `reset_prefix_cache` (refused while requests
  run or wait) and the hit statistics, exact on a small case;
- the `flash` backend (Triton's interpreter on the CPU) with hits and n samples gives
  the torch backend's tokens; the CLI (--system, --n, --no-prefix-caching);
- on a GPU (bf16, CUDA graphs): tokens with the cache on against off (a match rate and
  first-token log-probabilities, as tests/test_gpu.py compares bf16), and seeded samples
  against their solo runs.
"""

import collections
import hashlib
import re
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import event as hypothesis_event
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from transformers.utils import logging as hf_logging

from conftest import STAGES as PRESENT_STAGES
from conftest import (forward_entry, hf_greedy, load_stage, make_tiny_hf_model, replace_forward,
                      run_cli, stages_with)
from test_batching import (assert_kv_cache_empty, computed_before_step,  # noqa: F401
                           fake_token, record_step,
                           run_to_end, tiny_kv_bytes_per_token)
from test_chunked_prefill import spy_on_chunks
from test_parity import TINY_CONFIGS
from test_reliability import fail_on_call

hf_logging.set_verbosity_error()

STAGES = stages_with("prefix_cache")
# The stage before the prefix cache: its tokens (and its steps) are the reference.
PREVIOUS = "m5_chunked_prefill"
HAS_PREVIOUS = PREVIOUS in PRESENT_STAGES

KV_MEMORY = 2**20  # 2048 tokens of dummy:tiny-llama
BLOCK = 4  # small blocks fill quickly: most prompts span several


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def event(name: str) -> None:
    """hypothesis' event (what a run exercised), also usable outside a hypothesis test."""
    if currently_in_test_context():
        hypothesis_event(name)


def tiny(stage: str, **kwargs):
    """dummy:tiny-llama on the CPU in fp32, blocks of 4 tokens (M5 takes no
    enable_prefix_caching: it has no cache)."""
    kwargs = {"max_model_len": 128, "device": "cpu", "dtype": "float32",
              "kv_cache_memory": KV_MEMORY, "block_size": BLOCK, **kwargs}
    if stage not in STAGES:
        kwargs.pop("enable_prefix_caching", None)
    return load_stage(stage).LLM("dummy:tiny-llama", **kwargs)


def greedy(stage: str, max_tokens: int, **kwargs):
    return load_stage(stage).SamplingParams(temperature=0, max_tokens=max_tokens,
                                            ignore_eos=True, **kwargs)


def sampled(stage: str, max_tokens: int, seed: int, **kwargs):
    return load_stage(stage).SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens,
                                            ignore_eos=True, **kwargs)


def prompt_of(seed: int, n: int) -> list[int]:
    """A fixed prompt of n token ids (< 512, the tiny models' vocabulary)."""
    return [3 + (7 * seed + 13 * k + (k * k) % 17) % 500 for k in range(n)]


def pool_of(llm):
    return llm.engine.scheduler.kv_cache_manager.block_pool


def next_hash(parent: bytes, block_tokens) -> bytes:
    """The hash of a full block after `parent`: sha256 over the parent's hash and the
    block's token ids, 8 bytes each, little-endian (written here from the design, not
    taken from the stage)."""
    return hashlib.sha256(parent + struct.pack(f"<{len(block_tokens)}q", *block_tokens)).digest()


ROOT_HASH = bytes(32)  # the parent of a sequence's first block


def chain(token_ids: list[int], block_size: int = BLOCK) -> list[bytes]:
    """The hashes of the full blocks of `token_ids`."""
    hashes, parent = [], ROOT_HASH
    for i in range(len(token_ids) // block_size):
        parent = next_hash(parent, token_ids[i * block_size:(i + 1) * block_size])
        hashes.append(parent)
    return hashes


def assert_map_consistent(pool) -> None:
    """The hash map and the blocks agree: each entry's block carries its hash, each block
    with a hash is that hash's entry, and a cached block no one holds is in the free queue."""
    for h, block in pool.cached_blocks.items():
        assert block.block_hash == h
        assert block.ref_count > 0 or block.block_id in pool.free_blocks
    for block in pool.blocks:
        if block.block_hash is not None:
            assert pool.cached_blocks.get(block.block_hash) is block
    for block_id, block in pool.free_blocks.items():
        assert block.block_id == block_id and block.ref_count == 0


def spy_on_starts(engine) -> list:
    """(name, num_computed_tokens, the whole block table) of each sequence that starts
    (or restarts) in a step, in the order the steps ran."""
    log = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        out = schedule()
        log.extend((s.seq_name, s.num_computed_tokens, list(s.new_block_ids))
                   for s in out.scheduled if s.is_new)
        return out

    engine.scheduler.schedule = recording_schedule
    return log


def spy_on_lookups(engine) -> list:
    """(name, its tokens, tokens it starts with cached) of each admission, recomputations
    after a preemption included (the statistics count only a prompt's first)."""
    log = []
    scheduler = engine.scheduler
    admit = scheduler._admit

    def recording(seq, *args, **kwargs):
        admitted = admit(seq, *args, **kwargs)
        if admitted:
            log.append((seq.name, len(seq.token_ids), seq.num_cached_tokens))
        return admitted

    scheduler._admit = recording
    return log


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """A float tensor's bit patterns, so that equal NaNs compare equal."""
    return tensor.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[tensor.element_size()])


def spy_on_copies(llm) -> list:
    """The (source, destination) block copies the worker made; each one is checked right
    after it is made: the destination holds the source's keys and values in every layer,
    and the source held something (the prompt's K/V, not an empty block)."""
    runner = llm.engine.model_runner
    copy_blocks = runner.copy_blocks
    log = []

    def checking_copy_blocks(pairs):
        copy_blocks(pairs)
        for src, dst in pairs:
            assert src != dst
            for k_cache, v_cache in runner.kv_caches:  # bit for bit: the cache is left
                for cache in (k_cache, v_cache):      # uninitialized, NaNs may be in it
                    assert torch.equal(bits(cache[dst]), bits(cache[src]))
            assert torch.count_nonzero(runner.kv_caches[0][0][src]) > 0
            log.append((src, dst))

    runner.copy_blocks = checking_copy_blocks
    return log


# --- the settings ----------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_enable_prefix_caching_must_be_a_bool(stage, value):
    with pytest.raises(ValueError, match="enable_prefix_caching"):
        load_stage(stage).EngineConfig(enable_prefix_caching=value)


@pytest.mark.parametrize("stage", STAGES)
def test_n_is_checked(stage):
    SamplingParams = load_stage(stage).SamplingParams
    assert SamplingParams().n == 1 and load_stage(stage).EngineConfig().enable_prefix_caching
    assert SamplingParams(n=4).n == 4  # the default temperature (1.0) samples
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1"):
            SamplingParams(n=bad)
    for bad in (True, 2.0, "2", None):
        with pytest.raises(TypeError, match=r"^n must be an integer"):
            SamplingParams(n=bad)
    with pytest.raises(ValueError, match=r"^n must be 1 with greedy sampling"):
        SamplingParams(n=2, temperature=0)
    assert SamplingParams(n=1, temperature=0).n == 1
    # The i-th sample draws with seed + i: every seed must stay below 2**64.
    assert SamplingParams(n=2, seed=2**64 - 2).seed == 2**64 - 2
    assert SamplingParams(n=1, seed=2**64 - 1).n == 1
    for n, seed in ((2, 2**64 - 1), (3, 2**64 - 2)):
        with pytest.raises(ValueError, match=r"^n must be at most 2\*\*64 - seed"):
            SamplingParams(n=n, seed=seed)


@pytest.mark.parametrize("stage", STAGES)
def test_the_engine_refuses_n_above_the_batch_size_and_names_in_use(stage):
    llm = tiny(stage, max_batch_size=2)
    engine = llm.engine
    with pytest.raises(ValueError, match="n: 3 samples.*max_batch_size=2"):
        engine.add_request("big", [5, 6, 7], sampled(stage, 2, seed=0, n=3))
    assert not engine.requests and not engine.sequences and not engine.has_unfinished_requests()
    # "a" with 2 samples is "a" and "a/1" to the scheduler and the worker.
    engine.add_request("a", [5, 6, 7], sampled(stage, 2, seed=0, n=2))
    assert sorted(engine.sequences) == ["a", "a/1"]
    with pytest.raises(ValueError, match="request_id.*'a/1'.*in use"):
        engine.add_request("a/1", [8, 9], greedy(stage, 2))
    engine.add_request("b/1", [8, 9], greedy(stage, 2))
    with pytest.raises(ValueError, match=r"request_id.*\['b/1'\]"):
        engine.add_request("b", [8, 9], sampled(stage, 2, seed=0, n=2))
    assert sorted(engine.requests) == ["a", "b/1"]  # the refused ones left nothing behind
    assert sorted(engine.sequences) == ["a", "a/1", "b/1"]
    finished = {}
    run_to_end(engine, {}, finished)
    assert sorted(finished) == ["a", "b/1"] and len(finished["a"].outputs) == 2
    assert_kv_cache_empty(engine)


# --- the block pool ----------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_full_blocks_are_named_by_a_sha256_chain(stage):
    """The cache's keys are the hashes of the full computed blocks, each chained to the
    one before: equal blocks after different prefixes have different hashes."""
    llm = tiny(stage)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 0, 5, 6, 7, 8, 9]
    llm.generate([a, b], greedy(stage, 1), use_tqdm=False)  # 9 tokens computed: 2 blocks
    ha, hb = chain(a), chain(b)
    assert len(ha) == len(hb) == 2 and ha[1] != hb[1]  # [5, 6, 7, 8] after different blocks
    assert ha[0] == next_hash(bytes(32), [1, 2, 3, 4]) != next_hash(bytes(32), [4, 3, 2, 1])
    assert next_hash(bytes(32), [256]) != next_hash(bytes(32), [0, 1])  # ids are not bytes
    assert set(pool_of(llm).cached_blocks) == set(ha + hb)
    c = a[:8] + [10, 11]  # a's two blocks, then one token: hits both
    out = llm.generate(c, greedy(stage, 1), use_tqdm=False)[0]
    assert out.num_cached_tokens == 8


@pytest.mark.parametrize("stage", STAGES)
def test_the_free_queue_is_least_recently_used_first(stage):
    bp = load_stage(f"{stage}.core.block_pool")
    pool = bp.BlockPool(5)
    a = pool.allocate(3)
    assert [b.block_id for b in a] == [0, 1, 2] and list(pool.free_blocks) == [3, 4]
    pool.cache(a[0], b"h0")
    pool.cache(a[1], b"h1")
    pool.cache(a[2], b"h0")  # the same tokens twice: the first block stays the cached one
    assert a[2].block_hash is None and pool.cached_block(b"h0") is a[0]
    pool.free(a[::-1])  # a sequence gives its last block first
    # Freed blocks join the back, keeping their hashes: still hits.
    assert list(pool.free_blocks) == [3, 4, 2, 1, 0] and pool.num_free_blocks == 5
    assert pool.cached_block(b"h1") is a[1] and a[1].ref_count == 0
    # A hit takes its block out of the middle of the queue.
    pool.touch([pool.cached_block(b"h1")])
    assert a[1].ref_count == 1 and list(pool.free_blocks) == [3, 4, 2, 0]
    pool.touch([a[1]])  # a second holder
    assert a[1].ref_count == 2 and pool.num_free_blocks == 4
    # Allocation takes the least recently used: the never used ones, then the tail block.
    assert [b.block_id for b in pool.allocate(3)] == [3, 4, 2]
    assert pool.cached_block(b"h0") is a[0]
    (evicted,) = pool.allocate(1)  # block 0: its hash is forgotten
    assert evicted is a[0] and evicted.block_hash is None and pool.cached_block(b"h0") is None
    assert evicted.ref_count == 1
    pool.free([a[1]])
    assert a[1].ref_count == 1 and pool.num_free_blocks == 0  # still held once
    pool.free([a[1]])
    assert list(pool.free_blocks) == [1] and pool.cached_block(b"h1") is a[1]
    with pytest.raises(RuntimeError, match="twice"):
        pool.free([a[1]])
    pool.reset_cache()
    assert pool.cached_blocks == {} and all(b.block_hash is None for b in pool.blocks)
    assert list(pool.free_blocks) == [1]  # forgetting hashes frees nothing


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=30, deadline=None)
@given(num_blocks=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from(["allocate", "free", "touch", "cache",
                                               "uncache"]),
                              st.integers(0, 4), st.integers(0, 2), st.integers(0, 5)),
                    max_size=60))
def test_block_pool_against_a_model(stage, num_blocks, ops):
    """Random allocate / free / touch (a hit) / cache / uncache by three owners, checked
    after every operation against a plain model: the queue's order, ref counts, hashes."""
    pool = load_stage(f"{stage}.core.block_pool").BlockPool(num_blocks)
    free = list(range(num_blocks))  # the model: least recently used first
    ref, hash_of, cached = [0] * num_blocks, [None] * num_blocks, {}
    owners: list[list] = [[] for _ in range(3)]
    for op, n, who, key in ops:
        h = bytes([key]) * 32
        if op == "allocate":
            if n > len(free):
                with pytest.raises(RuntimeError):
                    pool.allocate(n)
            else:
                got = pool.allocate(n)
                assert [b.block_id for b in got] == free[:n]
                for i in free[:n]:
                    cached.pop(hash_of[i], None)
                    hash_of[i], ref[i] = None, 1
                free = free[n:]
                owners[who] += got
        elif op == "free":
            order = owners[who][::-1] if n % 2 else owners[who]
            pool.free(order)
            for block in order:
                ref[block.block_id] -= 1
                if ref[block.block_id] == 0:
                    free.append(block.block_id)
            owners[who] = []
        elif op == "touch":
            if not cached:
                assert pool.cached_block(h) is None
                continue
            want = sorted(cached)[n % len(cached)]
            block = pool.cached_block(want)
            assert block.block_id == cached[want]
            if block in owners[who]:
                continue  # a sequence never holds a block twice
            pool.touch([block])
            if ref[block.block_id] == 0:
                free.remove(block.block_id)
            ref[block.block_id] += 1
            owners[who].append(block)
        elif op == "cache":
            # The engine names a block once (when it is full), while a sequence holds it.
            unnamed = [b for b in owners[who] if hash_of[b.block_id] is None]
            if unnamed:
                block = unnamed[n % len(unnamed)]
                pool.cache(block, h)
                if h not in cached:
                    cached[h], hash_of[block.block_id] = block.block_id, h
        else:
            blocks = owners[who][n:]
            pool.uncache(blocks)
            for block in blocks:
                cached.pop(hash_of[block.block_id], None)
                hash_of[block.block_id] = None
        assert list(pool.free_blocks) == free and pool.num_free_blocks == len(free)
        assert [b.ref_count for b in pool.blocks] == ref
        assert [b.block_hash for b in pool.blocks] == hash_of
        assert {k: b.block_id for k, b in pool.cached_blocks.items()} == cached
        assert_map_consistent(pool)


# --- tokens: the cache changes no token ----------------------------------------------------

PREFIX = prompt_of(1, 24)  # six blocks of 4
TAIL = prompt_of(2, 16)
SHARED_PROMPTS = [
    PREFIX + TAIL[:5],  # 29 tokens: nothing cached yet
    PREFIX + [TAIL[7]],  # whole cached blocks + 1 token: hits all 24
    PREFIX,  # exactly 6 blocks: the hit stops one block short (20), one token computed
    PREFIX[:10] + TAIL[3:12],  # diverges inside block 2: hits 8
    prompt_of(3, 17),  # nothing in common
    PREFIX + TAIL[:5],  # the first prompt again: 7 of its 8 blocks (28)
    PREFIX + TAIL[:5] + TAIL[6:16],  # the first and more: block 7 differs from its reply
]
EXPECTED_CACHED = [0, 24, 20, 8, 0, 28, 28]
SHARED_MAX_TOKENS = [8, 5, 6, 7, 4, 8, 3]

CACHE_CONFIGS = {
    "one step": dict(),  # every prompt admitted in the first step
    "budget 5": dict(max_num_batched_tokens=5),
    "budget 16, chunks of 3": dict(max_num_batched_tokens=16, max_chunk_size=3),
    "budget 9, 2 at a time": dict(max_num_batched_tokens=9, max_batch_size=2),
    "no chunks": dict(enable_chunked_prefill=False),
    "no chunks, budget 30, 3 at a time": dict(enable_chunked_prefill=False,
                                              max_num_batched_tokens=30, max_batch_size=3),
}


def shared_params(stage: str) -> list:
    return [greedy(stage, n) for n in SHARED_MAX_TOKENS]


@pytest.fixture(scope="module")
def uncached_tokens():
    """Per stage: the tokens of SHARED_PROMPTS with the cache off, one batch; and M5's."""
    cache = {}

    def get(stage: str) -> dict[str, list[list[int]]]:
        if stage not in cache:
            refs = {}
            for name in [stage] + ([PREVIOUS] if HAS_PREVIOUS else []):
                outs = tiny(name, enable_prefix_caching=False).generate(
                    SHARED_PROMPTS, shared_params(name), use_tqdm=False)
                assert name == PREVIOUS or all(o.num_cached_tokens == 0 for o in outs)
                refs["cache off" if name == stage else name] = [o.token_ids for o in outs]
            cache[stage] = refs
        return cache[stage]

    return get


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("config", list(CACHE_CONFIGS))
def test_greedy_tokens_with_the_cache_equal_those_without(stage, config, uncached_tokens):
    refs = uncached_tokens(stage)
    # They vary (prompts 0 and 5 are the same).
    assert len({tuple(t) for t in refs["cache off"]}) == len(SHARED_PROMPTS) - 1
    llm = tiny(stage, **CACHE_CONFIGS[config])
    outputs = llm.generate(SHARED_PROMPTS, shared_params(stage), use_tqdm=False)
    for name, tokens in refs.items():
        for i, (out, ref) in enumerate(zip(outputs, tokens)):
            assert out.token_ids == ref, f"{stage} [{config}]: prompt {i} differs from {name}"
    cached = [o.num_cached_tokens for o in outputs]
    stats = llm.engine.kv_cache_stats()
    assert stats["prefix_cache_hits"] >= sum(cached) > 0
    assert all(c % BLOCK == 0 and c < len(p) for c, p in zip(cached, SHARED_PROMPTS))
    if config == "one step":  # each prompt finds what the ones before register in the step
        assert cached == EXPECTED_CACHED
        assert stats["prefix_cache_queries"] == sum(map(len, SHARED_PROMPTS))
        assert stats["prefix_cache_hits"] == sum(EXPECTED_CACHED)
    assert_kv_cache_empty(llm.engine)
    assert_map_consistent(pool_of(llm))


@pytest.mark.parametrize("stage", STAGES)
def test_prompts_one_after_another_hit_freed_blocks(stage, uncached_tokens):
    """Each request runs alone: every hit is on blocks that a finished request gave back
    (in the free queue, ref count 0, hash kept) and the request starts on exactly them."""
    llm = tiny(stage)
    pool = pool_of(llm)
    starts = spy_on_starts(llm.engine)
    tokens, cached = [], []
    for prompt, params in zip(SHARED_PROMPTS, shared_params(stage)):
        assert all(b.ref_count == 0 for b in pool.blocks)  # nothing held between requests
        hashes = chain(prompt)
        hits = [pool.cached_blocks[h] for h in hashes[:(len(prompt) - 1) // BLOCK]
                if h in pool.cached_blocks]
        assert all(b.block_id in pool.free_blocks for b in hits)
        del starts[:]
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        tokens.append(out.token_ids)
        cached.append(out.num_cached_tokens)
        name, computed, table = starts[0]
        assert name == out.request_id and computed == out.num_cached_tokens
        assert table[:computed // BLOCK] == [b.block_id for b in hits][:computed // BLOCK]
    assert cached == EXPECTED_CACHED
    assert tokens == uncached_tokens(stage)["cache off"]


@pytest.mark.parametrize("stage", STAGES)
def test_a_follow_up_turn_hits_the_blocks_of_the_reply(stage):
    """A prompt that repeats an earlier prompt and its reply hits the blocks the reply's
    decode steps filled, but not the one that only the reply's last token (sampled,
    never computed) would fill."""
    first = PREFIX + TAIL[:5]  # 29 tokens; + 7 generated = 36: token 35 is never computed
    llm, off = tiny(stage), tiny(stage, enable_prefix_caching=False)
    reply = llm.generate(first, greedy(stage, 7), use_tqdm=False)[0].token_ids
    assert reply == off.generate(first, greedy(stage, 7), use_tqdm=False)[0].token_ids
    follow_up = first + reply + [TAIL[9], TAIL[10]]  # 38 tokens: 9 full blocks to look up
    hashes = chain(follow_up)
    assert [h in pool_of(llm).cached_blocks for h in hashes] == [True] * 8 + [False] * 1
    out = llm.generate(follow_up, greedy(stage, 6), use_tqdm=False)[0]
    assert out.num_cached_tokens == 32
    assert out.token_ids == off.generate(follow_up, greedy(stage, 6),
                                         use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("stage", STAGES)
def test_requests_admitted_together_hit_the_blocks_computed_in_that_step(stage):
    """Blocks are registered when the step that fills them is scheduled: the second and
    third request (same prefix) start after it in the very step that computes it."""
    prompts = [PREFIX + TAIL[:5], PREFIX + TAIL[5:8], PREFIX + TAIL[8:9]]
    llm = tiny(stage)
    log = spy_on_chunks(llm.engine)
    outputs = llm.generate(prompts, greedy(stage, 6), use_tqdm=False)
    ids = [o.request_id for o in outputs]
    assert [(r, n, start) for r, n, start, _ in log[0]] == [
        (ids[0], 29, 0), (ids[1], 3, 24), (ids[2], 1, 24)]
    assert [o.num_cached_tokens for o in outputs] == [0, 24, 24]
    off = tiny(stage, enable_prefix_caching=False)
    want = off.generate(prompts, greedy(stage, 6), use_tqdm=False)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in want]


@pytest.mark.parametrize("stage", STAGES)
def test_eviction_takes_the_least_recently_used_blocks(stage, tiny_kv_bytes_per_token):
    """16 blocks. A and C (12 tokens, 3 full blocks each) run and free theirs; A runs
    again (hits 2 blocks, refreshing them); B then needs 13 blocks: it takes the 9 never
    used, then the least recently used cached ones: A's third and all of C's. The
    evicted hashes leave the map; A still hits 8, C is computed again in full."""
    llm = tiny(stage, max_model_len=64, kv_cache_memory=16 * BLOCK * tiny_kv_bytes_per_token)
    pool = pool_of(llm)
    assert pool.num_blocks == 16
    a, c, b = prompt_of(10, 12), prompt_of(11, 12), prompt_of(12, 50)
    one = greedy(stage, 1)
    first = {"a": llm.generate(a, one, use_tqdm=False)[0],
             "c": llm.generate(c, one, use_tqdm=False)[0]}
    ha, hc = chain(a), chain(c)
    assert set(ha + hc) <= set(pool.cached_blocks)
    again = llm.generate(a, one, use_tqdm=False)[0]
    assert again.num_cached_tokens == 8 and again.token_ids == first["a"].token_ids
    out_b = llm.generate(b, greedy(stage, 3), use_tqdm=False)[0]  # 52 tokens: 13 blocks
    assert out_b.num_cached_tokens == 0
    assert [h in pool.cached_blocks for h in ha] == [True, True, False]
    assert not set(hc) & set(pool.cached_blocks)
    assert set(chain(b + out_b.token_ids[:2])) <= set(pool.cached_blocks)
    assert_map_consistent(pool)
    out_a = llm.generate(a, one, use_tqdm=False)[0]  # (first: C would take A's blocks)
    out_c = llm.generate(c, one, use_tqdm=False)[0]
    assert (out_a.num_cached_tokens, out_c.num_cached_tokens) == (8, 0)
    assert out_c.token_ids == first["c"].token_ids and out_a.token_ids == first["a"].token_ids
    off = tiny(stage, enable_prefix_caching=False)
    assert out_b.token_ids == off.generate(b, greedy(stage, 3), use_tqdm=False)[0].token_ids


@pytest.mark.parametrize("stage", STAGES)
def test_a_tiny_pool_evicts_and_keeps_every_token(stage, tiny_kv_bytes_per_token,
                                                  uncached_tokens):
    """SHARED_PROMPTS through a pool of 12 blocks (48 tokens), 2 at a time: cached blocks
    are evicted over and over (and requests preempted); the tokens do not change."""
    llm = tiny(stage, max_model_len=48, max_batch_size=2, max_num_batched_tokens=12,
               kv_cache_memory=12 * BLOCK * tiny_kv_bytes_per_token)
    pool = pool_of(llm)
    evictions = []
    allocate = pool.allocate

    def counting_allocate(n):
        evictions.extend(b.block_id for b in list(pool.free_blocks.values())[:n]
                         if b.block_hash is not None)
        return allocate(n)

    pool.allocate = counting_allocate
    outputs = llm.generate(SHARED_PROMPTS, shared_params(stage), use_tqdm=False)
    assert [o.token_ids for o in outputs] == uncached_tokens(stage)["cache off"]
    assert evictions and sum(o.num_cached_tokens for o in outputs) > 0
    assert_kv_cache_empty(llm.engine)
    assert_map_consistent(pool)
    assert len(pool.cached_blocks) <= 12


@pytest.mark.parametrize("stage", STAGES)
def test_preempted_requests_hit_the_cache_when_recomputed(stage, tiny_kv_bytes_per_token):
    """Four requests on one 16-token prefix in 16 blocks: they outgrow the pool and are
    preempted; a preempted one finds its prefix (held by the others) when it restarts."""
    prompts = [PREFIX[:16] + TAIL[4 * i:4 * i + 4] for i in range(4)]
    params = greedy(stage, 24)
    llm = tiny(stage, max_model_len=64, max_num_batched_tokens=32,
               kv_cache_memory=16 * BLOCK * tiny_kv_bytes_per_token)
    lookups = spy_on_lookups(llm.engine)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert llm.engine.kv_cache_stats()["num_preemptions"] > 0
    restarts = [(name, n, hit) for name, n, hit in lookups if n > 20]  # prompt + output
    assert restarts and any(hit >= 16 for _, _, hit in restarts), lookups
    off = tiny(stage, enable_prefix_caching=False)
    assert [o.token_ids for o in outputs] == [
        off.generate(p, params, use_tqdm=False)[0].token_ids for p in prompts]
    assert_kv_cache_empty(llm.engine)
    assert_map_consistent(pool_of(llm))


@pytest.mark.parametrize("stage", STAGES)
def test_with_the_cache_off_nothing_is_hashed_and_the_steps_are_m5s(stage, monkeypatch):
    kv_module = load_stage(f"{stage}.core.kv_cache_manager")

    def no_hash(*args, **kwargs):
        raise AssertionError("a block was hashed with the prefix cache off")

    monkeypatch.setattr(kv_module, "hash_block", no_hash)
    llm = tiny(stage, enable_prefix_caching=False, max_num_batched_tokens=7)
    log = spy_on_chunks(llm.engine)
    outputs = llm.generate(SHARED_PROMPTS, shared_params(stage), use_tqdm=False)
    assert all(o.num_cached_tokens == 0 for o in outputs)
    stats = llm.engine.kv_cache_stats()
    assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"],
            stats["prefix_cache_hit_rate"]) == (0, 0, None)
    assert pool_of(llm).cached_blocks == {}
    if HAS_PREVIOUS:
        m5 = tiny(PREVIOUS, max_num_batched_tokens=7)
        m5_log = spy_on_chunks(m5.engine)
        want = m5.generate(SHARED_PROMPTS, shared_params(PREVIOUS), use_tqdm=False)
        assert log == m5_log
        assert [o.token_ids for o in outputs] == [o.token_ids for o in want]


# --- tokens: transformers, with a warm cache ---------------------------------------------

HF_BASE = [(i * 37 + 11) % 512 for i in range(40)]
HF_SHARED_PROMPTS = [HF_BASE[:13] + [5, 77, 300], HF_BASE[:24] + [9], HF_BASE[:32], HF_BASE,
                     HF_BASE[:20] + [1, 42, 17, 250, 9, 411, 123]]
HF_EXPECTED_CACHED = [12, 24, 28, 36, 20]
HF_NUM_TOKENS = 16


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def tiny_hf_model(request, tmp_path_factory):
    """(name, folder, transformers' greedy tokens for HF_SHARED_PROMPTS)."""
    model_type, overrides = TINY_CONFIGS[request.param]
    hf_model = make_tiny_hf_model(model_type, seed=777, **overrides)
    folder = tmp_path_factory.mktemp(f"prefix-{request.param}")
    hf_model.save_pretrained(folder)
    expected = [hf_greedy(hf_model, ids, HF_NUM_TOKENS) for ids in HF_SHARED_PROMPTS]
    return request.param, folder, expected


@pytest.mark.parametrize("stage", STAGES)
def test_tiny_hf_models_match_transformers_with_a_warm_cache(stage, tiny_hf_model):
    name, folder, expected = tiny_hf_model
    with pytest.warns(UserWarning, match="no tokenizer files"):
        llm = load_stage(stage).LLM(model=str(folder), device="cpu", dtype="float32",
                                    block_size=BLOCK, max_num_batched_tokens=7,
                                    kv_cache_memory=KV_MEMORY)
    params = load_stage(stage).SamplingParams(temperature=0, max_tokens=HF_NUM_TOKENS,
                                              min_tokens=HF_NUM_TOKENS)
    warm = llm.generate(HF_BASE, params, use_tqdm=False)[0]  # the whole base, cached
    assert warm.token_ids == hf_greedy_of(expected, HF_BASE)
    outputs = llm.generate(HF_SHARED_PROMPTS, params, use_tqdm=False)
    assert [o.num_cached_tokens for o in outputs] == HF_EXPECTED_CACHED
    for ids, out, ref in zip(HF_SHARED_PROMPTS, outputs, expected):
        assert out.token_ids == ref, f"{stage}/{name}: diverges on a {len(ids)}-token prompt"


def hf_greedy_of(expected: list, prompt: list[int]) -> list[int]:
    return expected[HF_SHARED_PROMPTS.index(prompt)]


# --- the scheduler over random workloads (fake forward pass) ------------------------------

MODEL_MAX_LEN = 64
BASES = [prompt_of(100 + i, 30) for i in range(3)]
TAILS = [prompt_of(200 + i, 10) for i in range(3)]


class StepFailed(Exception):
    """Raised by the fake forward pass to fail a step before it writes anything."""


class CacheChecker:
    """A fake forward pass that keeps the KV cache as the worker would, with, per slot,
    the tokens its K/V stand for (a sequence's tokens up to that position): the tokens
    each sequence computes are written where its block table (kept as the worker keeps
    it) says, copies are made first, and every step checks what attention would read.
    Spies on the lookup and the fork check that requests start where they should."""

    def __init__(self, engine, fail_calls=()):
        stage = type(engine).__module__.split(".")[0]
        self.engine, self.scheduler = engine, engine.scheduler
        self.kv = engine.scheduler.kv_cache_manager
        self.pool, self.bs = self.kv.block_pool, self.kv.block_size
        self.Output = load_stage(f"{stage}.worker.model_runner").ModelRunnerOutput
        self.running_status = load_stage(f"{stage}.request").SequenceStatus.RUNNING
        self.slots: dict[tuple[int, int], tuple] = {}  # (block, offset) -> tokens
        self.known: dict[bytes, tuple] = {}  # hash -> the tokens it stands for
        self.tables: dict[str, list[int]] = {}  # the worker's block tables
        self.origin: dict[str, tuple] = {}  # name -> ("lookup", hits) or ("fork", blocks)
        self.before: dict[int, bytes] = {}  # block -> hash, as the step was scheduled
        self.allocated: set[int] = set()  # blocks taken from the free queue in this step
        self.calls, self.fail_calls = 0, set(fail_calls)
        self.kept: set[int] = set()  # sequences of a failed step (they keep its blocks)
        self._install()

    def _install(self) -> None:
        kv, pool, scheduler = self.kv, self.pool, self.scheduler
        lookup, fork, schedule, allocate = (kv.cached_prefix, scheduler._fork,
                                            scheduler.schedule, pool.allocate)

        def cached_prefix(seq):
            hits = lookup(seq)
            # The longest run of cached full blocks, one token at least left to compute.
            want = []
            if kv.enable_prefix_caching and seq.reads_prefix_cache:
                for h in chain(seq.token_ids[:(len(seq.token_ids) - 1) // self.bs * self.bs],
                               self.bs):
                    if h not in pool.cached_blocks:
                        break
                    want.append(pool.cached_blocks[h])
            assert [b.block_id for b in hits] == [b.block_id for b in want], seq.name
            self.origin[seq.name] = ("lookup", list(hits))
            if hits:
                event("prefix hit")
                if any(b.ref_count == 0 for b in hits):
                    event("hit on a freed block")
            return hits

        def checked_fork(parent, children):
            shared = parent.kv_blocks[:cdiv(parent.num_prompt_tokens - 1, self.bs)]
            fork(parent, children)
            event("fork")
            for child in children:
                if child.status == self.running_status:
                    assert child.kv_blocks == shared
                    assert all(a is b for a, b in zip(child.kv_blocks, shared))
                    assert child.num_computed_tokens == parent.num_prompt_tokens - 1
                    self.origin[child.name] = ("fork", list(shared))
                else:
                    assert child in self.scheduler.waiting and child.kv_blocks == []
                    event("a sample waits for room")

        def recording_schedule():
            self.before = {b.block_id: h for h, b in pool.cached_blocks.items()}
            self.allocated = set()
            return schedule()

        def recording_allocate(n):
            blocks = allocate(n)
            self.allocated |= {b.block_id for b in blocks}
            if any(b.block_id in self.before for b in blocks):
                event("eviction")
            return blocks

        kv.cached_prefix = cached_prefix
        scheduler._fork = checked_fork
        scheduler.schedule = recording_schedule
        pool.allocate = recording_allocate
        replace_forward(self.engine, self.execute_model)

    def content(self, seq, position: int) -> tuple:
        return tuple(seq.token_ids[:position + 1])

    def execute_model(self, out):
        self.calls += 1
        bs, pool = self.bs, self.pool
        assert len(out.scheduled) == len(out.seqs)
        assert out.num_batched_tokens == sum(len(s.new_token_ids) for s in out.scheduled)
        for name in out.finished_seq_names + out.preempted_seq_names:
            self.tables.pop(name, None)
        num_new, spans = {}, []
        for seq, s in zip(out.seqs, out.scheduled):
            start = s.num_computed_tokens  # the scheduler counts the step as computed already
            end = start + len(s.new_token_ids)
            assert s.seq_name == seq.name and seq.num_computed_tokens == end
            assert s.new_token_ids and s.new_token_ids == seq.token_ids[start:end]
            assert s.next_token_id == (seq.token_ids[end] if end < len(seq.token_ids)
                                       else None)
            assert s.is_new == (start == seq.num_cached_tokens)
            # The worker's table: all of it for a sequence that starts, else the blocks
            # after those that hold its computed tokens (a retried step sends the same).
            if s.is_new:
                table = list(s.new_block_ids)
            else:
                assert s.seq_name in self.tables, f"{s.seq_name}: no table kept"
                table = self.tables[s.seq_name][:cdiv(start, bs)] + list(s.new_block_ids)
            assert table == [b.block_id for b in seq.kv_blocks]
            self.tables[s.seq_name] = table
            num_new[seq.seq_id] = end - start
            spans.append((seq, start, end, table))
            if s.is_new:
                self.check_start(seq, start, out.blocks_to_copy)
        self.check_blocks(num_new)
        if self.calls in self.fail_calls:
            event("failed step")
            self.kept |= set(num_new)
            raise StepFailed(f"step {self.calls} fails before writing")
        for src, dst in out.blocks_to_copy:
            assert dst in self.allocated and pool.blocks[dst].ref_count == 1
            assert src != dst
        copied = {(dst, i): self.slots.get((src, i))
                  for src, dst in out.blocks_to_copy for i in range(bs)}
        for key, value in copied.items():
            if value is None:
                self.slots.pop(key, None)
            else:
                self.slots[key] = value
        if out.blocks_to_copy:
            event("copy-on-write")
        for seq, start, end, table in spans:
            for p in range(start, end):
                block = table[p // bs]
                # A block cached before this step (and not taken afresh in it) is full:
                # no token is ever written into it again.
                assert block not in self.before or block in self.allocated, (
                    f"{seq.name} writes position {p} into cached block {block}")
                self.slots[(block, p % bs)] = self.content(seq, p)
        self.check_reads(num_new)
        self.check_cache()
        tokens = [fake_token(seq.name, len(seq.token_ids)) if end == len(seq.token_ids)
                  else None for seq, _, end, _ in spans]
        none = [None] * len(spans)
        return self.Output(tokens, none, none)

    def check_start(self, seq, start: int, copies) -> None:
        """A sequence that starts: on the blocks its lookup found, or (a sample forked
        from the first) on the first one's, the partly filled last one copied if shared."""
        how, blocks = self.origin.get(seq.name, ("lookup", []))
        if start == 0:  # nothing cached (or a fork of a one-token prompt)
            assert blocks == []
            return
        if how == "fork":
            assert start == seq.num_prompt_tokens - 1
            k = len(blocks)
            assert len(seq.kv_blocks) >= k
            assert all(a is b for a, b in zip(seq.kv_blocks[:k - 1], blocks[:k - 1]))
            if seq.kv_blocks[k - 1] is not blocks[-1]:
                assert start % self.bs != 0
                assert (blocks[-1].block_id, seq.kv_blocks[k - 1].block_id) in copies
            return
        assert start == len(blocks) * self.bs
        assert all(a is b for a, b in zip(seq.kv_blocks, blocks))
        if any(b.block_id not in self.before for b in blocks):
            event("hit in the step that computes it")

    def check_blocks(self, num_new: dict) -> None:
        """As tests/test_paged.py's check_blocks (each running sequence holds the blocks
        its tokens need, ref count = holders, held + free = all), except that a sequence
        of a failed step may still hold the blocks it got for it, until it runs again."""
        holders = collections.Counter()
        for seq in self.scheduler.running:
            need = cdiv(computed_before_step(seq, num_new) + num_new.get(seq.seq_id, 0),
                        self.bs)
            if seq.seq_id in num_new:
                self.kept.discard(seq.seq_id)
            assert len(seq.kv_blocks) == need or (
                seq.seq_id in self.kept and len(seq.kv_blocks) > need), seq.name
            assert len(set(map(id, seq.kv_blocks))) == len(seq.kv_blocks)
            holders.update(b.block_id for b in seq.kv_blocks)
        assert all(seq.kv_blocks == [] for seq in self.scheduler.waiting)
        for block in self.pool.blocks:
            assert block.ref_count == holders[block.block_id], block.block_id
        assert set(self.pool.free_blocks) == {b.block_id for b in self.pool.blocks
                                              if b.ref_count == 0}

    def check_reads(self, num_new: dict) -> None:
        """Every running sequence finds its own tokens' K/V at every position it has
        computed (or computes in this step): what attention reads is right."""
        for seq in self.scheduler.running:
            computed = computed_before_step(seq, num_new) + num_new.get(seq.seq_id, 0)
            for p in range(computed):
                block = seq.kv_blocks[p // self.bs].block_id
                assert self.slots.get((block, p % self.bs)) == self.content(seq, p), (
                    f"{seq.name} reads wrong K/V at position {p} (block {block})")

    def check_cache(self) -> None:
        """The hash map, the blocks and the free queue agree; each hash chains its
        sequence's blocks; each cached block is full and holds what its hash says."""
        bs, pool = self.bs, self.pool
        for seq in self.engine.sequences.values():
            parent = ROOT_HASH
            for i, h in enumerate(seq.block_hashes):
                tokens = tuple(seq.token_ids[:(i + 1) * bs])
                assert len(tokens) == (i + 1) * bs  # only full blocks are hashed
                parent = next_hash(parent, tokens[i * bs:])
                assert h == parent
                assert self.known.setdefault(h, tokens) == tokens
        assert_map_consistent(pool)
        for h, block in pool.cached_blocks.items():
            tokens = self.known[h]
            first = len(tokens) - bs
            for i in range(bs):
                assert self.slots.get((block.block_id, i)) == tokens[:first + i + 1], (
                    f"cached block {block.block_id} does not hold its tokens")
        if not self.kv.enable_prefix_caching:
            assert pool.cached_blocks == {}

    def after_failure(self) -> None:
        """The failed step wrote nothing: the blocks it registered left the map."""
        self.check_cache()
        self.check_blocks({})


@st.composite
def shared_prefix_workloads(draw):
    requests = draw(st.lists(
        st.tuples(st.integers(0, len(BASES) - 1),  # which shared prefix
                  st.sampled_from([0, 1, 4, 5, 12, 16, 17, 24, 30, 30]),  # how much of it
                  st.integers(0, len(TAILS) - 1),  # which tail
                  st.sampled_from([0, 0, 1, 2, 5, 10]),  # how much of the tail
                  st.integers(1, 16),  # max_tokens
                  st.sampled_from([0, 0, 0, 1, 2, 3, 5, 8]),  # the step it arrives at
                  st.one_of(st.none(), st.none(), st.none(), st.integers(0, 20)),  # abort
                  st.sampled_from([1, 1, 2, 3])),  # n
        min_size=2, max_size=8))
    chunked = draw(st.sampled_from([True, True, False]))
    return dict(requests=requests,
                block_size=draw(st.sampled_from([1, 2, 4, 4, 8])),
                max_batch_size=draw(st.integers(1, 6)),
                max_num_batched_tokens=draw(st.sampled_from([1, 2, 3, 5, 8, 12, 16, 32, 80])),
                max_chunk_size=draw(st.sampled_from([None, None, 1, 3, 8, 16])) if chunked
                else None,
                enable_chunked_prefill=chunked,
                enable_prefix_caching=draw(st.sampled_from([True, True, True, False])),
                # little more than one longest sequence, often: preemption and eviction
                kv_tokens=draw(st.sampled_from([64, 64, 72, 80, 96, 128, 192])),
                fail_calls=draw(st.sets(st.integers(1, 30), max_size=2)))


def drive_shared_workload(stage: str, workload: dict, bytes_per_token: int):
    mod = load_stage(stage)
    engine = mod.LLM("dummy:tiny-llama", max_model_len=MODEL_MAX_LEN, device="cpu",
                     dtype="float32", kv_cache_memory=workload["kv_tokens"] * bytes_per_token,
                     **{k: workload[k] for k in (
                         "block_size", "max_batch_size", "max_num_batched_tokens",
                         "max_chunk_size", "enable_chunked_prefill",
                         "enable_prefix_caching")}).engine
    checker = CacheChecker(engine, workload["fail_calls"])
    requests = []
    for i, (base, plen, tail, tlen, max_tokens, arrival, abort_at, n) in enumerate(
            workload["requests"]):
        prompt = BASES[base][:plen] + TAILS[tail][:tlen] or [BASES[base][0]]
        n = min(n, workload["max_batch_size"])
        params = (mod.SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
                  if n == 1 else mod.SamplingParams(temperature=1.0, n=n, ignore_eos=True,
                                                    max_tokens=max_tokens))
        requests.append((f"q{i}", prompt, params, arrival, abort_at))
    outputs, finished, aborted_at = {}, {}, {}
    failures, last_arrival = 0, max(arrival for *_, arrival, _ in requests)
    for step in range(3000):
        for rid, prompt, params, arrival, abort_at in requests:
            if step == arrival:
                engine.add_request(rid, prompt, params)
            if abort_at is not None and step == max(arrival, abort_at) and rid not in finished:
                engine.abort_request(rid)
                aborted_at[rid] = len(outputs.get(rid, []))
        if step >= last_arrival and not engine.has_unfinished_requests():
            break
        try:
            step_outputs = engine.step()
        except StepFailed:
            failures += 1
            checker.after_failure()
            continue
        record_step(step_outputs, outputs, finished)
    assert not engine.has_unfinished_requests()
    for rid, prompt, params, _, _ in requests:
        if rid in aborted_at:  # nothing after the abort, never finished
            assert len(outputs.get(rid, [])) == aborted_at[rid] and rid not in finished
            continue
        out = finished[rid]
        assert [c.index for c in out.outputs] == list(range(params.n))
        for c in out.outputs:
            name = rid if c.index == 0 else f"{rid}/{c.index}"
            assert c.token_ids == [fake_token(name, len(prompt) + j)
                                   for j in range(params.max_tokens)], name
            assert c.finish_reason == "length"
        assert out.num_cached_tokens % workload["block_size"] == 0
        assert out.num_cached_tokens < len(prompt) or engine.kv_cache_stats()["num_preemptions"]
    assert_kv_cache_empty(engine)
    checker.check_cache()
    assert not engine.requests and not engine.sequences
    stats = engine.kv_cache_stats()
    if workload["enable_prefix_caching"]:
        assert stats["prefix_cache_hits"] <= stats["prefix_cache_queries"]
    else:
        assert (stats["prefix_cache_queries"], stats["prefix_cache_hits"]) == (0, 0)
    event("preempted" if stats["num_preemptions"] else "no preemption")
    return engine, failures


@pytest.mark.parametrize("stage", STAGES)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(workload=shared_prefix_workloads())
def test_random_shared_prefix_workloads(stage, workload, tiny_kv_bytes_per_token):
    drive_shared_workload(stage, workload, tiny_kv_bytes_per_token)


@pytest.mark.parametrize("stage", STAGES)
def test_the_checker_catches_an_eviction_that_keeps_its_hash(stage, tiny_kv_bytes_per_token,
                                                             monkeypatch):
    """The fake forward pass's bookkeeping is an oracle that can fail: q1 (60 tokens in a
    pool of 16 blocks) evicts q0's cached blocks; if the pool forgot to drop their hashes,
    q2 (q0's prompt again) would hit blocks that hold q1's tokens, and that is caught."""
    workload = dict(requests=[(0, 16, 0, 0, 3, 0, None, 1), (1, 30, 1, 10, 20, 4, None, 1),
                              (0, 16, 0, 0, 3, 12, None, 1)],
                    block_size=4, max_batch_size=4, max_num_batched_tokens=64,
                    max_chunk_size=None, enable_chunked_prefill=True,
                    enable_prefix_caching=True, kv_tokens=64, fail_calls=set())
    drive_shared_workload(stage, workload, tiny_kv_bytes_per_token)  # passes as it is
    bp = load_stage(f"{stage}.core.block_pool")

    def allocate_keeping_hashes(self, n):
        blocks = [self.free_blocks.popitem(last=False)[1] for _ in range(n)]
        for block in blocks:
            block.ref_count = 1
        return blocks

    monkeypatch.setattr(bp.BlockPool, "allocate", allocate_keeping_hashes)
    with pytest.raises(AssertionError):
        drive_shared_workload(stage, workload, tiny_kv_bytes_per_token)


# --- n samples -------------------------------------------------------------------------

N_PROMPTS = {9: prompt_of(30, 9), 11: prompt_of(31, 11)}  # (len - 1) % 4: 0 and 2


@pytest.fixture(scope="module")
def solo_samples():
    """(stage, prompt_len, max_tokens, seed, extra) -> the tokens (and output) of the
    prompt run alone with n=1 and that seed, the cache off."""
    cache, llms = {}, {}

    def get(stage: str, prompt: list[int], max_tokens: int, seed: int, **extra):
        key = (stage, tuple(prompt), max_tokens, seed, tuple(sorted(extra.items())))
        if key not in cache:
            if stage not in llms:
                llms[stage] = tiny(stage, enable_prefix_caching=False)
            cache[key] = llms[stage].generate(prompt, sampled(stage, max_tokens, seed, **extra),
                                              use_tqdm=False)[0]
        return cache[key]

    return get


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("prompt_len", list(N_PROMPTS))
@pytest.mark.parametrize("max_tokens", [1, 6])
def test_n_samples_equal_their_solo_runs(stage, prompt_len, max_tokens, solo_samples):
    """Sample i of a request with seed s is the request run alone with seed s + i. With
    prompt_len - 1 not a multiple of the block size the samples share a partly filled
    block, and copy it before writing (one copy per sample that shares it with another
    holder: with max_tokens=1 the first sample has finished and freed it, so the last
    sample writes into it alone)."""
    prompt, n, seed = N_PROMPTS[prompt_len], 3, 11
    llm = tiny(stage)
    copies = spy_on_copies(llm)
    starts = spy_on_starts(llm.engine)
    out = llm.generate(prompt, sampled(stage, max_tokens, seed, n=n), use_tqdm=False)[0]
    assert out.finished and [c.index for c in out.outputs] == list(range(n))
    for c in out.outputs:
        solo = solo_samples(stage, prompt, max_tokens, seed + c.index)
        assert c.token_ids == solo.token_ids, f"sample {c.index} != its solo run"
        assert c.finish_reason == "length" and c.text == solo.text
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1  # the seeds differ
    names = [name for name, _, _ in starts]
    assert names[0] == out.request_id and sorted(names[1:]) == [
        f"{out.request_id}/{i}" for i in range(1, n)]
    # The samples start from the first one's prompt, all but its last token.
    assert all(computed == prompt_len - 1 for _, computed, _ in starts[1:])
    shares_partial_block = (prompt_len - 1) % BLOCK != 0
    assert len(copies) == ((n - 1 if max_tokens > 1 else n - 2) if shares_partial_block
                           else 0)
    assert out.metrics.num_output_tokens == n * max_tokens
    assert_kv_cache_empty(llm.engine)


@pytest.mark.parametrize("stage", STAGES)
def test_a_sample_copies_a_cached_block_even_when_it_holds_it_alone(stage):
    """A budget of 1 token: the first sample's decodes take every step, so the others
    wait (running) until it has finished; by then the block they share, partly filled at
    the fork, is full and cached. The last sample to start holds it alone, and must still
    copy it before writing: a follow-up prompt (the prompt and the first sample's reply)
    hits it and gets the tokens it gets with the cache off."""
    prompt = N_PROMPTS[11]  # positions 8..10 in the shared block at the fork
    llm = tiny(stage, max_num_batched_tokens=1)
    copies = spy_on_copies(llm)
    out = llm.generate(prompt, sampled(stage, 6, 3, n=3), use_tqdm=False)[0]
    assert len(copies) == 2  # both later samples: the block was shared, then cached
    reply = out.outputs[0].token_ids
    # The cached block of positions 8..11 holds the K/V of the prompt and the first
    # sample's first token, as computed with the cache off.
    block = pool_of(llm).cached_blocks[chain(prompt + reply[:1])[2]]
    off = tiny(stage, enable_prefix_caching=False)
    starts = spy_on_starts(off.engine)
    off.generate(prompt + reply[:1], greedy(stage, 1), use_tqdm=False)
    ref_block = starts[0][2][2]
    for ours, ref in zip(llm.engine.model_runner.kv_caches, off.engine.model_runner.kv_caches):
        for mine, theirs in zip(ours, ref):  # keys, values
            torch.testing.assert_close(mine[block.block_id], theirs[ref_block],
                                       atol=1e-5, rtol=1e-5)
    follow_up = prompt + reply + [7]
    got = llm.generate(follow_up, greedy(stage, 6), use_tqdm=False)[0]
    want = off.generate(follow_up, greedy(stage, 6), use_tqdm=False)[0]
    assert got.num_cached_tokens == 16 and got.token_ids == want.token_ids


@pytest.mark.parametrize("stage", STAGES)
def test_n_samples_without_room_in_the_batch_wait_and_hit_the_cache(stage, solo_samples):
    """max_batch_size 2 with another request running: at the fork the second sample has
    no room; it waits, then starts from the prefix cache."""
    prompt, seed = N_PROMPTS[11], 5
    llm = tiny(stage, max_batch_size=2)
    engine = llm.engine
    lookups = spy_on_lookups(engine)
    other = prompt_of(40, 6)
    engine.add_request("other", other, greedy(stage, 8))
    engine.add_request("x", prompt, sampled(stage, 4, seed, n=2))
    outputs, finished = {}, {}
    waited = False
    for _ in range(200):
        if not engine.has_unfinished_requests():
            break
        record_step(engine.step(), outputs, finished)
        waited |= any(seq.name == "x/1" for seq in engine.scheduler.waiting)
    assert waited
    assert [(n, hit) for name, n, hit in lookups if name == "x/1"] == [(11, 8)]
    out = finished["x"]
    for c in out.outputs:
        assert c.token_ids == solo_samples(stage, prompt, 4, seed + c.index).token_ids
    assert finished["other"].token_ids == tiny(stage).generate(
        other, greedy(stage, 8), use_tqdm=False)[0].token_ids
    assert_kv_cache_empty(engine)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("when", ["before the fork", "after the fork"])
def test_aborting_n_samples_frees_everything(stage, when):
    llm = tiny(stage, max_num_batched_tokens=8)
    engine = llm.engine
    prompt = prompt_of(50, 21)  # three chunks of 8
    engine.add_request("x", prompt, sampled(stage, 10, 3, n=3))
    outputs, finished = {}, {}
    record_step(engine.step(), outputs, finished)
    if when == "after the fork":
        for _ in range(5):
            record_step(engine.step(), outputs, finished)
        assert {"x/1", "x/2"} <= {seq.name for seq in engine.scheduler.running}
        assert len(outputs["x"][-1].outputs[1].token_ids) >= 1
    else:
        assert "x" not in outputs and engine.scheduler.running  # part way through its prompt
    assert engine.kv_cache_stats()["reserved_token_slots"] > 0
    engine.abort_request("x")
    assert not engine.requests and not engine.sequences
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert_kv_cache_empty(engine)
    assert_map_consistent(pool_of(llm))
    engine.add_request("y", prompt_of(51, 5), greedy(stage, 3))
    run_to_end(engine, outputs, finished)
    assert sorted(finished) == ["y"]
    rows = engine.model_runner.input_batch.rows
    assert not {"x", "x/1", "x/2"} & set(rows)  # the worker forgot every sample


@pytest.mark.parametrize("stage", STAGES)
def test_n_samples_with_logprobs(stage, solo_samples):
    prompt, seed = N_PROMPTS[11], 21
    llm = tiny(stage)
    out = llm.generate(prompt, sampled(stage, 5, seed, n=3, logprobs=2), use_tqdm=False)[0]
    for c in out.outputs:
        solo = solo_samples(stage, prompt, 5, seed + c.index, logprobs=2)
        assert c.token_ids == solo.token_ids
        assert len(c.logprobs) == len(c.token_ids) == 5
        for token, got, want in zip(c.token_ids, c.logprobs, solo.outputs[0].logprobs):
            assert token in got and len(got) >= 2
            assert got.keys() == want.keys()
            for t, lp in want.items():
                assert got[t].logprob == pytest.approx(lp.logprob, abs=1e-5)
                assert got[t].rank == lp.rank


@pytest.mark.parametrize("stage", STAGES)
def test_prompt_logprobs_skip_the_cache(stage):
    """prompt_logprobs need every prompt token computed: such a request is not looked up
    (no hit, no query counted), with n samples too, and its log-probabilities are those
    of a run with the cache off."""
    prompt = PREFIX + TAIL[:9]  # 33 tokens
    llm, off = tiny(stage), tiny(stage, enable_prefix_caching=False)
    warm = llm.generate(prompt, greedy(stage, 2), use_tqdm=False)[0]
    queries = llm.engine.kv_cache_stats()["prefix_cache_queries"]
    assert queries == 33 and warm.num_cached_tokens == 0
    want = off.generate(prompt, greedy(stage, 2, prompt_logprobs=3), use_tqdm=False)[0]
    for params in (greedy(stage, 2, prompt_logprobs=3),
                   sampled(stage, 2, 9, n=2, prompt_logprobs=3)):
        out = llm.generate(prompt, params, use_tqdm=False)[0]
        assert out.num_cached_tokens == 0
        assert llm.engine.kv_cache_stats()["prefix_cache_queries"] == queries
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for j in range(1, len(prompt)):
            got, ref = out.prompt_logprobs[j], want.prompt_logprobs[j]
            assert prompt[j] in got and got.keys() == ref.keys()
            for t, lp in ref.items():
                assert got[t].logprob == pytest.approx(lp.logprob, abs=1e-5)
    again = llm.generate(prompt, greedy(stage, 2), use_tqdm=False)[0]
    assert again.num_cached_tokens == 32 and again.token_ids == warm.token_ids


# --- a failed step -------------------------------------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_step_leaves_no_hash_on_unwritten_blocks(stage):
    """A computes 12 of its 20 prompt tokens; then a step is to finish A's prompt and
    admit B and C, which hit A's blocks registered in that step; it fails. The blocks it
    registered leave the map (A's first three stay), B and C wait again, and the retry
    gives the clean run's tokens."""
    a = PREFIX[:20]
    b, c = PREFIX[:20] + TAIL[:3], PREFIX[:20] + TAIL[3:4]
    params = greedy(stage, 5)
    clean = tiny(stage, max_num_batched_tokens=12, enable_prefix_caching=False)
    want = [o.token_ids for o in clean.generate([a, b, c], params, use_tqdm=False)]
    llm = tiny(stage, max_num_batched_tokens=12)
    engine, pool = llm.engine, pool_of(llm)
    engine.add_request("a", a, params)
    engine.step()
    hashes = chain(a)
    assert {h: blk.block_id for h, blk in pool.cached_blocks.items()} == {
        h: blk.block_id for h, blk in zip(hashes[:3], engine.sequences["a"].kv_blocks)}
    cached_before = dict(pool.cached_blocks)
    engine.add_request("b", b, params)
    engine.add_request("c", c, params)
    log = spy_on_chunks(engine)
    restore = fail_on_call(1, RuntimeError("boom"))(engine.model_runner, forward_entry(engine))
    with pytest.raises(RuntimeError, match="boom"):
        engine.step()
    restore()
    # The failed step: A's last 8 tokens (blocks 3, 4 registered), B and C hitting them.
    assert [(r, n, start) for r, n, start, _ in log[0]] == [("a", 8, 12), ("b", 3, 20),
                                                           ("c", 1, 20)]
    assert pool.cached_blocks == cached_before
    assert_map_consistent(pool)
    assert [seq.name for seq in engine.scheduler.waiting] == ["b", "c"]
    assert all(seq.kv_blocks == [] for seq in engine.scheduler.waiting)
    held = collections.Counter(blk.block_id for seq in engine.scheduler.running
                               for blk in seq.kv_blocks)
    assert all(blk.ref_count == held[blk.block_id] for blk in pool.blocks)
    outputs, finished = {}, {}
    run_to_end(engine, outputs, finished)
    assert [finished[r].token_ids for r in "abc"] == want
    assert [finished[r].num_cached_tokens for r in "bc"] == [20, 20]
    assert_kv_cache_empty(engine)


@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_step_in_generate_then_a_retry(stage):
    """The same through `LLM.generate`: an error in the first step (three prompts on one
    prefix, hitting in that step) leaves no request, nothing cached; a retry is clean."""
    prompts = [PREFIX + TAIL[:5], PREFIX + TAIL[5:8], PREFIX + [TAIL[9]]]
    llm = tiny(stage)
    restore = fail_on_call(1, RuntimeError("boom"))(llm.engine.model_runner,
                                                   forward_entry(llm.engine))
    with pytest.raises(RuntimeError, match="boom"):
        llm.generate(prompts, greedy(stage, 6), use_tqdm=False)
    restore()
    assert pool_of(llm).cached_blocks == {}
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    assert_kv_cache_empty(llm.engine)
    again = llm.generate(prompts, greedy(stage, 6), use_tqdm=False)
    off = tiny(stage, enable_prefix_caching=False)
    want = off.generate(prompts, greedy(stage, 6), use_tqdm=False)
    assert [o.token_ids for o in again] == [o.token_ids for o in want]
    assert [o.num_cached_tokens for o in again] == [0, 24, 24]


# --- reset_prefix_cache and the statistics ---------------------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_reset_prefix_cache_and_exact_statistics(stage):
    """Block size 16: a 33-token prompt twice (the second hits 32 of 33), its first 32
    tokens (hits 16: one token must be computed), then the cache is reset (hits 0)."""
    llm = tiny(stage, block_size=16)
    p33 = prompt_of(60, 33)
    stats = llm.engine.kv_cache_stats
    assert (stats()["prefix_cache_queries"], stats()["prefix_cache_hit_rate"]) == (0, None)
    runs = []
    for prompt in (p33, p33, p33[:32]):
        runs.append(llm.generate(prompt, greedy(stage, 3), use_tqdm=False)[0])
    assert [o.num_cached_tokens for o in runs] == [0, 32, 16]
    assert runs[1].token_ids == runs[0].token_ids
    s = stats()
    assert (s["prefix_cache_queries"], s["prefix_cache_hits"]) == (98, 48)
    assert s["prefix_cache_hit_rate"] == pytest.approx(48 / 98)
    # Refused while a request waits, and while it runs.
    engine = llm.engine
    engine.add_request("w", p33, greedy(stage, 3))
    with pytest.raises(RuntimeError, match="reset_prefix_cache"):
        llm.reset_prefix_cache()
    engine.step()
    assert engine.scheduler.running
    with pytest.raises(RuntimeError, match="reset_prefix_cache"):
        llm.reset_prefix_cache()
    assert pool_of(llm).cached_blocks  # nothing was forgotten
    run_to_end(engine, {}, {})
    llm.reset_prefix_cache()
    pool = pool_of(llm)
    assert pool.cached_blocks == {} and all(b.block_hash is None for b in pool.blocks)
    assert pool.num_free_blocks == pool.num_blocks
    after = llm.generate(p33, greedy(stage, 3), use_tqdm=False)[0]
    assert after.num_cached_tokens == 0 and after.token_ids == runs[0].token_ids
    s = stats()
    assert (s["prefix_cache_queries"], s["prefix_cache_hits"]) == (98 + 33 + 33, 48 + 32)
    assert s["prefix_cache_hit_rate"] == pytest.approx(80 / 164)


# --- the flash backend (Triton's interpreter on the CPU) ---------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_flash_backend_with_hits_and_samples_gives_the_torch_backend_tokens(stage):
    warm = PREFIX + TAIL[:5]
    prompts = [PREFIX + [TAIL[7]], PREFIX[:10] + TAIL[3:12]]  # hits 24; hits 8, 19 tokens
    params = [greedy(stage, 4), sampled(stage, 3, 17, n=2)]  # n=2 on 19 tokens: a copy
    tokens, copies = {}, {}
    for backend in ("flash", "torch"):
        llm = tiny(stage, attention_backend=backend, max_num_batched_tokens=16)
        assert llm.engine.model_runner.attention_backend == backend
        copies[backend] = spy_on_copies(llm)
        first = llm.generate(warm, greedy(stage, 3), use_tqdm=False)[0]
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert [o.num_cached_tokens for o in outs] == [24, 8]
        tokens[backend] = [first.token_ids] + [c.token_ids for o in outs for c in o.outputs]
    assert tokens["flash"] == tokens["torch"]
    assert len(copies["flash"]) == len(copies["torch"]) == 1


# --- the CLI ----------------------------------------------------------------------------

TINY_CLI = ("--model", "dummy:tiny-llama", "--device", "cpu")


@pytest.mark.parametrize("stage", STAGES)
def test_cli_help_lists_the_prefix_cache_options(stage, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_stage(f"{stage}.run").parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--system", "--n", "--no-prefix-caching"):
        assert re.search(rf"^\s+{re.escape(option)}\b", out, re.M), option


@pytest.mark.parametrize("stage", STAGES)
def test_cli_n_without_temperature_fails_clearly(stage):
    result = run_cli(stage, *TINY_CLI, "--n", "2")
    assert result.returncode == 2
    assert "error: n must be 1 with greedy sampling" in result.stderr
    assert "Traceback" not in result.stderr


def table_rows(stdout: str) -> list[list[str]]:
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if "TTFT ms" in line)
    assert lines[header].split()[:4] == ["request", "in", "cached", "out"]
    return [line.split() for line in lines[header + 1:] if line.strip()]


@pytest.mark.parametrize("stage", STAGES)
def test_cli_system_prompt_is_cached_for_the_later_prompts(stage):
    system = "You are a terse assistant. Answer in one short sentence, then stop."
    result = run_cli(stage, *TINY_CLI, "--system", system, "--max-tokens", "3")
    assert result.returncode == 0, result.stderr
    rows = table_rows(result.stdout)
    assert len(rows) == 3
    cached = [int(row[2]) for row in rows]
    assert cached[0] == 0 and cached[1] > 0 and cached[2] > 0
    assert all(c % 16 == 0 and c <= len(system) + 1 for c in cached)  # whole blocks
    match = re.search(r"Prefix cache: (\d+) of (\d+) prompt tokens found cached", result.stdout)
    assert match and int(match.group(1)) == sum(cached)
    assert int(match.group(2)) == sum(int(row[1]) for row in rows)


@pytest.mark.parametrize("stage", STAGES)
def test_cli_no_prefix_caching_and_n_samples(stage, capsys):
    run = load_stage(f"{stage}.run")
    assert run.main([*TINY_CLI, "--system", "A shared system prompt of some length.",
                     "--max-tokens", "2", "--no-prefix-caching"]) == 0
    out = capsys.readouterr().out
    assert all(int(row[2]) == 0 for row in table_rows(out))
    assert "Prefix cache: off, or no prompt looked up" in out
    assert run.main([*TINY_CLI, "--prompt", "Hello there", "--n", "3", "--temperature", "0.8",
                     "--seed", "1", "--max-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("--- ")] == [
        f"--- 'Hello there' (sample {i})" for i in range(3)]


# --- on a GPU ---------------------------------------------------------------------------

GPU_MODEL = "dummy:qwen2.5-0.5b"


def gpu_prompts(vocab_size: int) -> list[list[int]]:
    """Six prompts on a 200-token prefix: hits at block boundaries and inside blocks."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randint(3, vocab_size, (200,), generator=gen).tolist()
    tails = [torch.randint(3, vocab_size, (n,), generator=gen).tolist()
             for n in (1, 7, 16, 33, 0, 60)]
    return [base[:k] + t for k, t in zip((200, 160, 64, 200, 200, 97), tails)]


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
def test_gpu_bf16_cache_on_and_off_agree(stage):
    """bf16 with CUDA graphs. A hit skips recomputing the prefix, so steps split (and
    round) differently from a run with the cache off, and free-running greedy paths may
    part at near-ties: as tests/test_gpu.py does, compare teacher-forced. Along the
    cache-off greedy path, each position's next-token log-probabilities (one request per
    position, all hitting the cache) agree within a tolerance, and so do the argmaxes
    but for a few near-ties."""
    mod = load_stage(stage)
    SamplingParams = mod.SamplingParams
    llms = {caching: mod.LLM(GPU_MODEL, device="cuda", enable_prefix_caching=caching,
                             kv_cache_memory=2**30, max_num_batched_tokens=256)
            for caching in (True, False)}
    assert all(llm.engine.model_runner.graphs is not None for llm in llms.values())
    prompts = gpu_prompts(llms[True].engine.vocab_size)
    paths = [o.token_ids for o in llms[False].generate(
        prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)]
    forced = [p + path[:j] for p, path in zip(prompts, paths) for j in range(len(path))]
    one = SamplingParams(temperature=0, max_tokens=1, logprobs=5)
    llms[True].generate(prompts[0], one, use_tqdm=False)  # the shared prefix, cached
    on, off = (llms[c].generate(forced, one, use_tqdm=False) for c in (True, False))
    assert all(o.num_cached_tokens >= 64 for o in on)
    assert all(o.num_cached_tokens == 0 for o in off)
    agree = sum(a.token_ids == b.token_ids for a, b in zip(on, off)) / len(forced)
    err = scale = 0.0
    for a, b in zip(on, off):
        got, want = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        for token, lp in want.items():
            scale = max(scale, abs(lp.logprob))
            if token in got:
                err = max(err, abs(got[token].logprob - lp.logprob))
    print(f"\n[{stage} {GPU_MODEL} bf16] cache on vs off, teacher-forced over "
          f"{len(forced)} positions: argmax agreement {agree:.3f}, max |logprob diff| "
          f"{err:.4f} (largest |logprob| {scale:.2f})")
    assert agree >= 0.8
    assert err <= 0.05 * scale  # tests/test_gpu.py's LOGITS_REL_TOL, against transformers
    del llms
    torch.cuda.empty_cache()


@pytest.mark.gpu
@pytest.mark.parametrize("stage", STAGES)
def test_gpu_seeded_samples_equal_their_solo_runs(stage):
    mod = load_stage(stage)
    llm = mod.LLM(GPU_MODEL, device="cuda", kv_cache_memory=2**30)
    first = gpu_prompts(llm.engine.vocab_size)[0]
    prompts = [first, first[:193]]  # (len - 1) % 16: 8 (copy-on-write), 0 (none)
    n, seed = 4, 123
    outs = llm.generate(prompts, mod.SamplingParams(temperature=1.0, n=n, seed=seed,
                                                    max_tokens=8, ignore_eos=True),
                        use_tqdm=False)
    llm.reset_prefix_cache()
    equal = samples = 0
    for prompt, out in zip(prompts, outs):
        assert len(out.outputs) == n
        assert len({tuple(c.token_ids) for c in out.outputs}) == n
        for c in out.outputs:
            solo = llm.generate(prompt, mod.SamplingParams(
                temperature=1.0, seed=seed + c.index, max_tokens=8, ignore_eos=True),
                use_tqdm=False)[0]
            equal += c.token_ids == solo.token_ids
            samples += 1
    print(f"\n[{stage} {GPU_MODEL} bf16] {equal}/{samples} samples equal their solo runs")
    # A sample computes the prompt's last token as a decode, its solo run in a prefill:
    # bf16 rounding may tip a draw now and then, never most of them.
    assert equal >= 0.75 * samples
