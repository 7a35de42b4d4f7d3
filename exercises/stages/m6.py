"""M6 · prefix cache: the hash chain, the LRU free queue that keeps cached blocks, the
longest cached prefix, blocks registered as they fill, and copy-on-write for forks."""

from ..catalog import Exercise

EXERCISES = [
    Exercise(
        "m6.1", "the hash chain: name each full block by its prefix",
        ("core/block_pool.py::hash_block",
         "core/kv_cache_manager.py::KVCacheManager.block_hashes"),
        "easy",
        "A block's keys and values depend on every token before it, so its name must too: "
        "hashing the parent's hash with the block's tokens makes equal hashes mean equal "
        "prefixes, and a lookup is one dict access per block.",
        "hash_block: sha256 over parent_hash + block_tokens (+ repr(extra_keys).encode() if\n"
        "any), .digest(). block_hashes: extend seq.block_hashes (the chain so far, ROOT_HASH\n"
        "before the first) over the tokens of blocks len(hashes) .. num_blocks - 1, each\n"
        "block's token_bytes hashed with its parent's; return the first num_blocks."),
    Exercise(
        "m6.2", "the LRU free queue: evict, revive, give back",
        ("core/block_pool.py::BlockPool.allocate", "core/block_pool.py::BlockPool.free",
         "core/block_pool.py::BlockPool.touch"),
        "medium",
        "A freed block keeps its hash and contents, so a later request can still hit it; "
        "only when the pool needs room is the least recently freed block reused and its "
        "hash forgotten.",
        "free_blocks is an OrderedDict block_id -> block, least recently freed first.\n"
        "allocate: RuntimeError if n > free; popitem(last=False) n times, _uncache each, ref 1.\n"
        "free: ref_count -= 1 (RuntimeError if it is 0); at 0 it joins the back of the queue.\n"
        "touch: ref_count += 1, and a block at 0 leaves free_blocks first (a hit revives it)."),
    Exercise(
        "m6.3", "the longest cached prefix, and what a hit costs",
        ("core/kv_cache_manager.py::KVCacheManager.cached_prefix",
         "core/kv_cache_manager.py::KVCacheManager.num_blocks_needed"),
        "medium",
        "A new request starts after the longest run of its prompt's full blocks that are "
        "cached, sharing them instead of computing them; it must still compute its last "
        "token, whose logits give the first output token.",
        "cached_prefix: [] if caching is off or not seq.reads_prefix_cache; else look up\n"
        "block_hashes(seq, (len(seq.token_ids) - 1) // block_size) in the pool, up to a miss.\n"
        "num_blocks_needed, cached: cdiv(num_new_tokens, block_size) blocks past the cached,\n"
        "plus each cached block with ref_count 0 (reviving it takes it from the free queue)."),
    Exercise(
        "m6.4", "register blocks in the cache as they fill",
        ("core/block_pool.py::BlockPool.cache",
         "core/kv_cache_manager.py::KVCacheManager._cache_full_blocks"),
        "easy",
        "A block can be shared once it is full: registering it when the step that fills it "
        "is scheduled lets the next request hit it, while a partly filled block, still "
        "changing, is never named.",
        "cache: name the block (block_hash, cached_blocks[hash]) unless the hash is cached.\n"
        "_cache_full_blocks: full = min(num_tokens, len(seq.token_ids)) // block_size;\n"
        "cache blocks seq.num_hashed_blocks .. full - 1 with their block_hashes, then\n"
        "seq.num_hashed_blocks = full."),
    Exercise(
        "m6.5", "copy-on-write: a fork writes into its own block",
        ("core/kv_cache_manager.py::KVCacheManager._must_copy_last_block",
         "core/kv_cache_manager.py::KVCacheManager._copy_last_block"),
        "medium",
        "The n samples of a request share every block of the prompt, the partly filled "
        "last one too; a sample's first new token would overwrite what the others read, so "
        "it copies that block first, and only that one.",
        "Copy only if the sequence has written nothing yet (num_computed == num_cached), it\n"
        "starts mid-block, and its last block has another holder or a hash. _copy_last_block:\n"
        "allocate 1, record (shared id, copy id) in self._copies, free the shared one, and\n"
        "put the copy in its place in seq.kv_blocks."),
]
