"""Block manager invariants under random add / grow / shrink / abort / preempt sequences."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.block_manager import BlockManager, blocks_for, chain_hashes

operations = st.lists(st.tuples(st.sampled_from(["add", "grow", "shrink", "free"]),
                                st.integers(0, 7), st.integers(0, 200)), max_size=120)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 40), block_size=st.sampled_from([1, 4, 16]), ops=operations)
def test_no_block_lost_or_owned_twice(num_blocks, block_size, ops):
    manager = BlockManager(num_blocks, block_size)
    tables: dict[int, list[int]] = {}
    for op, seq, slots in ops:
        table = tables.setdefault(seq, [])
        if op in ("add", "grow"):
            if manager.can_grow(table, slots):
                manager.grow(table, slots)
                assert len(table) >= blocks_for(slots, block_size)
            else:
                with pytest.raises(RuntimeError):
                    manager.grow(table, slots)
        elif op == "shrink":
            manager.shrink(table, slots)
            assert len(table) <= blocks_for(slots, block_size)
        else:  # abort or preempt: everything back at once
            manager.free(table)
            assert table == []
        owned = [b for t in tables.values() for b in t]
        assert len(owned) == len(set(owned)), "a block is owned twice"
        assert sorted(owned + list(manager.free_blocks)) == list(range(num_blocks)), "a block was lost"
        assert all(manager.ref_counts[b] == 1 for b in owned)
        assert manager.usage == pytest.approx(len(owned) / num_blocks)


def test_double_free_is_caught():
    manager = BlockManager(2, 4)
    table = []
    manager.grow(table, 4)
    block = table[0]
    manager.free(table)
    with pytest.raises(RuntimeError, match="freed twice"):
        manager.free([block])


def test_freed_blocks_are_reused_lowest_first():
    """A long-running server keeps its live blocks packed at the start of the pool instead of
    cycling through all of it (a smaller working set for the CPU's caches)."""
    manager = BlockManager(num_blocks=64, block_size=16)
    first, second = [], []
    manager.grow(first, 16 * 4)
    manager.grow(second, 16 * 4)
    manager.free(first)
    third = []
    manager.grow(third, 16 * 2)
    assert third == [0, 1]
    manager.free(second)
    manager.free(third)
    fourth = []
    manager.grow(fourth, 16 * 8)
    assert fourth == list(range(8))


# ---- the prefix cache ------------------------------------------------------------------------
# token lists that share beginnings of 0, 1, 2 and 3 blocks of 4 tokens
TOKENS = [list(range(20)), list(range(12)) + [99] * 8, list(range(8)) + [98] * 12,
          [97] * 4 + list(range(4, 20)), list(range(16)) + [96] * 4]


def check_cache_invariants(manager: BlockManager, tables: dict[int, list[int]]) -> None:
    held = [b for t in tables.values() for b in t]
    for block in range(manager.num_blocks):
        assert manager.ref_counts[block] == held.count(block), "a reference count is not its tables'"
    idle = list(manager.free_blocks) + list(manager.evictable)
    assert sorted(set(held) | set(idle)) == list(range(manager.num_blocks)), "a block was lost"
    assert not set(held) & set(idle), "a held block is also free"
    assert len(idle) == len(set(idle)) == manager.num_free_blocks
    assert set(manager.evictable) <= set(manager.block_hashes), "an unregistered block waits in the cache"
    assert not set(manager.free_blocks) & set(manager.block_hashes), "a free block still claims a prefix"
    assert {b: h for h, b in manager.cached.items()} == manager.block_hashes


cache_operations = st.lists(st.tuples(st.sampled_from(["admit", "compute", "grow", "shrink", "free"]),
                                      st.integers(0, 5), st.integers(0, len(TOKENS) - 1), st.integers(0, 40)),
                            max_size=120)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 24), ops=cache_operations)
def test_shared_and_cached_blocks_are_never_lost_or_double_counted(num_blocks, ops):
    """Admissions start from cached blocks, computed blocks get registered, blocks are
    grown, shrunk and freed in any order: every block is held (its count = the tables that
    hold it), free, or cached and unheld, exactly one of them."""
    manager, size = BlockManager(num_blocks, 4, caching=True), 4
    tables: dict[int, list[int]] = {}
    contents: dict[int, list[int]] = {}
    for op, seq, which, slots in ops:
        table = tables.setdefault(seq, [])
        if op == "admit" and not table:
            tokens = contents[seq] = TOKENS[which]
            usable = (len(tokens) - 1) // size
            found = manager.share_cached(table, chain_hashes(tokens, size, [], usable))
            assert found <= usable and table == [manager.cached[h] for h in chain_hashes(tokens, size, [], found)]
            if manager.can_grow(table, len(tokens)):
                manager.grow(table, len(tokens))
            else:
                manager.free(table)
        elif op == "compute" and table:   # its blocks' keys and values are final: offered to the cache
            hashes = chain_hashes(contents[seq], size, [], min(len(table), len(contents[seq]) // size))
            for block, h in zip(table, hashes):
                manager.register(block, h)
        elif op == "grow" and table and manager.can_grow(table, slots):   # a tree's rows
            manager.grow(table, slots)
        elif op == "shrink":
            manager.shrink(table, max(slots, len(contents.get(seq, ()))))   # a sequence keeps its tokens' blocks
        elif op == "free":
            manager.free(table)
            contents.pop(seq, None)
        check_cache_invariants(manager, tables)


def test_chain_hashes_name_a_block_by_everything_before_it():
    a = chain_hashes(list(range(12)), 4, [], 3)
    b = chain_hashes([0, 1, 2, 3, 4, 5, 6, 7, 50, 51, 52, 53], 4, [], 3)
    c = chain_hashes([9, 1, 2, 3] + list(range(4, 12)), 4, [], 3)
    assert a[:2] == b[:2] and a[2] != b[2]           # the same first two blocks
    assert all(x != y for x, y in zip(a, c))         # a different first block changes every later name
    known = chain_hashes(list(range(12)), 4, [], 1)
    assert chain_hashes(list(range(12)), 4, known, 3) is known and known == a   # extended in place


def test_a_cached_block_is_taken_last_oldest_first_and_tails_before_heads():
    """Released cached blocks are taken only once no other block is free, the least
    recently released first; a table releases its last block first, so a prefix loses its
    tail before its beginning (the part more requests share). A taken block's prefix is
    forgotten."""
    manager = BlockManager(num_blocks=5, block_size=4, caching=True)
    first, second = [], []
    for table, tokens in ((first, list(range(8))), (second, list(range(100, 108)))):
        manager.grow(table, 8)
        for block, h in zip(table, chain_hashes(tokens, 4, [], 2)):
            manager.register(block, h)
    assert (first, second) == ([0, 1], [2, 3])
    manager.free(first)
    manager.free(second)
    assert manager.num_free_blocks == 5 and manager.usage == 0.0
    again = []
    assert manager.share_cached(again, chain_hashes(list(range(8)), 4, [], 2)) == 2 and again == [0, 1]
    other = []
    manager.grow(other, 4)
    assert other == [4]           # a never-used block first
    manager.grow(other, 8)
    assert other == [4, 3]        # then the oldest release: second's tail
    tail_gone = []
    assert manager.share_cached(tail_gone, chain_hashes(list(range(100, 108)), 4, [], 2)) == 1 and tail_gone == [2]
    for table in (again, other, tail_gone):
        manager.free(table)
    manager.reset_cache()
    assert not manager.cached and not manager.block_hashes and sorted(manager.free_blocks) == list(range(5))
