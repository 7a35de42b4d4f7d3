"""The block pool: every block of the paged KV cache, and the queue of free ones.

The KV cache is cut into `num_blocks` blocks of `block_size` tokens. A block is handed
to one sequence at a time, which fills it token by token and gives it back when it
finishes or is preempted; its ref count is 1 while it is held and 0 while it is free, in
the queue.

Introduced in M3.
"""

from collections import deque
from dataclasses import dataclass


@dataclass(eq=False)
class KVBlock:
    block_id: int  # its index in the KV cache tensors
    ref_count: int = 0  # sequences that hold it; 0 means free


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_block_queue: deque[KVBlock] = deque(self.blocks)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    def allocate(self, n: int) -> list[KVBlock]:
        """Take n free blocks (the caller checks num_free_blocks first)."""
        # exercise m3.1 begin
        if n > len(self.free_block_queue):
            raise RuntimeError(f"cannot allocate {n} blocks: {self.num_free_blocks} are free")
        blocks = [self.free_block_queue.popleft() for _ in range(n)]
        for block in blocks:
            if block.ref_count != 0:
                raise RuntimeError(f"block {block.block_id} is in the free queue but held")
            block.ref_count = 1
        return blocks
        # exercise m3.1 end

    def free(self, blocks: list[KVBlock]) -> None:
        """Give blocks back; one that no one holds any more returns to the free queue."""
        # exercise m3.1 begin
        for block in blocks:
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block.block_id} is freed twice")
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_queue.append(block)
        # exercise m3.1 end
