"""The KV cache manager: which blocks hold each sequence's keys and values.

A sequence's tokens live in its blocks in order: token i is at offset i % block_size of
block `seq.kv_blocks[i // block_size]`, so its *slot* in the cache is `block_id *
block_size + offset`; the list of its block ids is its block table. Blocks are taken
only as the sequence grows into them, so at most one block per sequence is partly
empty. It is the only writer of a sequence's blocks.

Introduced in M3.
"""

from ..request import Sequence
from ..utils import cdiv
from .block_pool import BlockPool


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.block_pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks `seq` lacks to hold its computed tokens plus `num_new_tokens` more."""
        # exercise m3.2 begin
        num_tokens = seq.num_computed_tokens + num_new_tokens
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.kv_blocks))
        # exercise m3.2 end

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make room for `num_new_tokens` more tokens of `seq`; False if the pool is short."""
        # exercise m3.2 begin
        needed = self.num_blocks_needed(seq, num_new_tokens)
        if needed > self.block_pool.num_free_blocks:
            return False
        if needed:
            seq.kv_blocks.extend(self.block_pool.allocate(needed))
        return True
        # exercise m3.2 end

    def free(self, seq: Sequence) -> None:
        """The sequence finished, was aborted or preempted: its blocks go back."""
        self.block_pool.free(seq.kv_blocks)
        seq.kv_blocks = []

    def block_table(self, seq: Sequence) -> list[int]:
        """The ids of the blocks that hold `seq`'s tokens, in token order."""
        return [block.block_id for block in seq.kv_blocks]
