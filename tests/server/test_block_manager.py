"""Block manager invariants under random add / grow / shrink / abort / preempt sequences."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server.block_manager import BlockManager, blocks_for

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
