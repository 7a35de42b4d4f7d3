"""The KV cache manager: which blocks hold each sequence's keys and values.

A sequence's tokens live in its blocks in order (token i at offset i % block_size of
block `seq.kv_blocks[i // block_size]`); the list of its block ids is its block table.
Every full block is named by a hash chained over all the tokens up to its end and
registered in the prefix cache; a new sequence starts with the longest run of cached
blocks of its prompt, shared (ref counts), never copied. The n samples of a request
share the first one's blocks, its partly filled last one too, which each other sample
copies before its first write (`take_copies`). It is the only writer of a sequence's
blocks and hashes.

Introduced in M3; changed in M6 (prefix caching; forks with copy-on-write).
"""

from ..request import Sequence
from ..utils import cdiv
from .block_pool import ROOT_HASH, BlockPool, KVBlock, hash_block, token_bytes


class KVCacheManager:
    # enable_prefix_caching: the scheduler passes its config's (on by default there)
    def __init__(self, num_blocks: int, block_size: int,
                 enable_prefix_caching: bool = False) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self.enable_prefix_caching = enable_prefix_caching
        self._copies: list[tuple[int, int]] = []  # for the next step: see `take_copies`
        # Prompt tokens looked up when requests were admitted, and how many were cached.
        self.prefix_cache_queries = 0
        self.prefix_cache_hits = 0

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies the next step must make first, (source id, destination id):
        each is handed out once."""
        copies, self._copies = self._copies, []
        return copies

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    # -- the prefix cache (M6) -----------------------------------------------------------
    def block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The hashes of `seq`'s first num_blocks full blocks: the chain kept on the
        sequence (its tokens never change, so neither do their hashes), extended first
        by the blocks it lacks, their tokens encoded at once."""
        # exercise m6.1 begin
        hashes, step = seq.block_hashes, 8 * self.block_size  # bytes per block
        data = token_bytes(seq.token_ids[len(hashes) * self.block_size:
                                         num_blocks * self.block_size])
        parent = hashes[-1] if hashes else ROOT_HASH
        for start in range(0, len(data), step):
            parent = hash_block(parent, data[start:start + step])
            hashes.append(parent)
        return hashes[:num_blocks]
        # exercise m6.1 end

    def cached_prefix(self, seq: Sequence) -> list[KVBlock]:
        """The cached blocks that hold the longest prefix of `seq`'s tokens, leaving at
        least its last token to compute ([] with the cache off, or for a sequence that
        must compute its whole prompt)."""
        # exercise m6.3 begin
        if not self.enable_prefix_caching or not seq.reads_prefix_cache:
            return []
        hits = []
        for block_hash in self.block_hashes(seq, (len(seq.token_ids) - 1) // self.block_size):
            block = self.block_pool.cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits
        # exercise m6.3 end

    def record_lookup(self, seq: Sequence, num_cached_tokens: int) -> None:
        """Count a prompt's lookup (its first admission's: not a recomputation's)."""
        if self.enable_prefix_caching and seq.reads_prefix_cache:
            self.prefix_cache_queries += len(seq.token_ids)
            self.prefix_cache_hits += num_cached_tokens

    def _cache_full_blocks(self, seq: Sequence, num_tokens: int) -> None:
        """Register the blocks that will be full once `seq` holds num_tokens tokens.

        Done when the step that fills them is scheduled (as vLLM does), so a request
        admitted later in the same step can already share them: every layer writes the
        whole step's keys and values before its attention reads any."""
        # A token still on the device (async scheduling) is hashed once it is known.
        # exercise m6.4 begin
        full = min(num_tokens, len(seq.token_ids)) // self.block_size
        hashes = self.block_hashes(seq, full)
        for i in range(seq.num_hashed_blocks, full):
            self.block_pool.cache(seq.kv_blocks[i], hashes[i])
        seq.num_hashed_blocks = full
        # exercise m6.4 end

    def forget_uncomputed(self, seq: Sequence) -> None:
        """A step failed: the blocks it was to fill for `seq` hold nothing trustworthy."""
        computed = seq.num_computed_tokens // self.block_size
        self.block_pool.uncache(seq.kv_blocks[computed:seq.num_hashed_blocks])
        seq.num_hashed_blocks = min(seq.num_hashed_blocks, computed)

    def reset_prefix_cache(self) -> None:
        self.block_pool.reset_cache()

    # -- blocks for the next step ---------------------------------------------------------
    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int,
                           cached: list[KVBlock] = ()) -> int:
        """Free blocks that giving `seq` room for num_new_tokens more tokens takes from
        the pool: new blocks, (M6) cached ones that are free now, and a copy of a shared
        last block."""
        if not cached:  # a sequence that runs, or starts with nothing cached
            num_tokens = seq.num_computed_tokens + num_new_tokens
            new = max(0, cdiv(num_tokens, self.block_size) - len(seq.kv_blocks))
            return new + self._must_copy_last_block(seq)
        # exercise m6.3 begin
        num_tokens = len(cached) * self.block_size + num_new_tokens  # a waiting one: from 0
        revived = sum(block.ref_count == 0 for block in cached)
        return max(0, cdiv(num_tokens, self.block_size) - len(cached)) + revived
        # exercise m6.3 end

    def allocate_slots(self, seq: Sequence, num_new_tokens: int,
                       cached: list[KVBlock] = ()) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`, after the `cached` blocks
        it starts with (M6: a waiting sequence's prefix hit); False if the pool is short."""
        needed = self.num_blocks_needed(seq, num_new_tokens, cached)
        if needed > self.block_pool.num_free_blocks:
            return False
        if cached:
            self.block_pool.touch(cached)
            seq.kv_blocks = list(cached)
            seq.num_hashed_blocks = len(cached)
        elif needed and self._must_copy_last_block(seq):  # the copy is one of the needed
            self._copy_last_block(seq)
        num_tokens = seq.num_computed_tokens + len(cached) * self.block_size + num_new_tokens
        new_blocks = cdiv(num_tokens, self.block_size) - len(seq.kv_blocks)
        if new_blocks > 0:
            seq.kv_blocks.extend(self.block_pool.allocate(new_blocks))
        if self.enable_prefix_caching and \
                min(num_tokens, len(seq.token_ids)) // self.block_size > seq.num_hashed_blocks:
            self._cache_full_blocks(seq, num_tokens)
        return True

    # -- n samples of one request (M6) ----------------------------------------------------
    def fork(self, parent: Sequence, child: Sequence, num_tokens: int) -> None:
        """`child` starts with `parent`'s first num_tokens tokens computed: it holds the
        same blocks (one more ref each), the last one maybe partly filled."""
        child.kv_blocks = parent.kv_blocks[:cdiv(num_tokens, self.block_size)]
        self.block_pool.touch(child.kv_blocks)
        child.num_hashed_blocks = num_tokens // self.block_size
        child.block_hashes = parent.block_hashes[:child.num_hashed_blocks]

    def _must_copy_last_block(self, seq: Sequence) -> bool:
        """A sequence that starts on a partly filled block it did not fill (a fork) is
        about to write into it: if anyone else may read that block (another holder, or
        the cache), the sequence writes into a copy of it instead."""
        # exercise m6.5 begin
        if seq.num_computed_tokens != seq.num_cached_tokens \
                or seq.num_computed_tokens % self.block_size == 0:
            return False  # its next token goes into a block of its own
        last = seq.kv_blocks[-1]
        return last.ref_count > 1 or last.block_hash is not None
        # exercise m6.5 end

    def _copy_last_block(self, seq: Sequence) -> None:
        # exercise m6.5 begin
        shared = seq.kv_blocks[-1]
        (copy,) = self.block_pool.allocate(1)
        self._copies.append((shared.block_id, copy.block_id))
        self.block_pool.free([shared])
        seq.kv_blocks[-1] = copy
        # exercise m6.5 end

    def free(self, seq: Sequence) -> None:
        """The sequence finished, was aborted or preempted: its blocks go back, last block
        first (M6: its prefix, shared the most, stays cached the longest)."""
        self.block_pool.free(seq.kv_blocks[::-1])
        seq.kv_blocks = []
        seq.num_hashed_blocks = 0

    def block_table(self, seq: Sequence, start: int = 0) -> list[int]:
        """The ids of the blocks that hold `seq`'s tokens, in token order, from its
        `start`-th block on (M4: the worker has the ones before)."""
        return [block.block_id for block in seq.kv_blocks[start:]]
