"""A binary buddy allocator over a range of frame numbers.

One mechanism serves two masters, as in the kernel where both are
power-of-two, naturally aligned allocators: the page allocator's zones
(``mm/page_alloc.c`` ``__rmqueue_smallest`` / ``__free_one_page``) and the
IOMMU's IOVA domains (``drivers/iommu/iova.c``, which rounds small
requests up to a power of two and aligns them to their size).

Blocks are handed out top-down (highest free address first, as the IOVA
allocator does) and freed blocks are reused last-in first-out, like the
IOVA rcache magazines. Every operation costs O(orders), independent of
how many blocks are live.
"""

from __future__ import annotations

from collections.abc import Iterator


class BuddyAllocator:
    """Frames ``[start, end)`` split into naturally aligned power-of-two blocks."""

    __slots__ = ("_free", "_stacks", "end", "max_order", "nr_free", "start")

    def __init__(self, start: int, end: int, max_order: int) -> None:
        if not 0 <= start <= end:
            raise ValueError(f"bad buddy range [{start:#x}, {end:#x})")
        self.start = start
        self.end = end
        self.max_order = max_order
        # Free block starts per order; the stacks give LIFO order and may
        # hold stale entries (a block merged away), skipped on pop.
        self._free: list[set[int]] = [set() for _ in range(max_order + 1)]
        self._stacks: list[list[int]] = [[] for _ in range(max_order + 1)]
        self.nr_free = 0
        for block, order in self._aligned_blocks(start, end):
            self._push(block, order)

    def _aligned_blocks(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """Decompose ``[start, end)`` into maximal aligned blocks, ascending."""
        pos = start
        while pos < end:
            order = self.max_order
            while order and (pos & ((1 << order) - 1) or pos + (1 << order) > end):
                order -= 1
            yield pos, order
            pos += 1 << order

    def _push(self, block: int, order: int) -> None:
        self._free[order].add(block)
        self._stacks[order].append(block)
        self.nr_free += 1 << order

    def _pop(self, order: int) -> int | None:
        stack, free = self._stacks[order], self._free[order]
        while stack:
            block = stack.pop()
            if block in free:
                free.discard(block)
                self.nr_free -= 1 << order
                return block
        return None

    def alloc(self, order: int) -> int | None:
        """Allocate a block of ``2**order`` frames, or None when none is free."""
        if order > self.max_order:
            return None
        for have in range(order, self.max_order + 1):
            block = self._pop(have)
            if block is None:
                continue
            # Split top-down: keep the upper half, free the lower.
            while have > order:
                have -= 1
                self._push(block, have)
                block += 1 << have
            return block
        return None

    def free(self, block: int, order: int) -> None:
        """Return a block, merging it with its free buddies."""
        while order < self.max_order:
            buddy = block ^ (1 << order)
            free = self._free[order]
            if buddy not in free:
                break
            free.discard(buddy)
            self.nr_free -= 1 << order
            block = min(block, buddy)
            order += 1
        self._push(block, order)
        self._compact(order)

    def _compact(self, order: int) -> None:
        stack, free = self._stacks[order], self._free[order]
        if len(stack) > 2 * len(free) + 64:
            self._stacks[order] = [b for b in stack if b in free]

    def is_free(self, frame: int) -> bool:
        """Whether ``frame`` lies in a free block (O(orders))."""
        return any(frame >> order << order in free for order, free in enumerate(self._free))

    def free_runs(self) -> list[tuple[int, int]]:
        """Free frames as sorted, merged ``(start, end)`` runs."""
        blocks = sorted((b, b + (1 << o)) for o, s in enumerate(self._free) for b in s)
        runs: list[tuple[int, int]] = []
        for lo, hi in blocks:
            if runs and runs[-1][1] == lo:
                runs[-1] = (runs[-1][0], hi)
            else:
                runs.append((lo, hi))
        return runs

    def alloc_contig(self, count: int, align: int = 1, limit: int | None = None) -> int | None:
        """Allocate ``count`` contiguous frames starting at a multiple of
        ``align`` and ending at or below ``limit``, highest such run first
        (``alloc_contig_range`` / memblock). O(free blocks): for rare, large
        allocations such as the swiotlb pool."""
        top = self.end if limit is None else min(limit, self.end)
        for lo, hi in reversed(self.free_runs()):
            hi = min(hi, top)
            first = (hi - count) // align * align
            if first >= lo:
                self._take(first, first + count)
                return first
        return None

    def reserve(self, first: int, count: int) -> None:
        """Take ``[first, first + count)`` out of the free blocks, whatever
        the blocks around it (``memblock_reserve``). Frames already in use
        are left alone."""
        self._take(first, first + count)

    def _take(self, lo: int, hi: int) -> None:
        for order, free in enumerate(self._free):
            for block in [b for b in free if b < hi and b + (1 << order) > lo]:
                free.discard(block)
                self.nr_free -= 1 << order
                end = block + (1 << order)
                for part_lo, part_hi in ((block, lo), (hi, end)):
                    if part_lo < part_hi:
                        for b, o in self._aligned_blocks(part_lo, part_hi):
                            self._push(b, o)
            self._stacks[order] = [b for b in self._stacks[order] if b in free]

    def free_contig(self, first: int, count: int) -> None:
        """Return frames taken by :meth:`alloc_contig`."""
        for block, order in self._aligned_blocks(first, first + count):
            self.free(block, order)
