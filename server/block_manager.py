"""The KV cache's bookkeeping: a free list of fixed-size blocks, per-sequence block tables,
and a prefix cache.

Plain Python, no torch. A block has a reference count: the number of block tables holding it.

Prefix cache (`caching=True`): a full block whose keys and values are final is registered
under a hash of its tokens and of every token before it (`chain_hashes`), since a token's keys
and values depend on its whole prefix. A sequence admitted later whose first blocks hash the
same shares those blocks (one more reference each) and starts its prefill after them. A
registered block that no table holds any more keeps its contents and its hash: it is free to
take (it counts in `num_free_blocks`), but only once no never-used or unregistered block is
left, least recently released first, and taking it drops its hash. Shared blocks are full and
before every position a step writes (`Scheduler`), so no write ever reaches a shared block.
"""
from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict

ROOT_HASH = b""   # the parent of a sequence's first block


def blocks_for(num_slots: int, block_size: int) -> int:
    return (num_slots + block_size - 1) // block_size


def chain_hashes(token_ids: list[int], block_size: int, known: list[bytes], count: int,
                 salt: str | None = None) -> list[bytes]:
    """Extend `known` (the hashes of token_ids' first len(known) full blocks, in place) to
    `count` blocks and return it. Block i's hash covers its tokens and block i - 1's hash
    (the first block's, the salt: requests share blocks only with requests of the same
    salt): 128-bit BLAKE2b, so two different prefixes never meet in practice, even when a
    client picks its tokens to collide (the server shares blocks across clients)."""
    while len(known) < count:
        i = len(known)
        parent = known[-1] if known else salt_hash(salt)
        tokens = array("I", token_ids[i * block_size:(i + 1) * block_size]).tobytes()
        known.append(hashlib.blake2b(tokens, digest_size=16, key=parent).digest())
    return known


def salt_hash(salt: str | None) -> bytes:
    return ROOT_HASH if salt is None else hashlib.blake2b(salt.encode(), digest_size=16, person=b"cache_salt").digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, caching: bool = False):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block; raise --kv-cache-memory-gb")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching
        # lowest id first: live blocks stay packed at the start of the pool, so a long-running
        # server keeps a small, cache- and TLB-friendly working set instead of cycling the pool
        self.free_blocks: list[int] = list(range(num_blocks))  # a heap; holds no registered block
        self.ref_counts = [0] * num_blocks
        self.cached: dict[bytes, int] = {}        # prefix hash -> the block holding it
        self.block_hashes: dict[int, bytes] = {}  # registered block -> its prefix hash
        self.evictable: OrderedDict[int, None] = OrderedDict()  # registered, unheld; least recently released first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

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
            block = self._take()
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

    # ---- the prefix cache ----------------------------------------------------------------
    def share_cached(self, block_table: list[int], hashes: list[bytes]) -> int:
        """Append to an empty table the cached blocks of the longest run of `hashes` (a
        sequence's first full blocks, chain_hashes), one reference each; returns how many."""
        if block_table:
            raise ValueError("only a table that holds nothing yet can start from cached blocks")
        for h in hashes if self.caching else ():
            block = self.cached.get(h)
            if block is None:
                break
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
            block_table.append(block)
        return len(block_table)

    def count_cached(self, hashes: list[bytes]) -> int:
        """How many of hashes' first blocks the cache holds (no reference taken)."""
        count = 0
        for h in hashes if self.caching else ():
            if h not in self.cached:
                break
            count += 1
        return count

    def register(self, block: int, prefix_hash: bytes) -> None:
        """`block` (held) now holds the final keys and values of the prefix `prefix_hash`
        names. A prefix already cached in another block keeps that one."""
        if not self.caching or prefix_hash in self.cached or block in self.block_hashes:
            return
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} is registered but held by no table")
        self.cached[prefix_hash] = block
        self.block_hashes[block] = prefix_hash

    def reset_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents, unregistered)."""
        for block in self.evictable:
            heapq.heappush(self.free_blocks, block)
        self.evictable.clear()
        self.cached.clear()
        self.block_hashes.clear()

    def _take(self) -> int:
        if self.free_blocks:
            return heapq.heappop(self.free_blocks)
        block, _ = self.evictable.popitem(last=False)   # the least recently released cached prefix
        del self.cached[self.block_hashes.pop(block)]
        return block

    def _release(self, block: int) -> None:
        if self.ref_counts[block] <= 0:
            raise RuntimeError(f"block {block} freed twice")
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            if block in self.block_hashes:
                self.evictable[block] = None
            else:
                heapq.heappush(self.free_blocks, block)
