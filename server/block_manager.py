"""The KV cache's bookkeeping: a free list of fixed-size blocks and per-sequence block tables.

Plain Python, no torch. Blocks carry reference counts so that shared prefixes can come later;
today every block has one owner.
"""
from __future__ import annotations

import heapq


def blocks_for(num_slots: int, block_size: int) -> int:
    return (num_slots + block_size - 1) // block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise --kv-cache-memory-gb")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # lowest id first: live blocks stay packed at the start of the pool, so a long-running
        # server keeps a small, cache- and TLB-friendly working set instead of cycling the pool
        self.free_blocks: list[int] = list(range(num_blocks))  # a heap
        self.ref_counts = [0] * num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_needed(self, block_table: list[int], num_slots: int) -> int:
        """Extra blocks a table needs to hold num_slots slots."""
        return max(0, blocks_for(num_slots, self.block_size) - len(block_table))

    def can_grow(self, block_table: list[int], num_slots: int) -> bool:
        return self.blocks_needed(block_table, num_slots) <= self.num_free_blocks

    def grow(self, block_table: list[int], num_slots: int) -> None:
        """Append blocks to `block_table` (in place) until it holds num_slots slots."""
        needed = self.blocks_needed(block_table, num_slots)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV-cache blocks: need {needed}, {self.num_free_blocks} free")
        for _ in range(needed):
            block = heapq.heappop(self.free_blocks)
            self.ref_counts[block] = 1
            block_table.append(block)

    def shrink(self, block_table: list[int], num_slots: int) -> None:
        """Release the blocks past those that hold num_slots slots (in place)."""
        keep = blocks_for(num_slots, self.block_size)
        while len(block_table) > keep:
            self._release(block_table.pop())

    def free(self, block_table: list[int]) -> None:
        while block_table:
            self._release(block_table.pop())

    def _release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            heapq.heappush(self.free_blocks, block)
