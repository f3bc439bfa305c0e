from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.dma.iova import IOVA_32BIT_PFN, IovaDomain


@settings(max_examples=100, deadline=None)
@given(
    ops=st.lists(st.tuples(st.booleans(), st.integers(1, 40), st.integers(0, 999)), max_size=150)
)
def test_iovas_are_disjoint_size_aligned_and_never_zero(ops: list[tuple[bool, int, int]]) -> None:
    dom = IovaDomain(1 << 21)
    live: dict[int, int] = {}
    for is_alloc, npages, pick in ops:
        if is_alloc or not live:
            pfn = dom.alloc(npages)
            assert pfn is not None and pfn > 0
            size = 1 << (npages - 1).bit_length()
            assert pfn % size == 0
            for other, osize in live.items():
                assert pfn + size <= other or other + osize <= pfn
            live[pfn] = size
            assert dom.find(pfn) == size
        else:
            pfn = sorted(live)[pick % len(live)]
            assert dom.free(pfn) == live.pop(pfn)
    assert len(dom) == len(live)


def test_32bit_first_then_above_and_exhaustion_flushes_cache() -> None:
    dom = IovaDomain(IOVA_32BIT_PFN + 64)
    first = dom.alloc(1)
    assert first == IOVA_32BIT_PFN - 1
    small = IovaDomain(16)
    got = [small.alloc(1) for _ in range(15)]
    assert None not in got and 0 not in got
    assert small.alloc(1) is None
    for pfn in got[:8]:
        assert pfn is not None
        small.free(pfn)  # into the range cache, not the allocator
    # A larger request needs the allocator: the cache is flushed and merged.
    assert small.alloc(4) == 12
