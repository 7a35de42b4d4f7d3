"""Checks of M6's exercises: the hash chain, the LRU free queue, the longest cached prefix,
blocks registered as they fill, copy-on-write. Each test runs on its exercise's package
(the `stage` fixture). The expected hashes are sha256 chains computed here."""

import hashlib
import struct

import pytest

m61 = pytest.mark.exercise("m6.1")
m62 = pytest.mark.exercise("m6.2")
m63 = pytest.mark.exercise("m6.3")
m64 = pytest.mark.exercise("m6.4")
m65 = pytest.mark.exercise("m6.5")

ROOT = bytes(32)


def chain(token_ids, block_size, parent=ROOT):
    """The hashes of the full blocks of token_ids: sha256(parent hash + 8-byte LE ids)."""
    hashes = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = token_ids[start:start + block_size]
        parent = hashlib.sha256(parent + struct.pack(f"<{len(block)}q", *block)).digest()
        hashes.append(parent)
    return hashes


def sequence(stage, token_ids, seq_id=0):
    return stage("request").Sequence(seq_id, f"r{seq_id}", list(token_ids))


def manager(stage, num_blocks=8, block_size=4, caching=True):
    return stage("core.kv_cache_manager").KVCacheManager(num_blocks, block_size, caching)


def free_ids(pool):
    return list(pool.free_blocks)


# --- m6.1 the hash chain -----------------------------------------------------------------

@m61
def test_hash_block_is_sha256_of_parent_and_tokens(stage):
    bp = stage("core.block_pool")
    tokens = struct.pack("<4q", 1, 2, 3, 4)
    assert bp.hash_block(ROOT, tokens) == hashlib.sha256(ROOT + tokens).digest()
    parent = hashlib.sha256(b"a parent").digest()
    assert bp.hash_block(parent, tokens) == hashlib.sha256(parent + tokens).digest()
    assert bp.hash_block(ROOT, tokens, ("lora-a",)) == \
        hashlib.sha256(ROOT + tokens + repr(("lora-a",)).encode()).digest()
    assert len(bp.hash_block(ROOT, b"")) == 32


@m61
def test_block_hashes_are_the_chain_of_full_blocks(stage):
    kv = manager(stage)
    seq = sequence(stage, range(100, 110))  # 10 tokens: 2 full blocks of 4
    hashes = kv.block_hashes(seq, 2)
    assert hashes == chain(list(range(100, 110)), 4)
    assert seq.block_hashes == hashes  # kept on the sequence
    assert kv.block_hashes(sequence(stage, range(100, 110)), 0) == []


@m61
def test_equal_prefixes_give_equal_hashes(stage):
    kv = manager(stage)
    a = sequence(stage, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
    b = sequence(stage, [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 99], seq_id=1)
    ha, hb = kv.block_hashes(a, 3), kv.block_hashes(b, 3)
    assert ha[:2] == hb[:2] and ha[2] != hb[2]
    c = sequence(stage, [5, 6, 7, 8, 9, 10, 11, 12], seq_id=2)
    assert kv.block_hashes(c, 2) == ha[:2]


@m61
def test_a_change_in_an_early_block_changes_every_later_hash(stage):
    kv = manager(stage)
    tokens = list(range(16))
    changed = list(tokens)
    changed[1] = 1000
    ha = kv.block_hashes(sequence(stage, tokens), 4)
    hb = kv.block_hashes(sequence(stage, changed, seq_id=1), 4)
    assert all(x != y for x, y in zip(ha, hb))
    # the same tokens in another block: not the same hash (the position is in the chain)
    hc = kv.block_hashes(sequence(stage, [0, 1, 2, 3] * 2, seq_id=2), 2)
    assert hc[0] != hc[1]


@m61
def test_block_hashes_extends_the_chain_kept_on_the_sequence(stage):
    kv = manager(stage, block_size=2)
    tokens = [3, 1, 4, 1, 5, 9, 2, 6, 5]
    seq = sequence(stage, tokens)
    full = chain(tokens, 2)
    assert kv.block_hashes(seq, 1) == full[:1] and seq.block_hashes == full[:1]
    assert kv.block_hashes(seq, 3) == full[:3] and seq.block_hashes == full[:3]
    assert kv.block_hashes(seq, 2) == full[:2] and seq.block_hashes == full[:3]
    # the hashes it has are not computed again: the chain goes on from the one it keeps
    fake = hashlib.sha256(b"fake").digest()
    seq2 = sequence(stage, tokens, seq_id=1)
    seq2.block_hashes = [fake]
    assert kv.block_hashes(seq2, 3) == [fake] + chain(tokens[2:6], 2, parent=fake)
    assert kv.block_hashes(seq, 4) == full


# --- m6.2 the LRU free queue ---------------------------------------------------------------

def pool_of(stage, n):
    return stage("core.block_pool").BlockPool(n)


@m62
def test_allocate_takes_the_least_recently_freed(stage):
    pool = pool_of(stage, 4)
    blocks = pool.allocate(4)
    assert [b.block_id for b in blocks] == [0, 1, 2, 3]
    assert [b.ref_count for b in blocks] == [1] * 4 and pool.num_free_blocks == 0
    pool.free([blocks[2], blocks[0]])
    pool.free([blocks[3]])
    pool.free([blocks[1]])
    assert free_ids(pool) == [2, 0, 3, 1] and pool.num_free_blocks == 4
    assert [b.block_id for b in pool.allocate(3)] == [2, 0, 3]
    assert free_ids(pool) == [1]
    assert pool.allocate(0) == []


@m62
def test_allocate_refuses_more_than_are_free(stage):
    pool = pool_of(stage, 3)
    pool.allocate(2)
    with pytest.raises(RuntimeError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1 and free_ids(pool) == [2]


@m62
def test_a_freed_block_keeps_its_hash_until_allocate_evicts_it(stage):
    pool = pool_of(stage, 3)
    a, b, c = pool.allocate(3)
    ha, hb = b"a" * 32, b"b" * 32
    pool.cache(a, ha)
    pool.cache(b, hb)
    pool.free([b, a, c])
    assert pool.cached_block(ha) is a and pool.cached_block(hb) is b  # still cached
    assert a.block_hash == ha and free_ids(pool) == [1, 0, 2]
    [first] = pool.allocate(1)  # b: the least recently freed, evicted
    assert first is b and b.block_hash is None and pool.cached_block(hb) is None
    assert b.ref_count == 1
    assert pool.cached_block(ha) is a and a.block_hash == ha  # not evicted
    pool.allocate(2)  # a (cached) and c (never cached)
    assert pool.cached_block(ha) is None and a.block_hash is None and c.block_hash is None
    assert pool.cached_blocks == {}


@m62
def test_a_block_is_free_only_when_its_last_holder_lets_go(stage):
    pool = pool_of(stage, 2)
    [block] = pool.allocate(1)
    pool.touch([block])  # a second holder
    assert block.ref_count == 2 and pool.num_free_blocks == 1
    pool.free([block])
    assert block.ref_count == 1 and free_ids(pool) == [1]
    pool.free([block])
    assert block.ref_count == 0 and free_ids(pool) == [1, 0]
    with pytest.raises(RuntimeError):
        pool.free([block])
    assert block.ref_count == 0 and free_ids(pool) == [1, 0]


@m62
def test_touch_revives_a_cached_free_block(stage):
    pool = pool_of(stage, 4)
    blocks = pool.allocate(4)
    pool.cache(blocks[1], b"h" * 32)
    pool.free(blocks)
    assert free_ids(pool) == [0, 1, 2, 3]
    hit = pool.cached_block(b"h" * 32)
    pool.touch([hit])
    assert hit is blocks[1] and hit.ref_count == 1 and hit.block_hash == b"h" * 32
    assert free_ids(pool) == [0, 2, 3] and pool.num_free_blocks == 3
    assert [b.block_id for b in pool.allocate(3)] == [0, 2, 3]  # the hit is not evicted
    assert pool.cached_block(b"h" * 32) is hit
    pool.free([hit])  # used last: the back of the queue
    pool.free([blocks[0]])
    assert free_ids(pool) == [1, 0]


@m62
def test_touch_keeps_the_order_of_the_others(stage):
    pool = pool_of(stage, 5)
    blocks = pool.allocate(5)
    pool.free([blocks[4], blocks[2], blocks[0], blocks[3]])
    pool.touch([blocks[2], blocks[1]])  # 2 is free (revived), 1 is held (one more ref)
    assert blocks[2].ref_count == 1 and blocks[1].ref_count == 2
    assert free_ids(pool) == [4, 0, 3]
    pool.free([blocks[1]])
    assert blocks[1].ref_count == 1 and free_ids(pool) == [4, 0, 3]


# --- m6.3 the longest cached prefix ------------------------------------------------------

def computed(stage, kv, token_ids, seq_id=0):
    """A sequence whose whole prompt was scheduled: its full blocks are in the cache."""
    seq = sequence(stage, token_ids, seq_id)
    assert kv.allocate_slots(seq, len(token_ids))
    seq.num_computed_tokens = len(token_ids)
    return seq


@m63
def test_a_new_request_finds_its_cached_blocks(stage):
    kv = manager(stage, num_blocks=12)
    a = computed(stage, kv, range(10))  # blocks 0, 1 full and cached; block 2 partial
    b = sequence(stage, list(range(8)) + [50, 51, 52, 53], seq_id=1)
    assert kv.cached_prefix(b) == a.kv_blocks[:2]
    c = sequence(stage, list(range(4)) + [9, 9, 9, 9, 9], seq_id=2)
    assert kv.cached_prefix(c) == a.kv_blocks[:1]
    d = sequence(stage, [1] + list(range(1, 12)), seq_id=3)
    assert kv.cached_prefix(d) == []
    e = sequence(stage, range(10), seq_id=4)  # the same prompt: its partial block not cached
    assert kv.cached_prefix(e) == a.kv_blocks[:2]


@m63
def test_the_last_token_is_always_computed(stage):
    kv = manager(stage, num_blocks=12)
    a = computed(stage, kv, range(12))  # 3 full blocks cached
    assert kv.cached_prefix(sequence(stage, range(12), 1)) == a.kv_blocks[:2]
    assert kv.cached_prefix(sequence(stage, range(9), 2)) == a.kv_blocks[:2]
    assert kv.cached_prefix(sequence(stage, range(8), 3)) == a.kv_blocks[:1]
    assert kv.cached_prefix(sequence(stage, range(4), 4)) == []
    assert kv.cached_prefix(sequence(stage, range(13), 5)) == a.kv_blocks[:3]


@m63
def test_the_lookup_stops_at_the_first_miss(stage):
    kv = manager(stage, num_blocks=12)
    a = computed(stage, kv, range(12))
    kv.block_pool.uncache(a.kv_blocks[1:2])  # block 1 forgotten; block 2's hash still cached
    assert kv.cached_prefix(sequence(stage, range(13), 1)) == a.kv_blocks[:1]
    kv.block_pool.uncache(a.kv_blocks[:1])
    assert kv.cached_prefix(sequence(stage, range(13), 2)) == []


@m63
def test_no_hit_with_the_cache_off_or_for_a_full_prompt_recompute(stage):
    kv = manager(stage, num_blocks=12)
    computed(stage, kv, range(12))
    seq = sequence(stage, range(12), 1)
    seq.reads_prefix_cache = False
    assert kv.cached_prefix(seq) == []
    assert len(kv.cached_prefix(sequence(stage, range(12), 2))) == 2
    kv.enable_prefix_caching = False  # the blocks are still named, but the cache is off
    assert kv.cached_prefix(sequence(stage, range(12), 3)) == []


@m63
def test_a_freed_prefix_is_still_hit(stage):
    kv = manager(stage, num_blocks=12)
    a = computed(stage, kv, range(10))
    first_two = a.kv_blocks[:2]
    kv.free(a)
    assert kv.cached_prefix(sequence(stage, range(11), 1)) == first_two


@m63
def test_a_hit_costs_the_blocks_past_it_and_the_free_ones_it_revives(stage):
    kv = manager(stage, num_blocks=12)
    a = computed(stage, kv, range(10))
    b = sequence(stage, list(range(8)) + [7] * 6, seq_id=1)  # 14 tokens: 8 cached, 6 new
    cached = kv.cached_prefix(b)
    assert len(cached) == 2
    # a holds the cached blocks: only the new tokens' blocks are taken from the pool
    for new, needed in [(0, 0), (1, 1), (4, 1), (5, 2), (6, 2), (9, 3)]:
        assert kv.num_blocks_needed(b, new, cached) == needed, new
    kv.free(a)  # now both cached blocks are free: a hit takes them out of the free queue
    for new, needed in [(0, 2), (1, 3), (4, 3), (6, 4)]:
        assert kv.num_blocks_needed(b, new, cached) == needed, new
    kv.block_pool.touch(cached[:1])  # one held, one free
    assert kv.num_blocks_needed(b, 6, cached) == 3


@m63
def test_a_hit_is_admitted_exactly_when_the_pool_has_room(stage):
    kv = manager(stage, num_blocks=4)
    a = computed(stage, kv, range(10))  # 3 blocks; 1 free
    kv.free(a)  # all 4 free, 2 of them cached
    b = sequence(stage, list(range(8)) + [1] * 9, seq_id=1)  # 17 tokens: 8 cached, 9 new
    cached = kv.cached_prefix(b)
    assert kv.num_blocks_needed(b, 9, cached) == 5 and not kv.allocate_slots(b, 9, cached)
    assert kv.num_blocks_needed(b, 8, cached) == 4 and kv.allocate_slots(b, 8, cached)
    assert b.kv_blocks[:2] == cached and kv.num_free_blocks == 0


# --- m6.4 blocks registered as they fill ---------------------------------------------------

@m64
def test_cache_names_a_block_once(stage):
    pool = stage("core.block_pool").BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"x" * 32)
    assert a.block_hash == b"x" * 32 and pool.cached_block(b"x" * 32) is a
    pool.cache(b, b"x" * 32)  # the same tokens computed twice: the first copy stays cached
    assert b.block_hash is None and pool.cached_block(b"x" * 32) is a
    pool.cache(c, b"y" * 32)
    assert pool.cached_blocks == {b"x" * 32: a, b"y" * 32: c}


@m64
def test_full_blocks_are_cached_when_scheduled_partial_ones_are_not(stage):
    kv = manager(stage, num_blocks=8)
    tokens = list(range(20, 34))  # 14 tokens
    expected = chain(tokens, 4)
    seq = sequence(stage, tokens)
    assert kv.allocate_slots(seq, 5)  # a first chunk of 5: block 0 full, block 1 not
    assert [b.block_hash for b in seq.kv_blocks] == [expected[0], None]
    assert seq.num_hashed_blocks == 1
    seq.num_computed_tokens = 5
    assert kv.allocate_slots(seq, 9)  # the rest: blocks 1, 2 full, block 3 holds 2 tokens
    assert [b.block_hash for b in seq.kv_blocks] == expected[:3] + [None]
    assert seq.num_hashed_blocks == 3
    assert kv.block_pool.cached_blocks == dict(zip(expected[:3], seq.kv_blocks[:3]))


@m64
def test_cache_full_blocks_registers_only_the_new_ones(stage):
    kv = manager(stage, num_blocks=8)
    tokens = list(range(12))
    seq = sequence(stage, tokens)
    seq.kv_blocks = kv.block_pool.allocate(3)
    kv._cache_full_blocks(seq, 3)
    assert seq.num_hashed_blocks == 0 and kv.block_pool.cached_blocks == {}
    seq.num_hashed_blocks = 1  # block 0 counts as registered already: not named again
    kv._cache_full_blocks(seq, 11)
    expected = chain(tokens, 4)
    assert [b.block_hash for b in seq.kv_blocks] == [None, expected[1], None]
    assert seq.num_hashed_blocks == 2
    kv._cache_full_blocks(seq, 12)
    assert [b.block_hash for b in seq.kv_blocks] == [None, expected[1], expected[2]]
    assert seq.num_hashed_blocks == 3


@m64
def test_a_token_not_yet_known_is_not_hashed(stage):
    kv = manager(stage, num_blocks=8)
    seq = sequence(stage, range(7))  # 7 known tokens; the 8th still on the device
    seq.kv_blocks = kv.block_pool.allocate(2)
    kv._cache_full_blocks(seq, 8)
    assert seq.num_hashed_blocks == 1 and seq.kv_blocks[1].block_hash is None
    seq.token_ids.append(7)
    kv._cache_full_blocks(seq, 9)
    assert seq.num_hashed_blocks == 2
    assert seq.kv_blocks[1].block_hash == chain(list(range(8)), 4)[1]


@m64
def test_two_requests_computing_the_same_blocks_at_once(stage):
    kv = manager(stage, num_blocks=8)
    a, b = sequence(stage, range(9)), sequence(stage, range(9), seq_id=1)
    assert kv.allocate_slots(a, 9) and kv.allocate_slots(b, 9)
    hashes = chain(list(range(9)), 4)
    assert [blk.block_hash for blk in a.kv_blocks] == hashes + [None]
    assert [blk.block_hash for blk in b.kv_blocks] == [None, None, None]
    assert b.num_hashed_blocks == 2  # registered (by a's copies), not to be looked at again
    assert kv.cached_prefix(sequence(stage, range(9), seq_id=2)) == a.kv_blocks[:2]


# --- m6.5 copy-on-write ------------------------------------------------------------------

def forked(stage, kv, num_prompt=6):
    """A parent whose prompt ran, and a child forked from it at its prompt."""
    parent = sequence(stage, range(num_prompt))
    assert kv.allocate_slots(parent, num_prompt)
    parent.num_computed_tokens = num_prompt
    child = sequence(stage, range(num_prompt), seq_id=1)
    kv.fork(parent, child, num_prompt)
    child.num_computed_tokens = child.num_cached_tokens = num_prompt
    return parent, child


@m65
def test_a_fork_copies_its_shared_partial_block_before_writing(stage):
    kv = manager(stage, num_blocks=8)
    parent, child = forked(stage, kv)  # 6 tokens: block 0 full, block 1 holds 2
    shared = parent.kv_blocks[1]
    assert shared.ref_count == 2 and kv.num_free_blocks == 6
    assert kv._must_copy_last_block(child)
    assert kv.num_blocks_needed(child, 1) == 1  # the copy
    assert kv.allocate_slots(child, 1)
    copy = child.kv_blocks[1]
    assert child.kv_blocks[0] is parent.kv_blocks[0] and copy is not shared
    assert copy.ref_count == 1 and shared.ref_count == 1 and kv.num_free_blocks == 5
    assert kv.take_copies() == [(shared.block_id, copy.block_id)]
    assert copy.block_id == 2  # the first free block
    # the parent writes into its own block, now held by it alone: no copy
    assert not kv._must_copy_last_block(parent)
    assert kv.num_blocks_needed(parent, 1) == 0
    child.num_computed_tokens = 7  # it wrote its first token: the block is its own
    assert not kv._must_copy_last_block(child)


@m65
def test_no_copy_when_the_fork_starts_on_a_fresh_block(stage):
    kv = manager(stage, num_blocks=8)
    parent, child = forked(stage, kv, num_prompt=8)
    assert child.kv_blocks == parent.kv_blocks and child.kv_blocks[1].ref_count == 2
    assert not kv._must_copy_last_block(child)
    assert kv.num_blocks_needed(child, 1) == 1  # a new block, no copy
    assert kv.allocate_slots(child, 1) and kv.take_copies() == []
    assert child.kv_blocks[:2] == parent.kv_blocks[:2]


@m65
def test_copy_when_another_holder_or_the_cache_may_read_it(stage):
    kv = manager(stage, num_blocks=8)
    seq = sequence(stage, range(6))
    seq.kv_blocks = kv.block_pool.allocate(2)
    seq.num_computed_tokens = seq.num_cached_tokens = 6
    assert not kv._must_copy_last_block(seq)  # its own, unnamed: it writes in place
    kv.block_pool.cache(seq.kv_blocks[1], b"z" * 32)
    assert kv._must_copy_last_block(seq)  # named: a later hit would read it
    kv.block_pool.uncache(seq.kv_blocks[1:])
    kv.block_pool.touch(seq.kv_blocks[1:])
    assert kv._must_copy_last_block(seq)  # another holder
    seq.num_computed_tokens, seq.num_cached_tokens = 6, 0  # it computed them itself
    assert not kv._must_copy_last_block(seq)


@m65
def test_copy_last_block_swaps_in_a_fresh_block(stage):
    kv = manager(stage, num_blocks=4)
    seq = sequence(stage, range(6))
    seq.kv_blocks = kv.block_pool.allocate(2)
    other = kv.block_pool.allocate(1)
    kv.block_pool.free(other)
    shared = seq.kv_blocks[1]
    kv.block_pool.touch([shared])
    kv._copy_last_block(seq)
    assert [b.block_id for b in seq.kv_blocks] == [0, 3]  # 3 was free longest (LRU)
    assert shared.ref_count == 1 and seq.kv_blocks[1].ref_count == 1
    assert kv.take_copies() == [(1, 3)] and kv.take_copies() == []
    assert list(kv.block_pool.free_blocks) == [2]
