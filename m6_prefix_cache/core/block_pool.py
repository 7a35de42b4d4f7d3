"""The block pool: every block of the paged KV cache, the free ones, and the cached ones.

The cache is cut into `num_blocks` blocks of `block_size` tokens; a block's ref count
says how many sequences hold it (several may share one). A full block can carry a hash
that names its tokens and all those before them (`hash_block`), and the pool maps hashes
to blocks, so a prompt that starts with the same tokens finds them. A freed block keeps
its hash and contents in the free queue, least recently used first (an `OrderedDict`): a
hit revives it, until an allocation takes it and evicts what it held.

Introduced in M3; changed in M6 (hashes, shared ref counts, an LRU free queue).
"""

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass

# The parent of a sequence's first block: 32 zero bytes, the length of a sha256 digest.
ROOT_HASH = bytes(32)


def token_bytes(token_ids: list[int]) -> bytes:
    """Token ids as bytes, 8 each (little-endian): the stable encoding that is hashed."""
    return struct.pack(f"<{len(token_ids)}q", *token_ids)


def hash_block(parent_hash: bytes, block_tokens: bytes, extra_keys: tuple = ()) -> bytes:
    """The hash of a full block: sha256 over its parent block's hash, its own tokens
    (`token_bytes`) and any extra keys (none in this engine yet; e.g. a LoRA adapter's
    name would go here). Equal hashes mean equal prefixes: the chain covers every token
    before the block, and sha256 makes a collision unthinkable (Python's `hash` would
    not: it is 64 bits and easy to collide on purpose)."""
    # exercise m6.1 begin
    data = parent_hash + block_tokens
    if extra_keys:
        data += repr(extra_keys).encode()
    return hashlib.sha256(data).digest()
    # exercise m6.1 end


@dataclass(eq=False)
class KVBlock:
    block_id: int  # its index in the KV cache tensors
    ref_count: int = 0  # sequences that hold it; 0 means free
    block_hash: bytes | None = None  # what it holds, when it is full and cached


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        # Least recently used first: the front is evicted first.
        self.free_blocks: OrderedDict[int, KVBlock] = OrderedDict(
            (block.block_id, block) for block in self.blocks)
        self.cached_blocks: dict[bytes, KVBlock] = {}  # hash -> the block that holds it

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks no one holds: empty ones, and cached ones that may be evicted."""
        return len(self.free_blocks)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n free blocks, least recently used first (the caller checks
        num_free_blocks first); a cached one among them is evicted: its hash forgotten."""
        # exercise m6.2 begin
        if n > len(self.free_blocks):
            raise RuntimeError(f"cannot allocate {n} blocks: {self.num_free_blocks} are free")
        blocks = [self.free_blocks.popitem(last=False)[1] for _ in range(n)]
        for block in blocks:
            if block.ref_count != 0:
                raise RuntimeError(f"block {block.block_id} is in the free queue but held")
            self._uncache(block)
            block.ref_count = 1
        return blocks
        # exercise m6.2 end

    def free(self, blocks: list[KVBlock]) -> None:
        """Give blocks back; one that no one holds any more joins the back of the free
        queue, keeping its hash. Give a sequence's blocks last block first: its
        tail is then evicted before its prefix, which more requests share."""
        # exercise m6.2 begin
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} is freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_blocks[block.block_id] = block
        # exercise m6.2 end

    # -- the prefix cache -------------------------------------------------------------------
    def cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self.cached_blocks.get(block_hash)

    def touch(self, blocks: list[KVBlock]) -> None:
        """Hold blocks someone else filled (a new request's prefix hit, or a sample's
        fork): one more ref each; a free one leaves the queue."""
        # exercise m6.2 begin
        for block in blocks:
            if block.ref_count == 0:
                del self.free_blocks[block.block_id]
            block.ref_count += 1
        # exercise m6.2 end

    def cache(self, block: KVBlock, block_hash: bytes) -> None:
        """Name a block just filled by its hash, so later requests can hit it. If another
        block holds the same tokens already (two requests computed them at once), that
        one stays the cached copy and this block is left unnamed."""
        # exercise m6.4 begin
        if block_hash not in self.cached_blocks:
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block
        # exercise m6.4 end

    def uncache(self, blocks: list[KVBlock]) -> None:
        """Forget what these blocks hold (their contents cannot be trusted)."""
        for block in blocks:
            self._uncache(block)

    def _uncache(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self.cached_blocks[block.block_hash]
            block.block_hash = None

    def reset_cache(self) -> None:
        """Forget every cached block's hash (the blocks themselves stay where they are)."""
        self.uncache(list(self.cached_blocks.values()))
