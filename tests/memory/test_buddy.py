from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.memory.buddy import BuddyAllocator


@settings(max_examples=200, deadline=None)
@given(
    start=st.integers(0, 64),
    length=st.integers(1, 600),
    ops=st.lists(st.tuples(st.booleans(), st.integers(0, 4), st.integers(0, 1000)), max_size=120),
)
def test_buddy_never_overlaps_and_coalesces_back(
    start: int, length: int, ops: list[tuple[bool, int, int]]
) -> None:
    b = BuddyAllocator(start, start + length, 6)
    live: dict[int, int] = {}
    for is_alloc, order, pick in ops:
        if is_alloc or not live:
            got = b.alloc(order)
            if got is None:
                continue
            assert got % (1 << order) == 0, "blocks are naturally aligned"
            assert start <= got and got + (1 << order) <= start + length
            for other, o in live.items():
                assert got + (1 << order) <= other or other + (1 << o) <= got
            live[got] = order
        else:
            block = sorted(live)[pick % len(live)]
            b.free(block, live.pop(block))
        assert b.nr_free == length - sum(1 << o for o in live.values())
    for block, order in live.items():
        b.free(block, order)
    assert b.free_runs() == [(start, start + length)]


def test_top_down_and_lifo_reuse() -> None:
    b = BuddyAllocator(0, 1024, 10)
    first = b.alloc(0)
    second = b.alloc(0)
    assert (first, second) == (1023, 1022)
    assert second is not None
    b.free(second, 0)
    assert b.alloc(0) == second


def test_alloc_contig_and_reserve() -> None:
    b = BuddyAllocator(0, 4096, 4)
    got = b.alloc_contig(100, align=16, limit=1000)
    assert got is not None and got % 16 == 0 and got + 100 <= 1000
    assert all(not b.is_free(f) for f in range(got, got + 100))
    b.free_contig(got, 100)
    b.reserve(5, 3)
    assert not b.is_free(6) and b.is_free(4) and b.is_free(8)
    assert b.nr_free == 4096 - 3
