"""The IOVA allocator of a DMA domain (``drivers/iommu/iova.c``).

Allocations are rounded up to a power of two of pages and aligned to
their size (``alloc_iova(..., size_aligned=true)``), handed out top-down,
and tried below 4 GiB first ("Try to get PCI devices a SAC address") before
the rest of the device's DMA range. Freed ranges are reused last-in
first-out, as the per-CPU rcache magazines do. Each region is a buddy
allocator, so an allocation or a free costs O(log address space) no
matter how many IOVAs are live. IOVA 0 is never handed out
(``IOVA_START_PFN``).
"""

from __future__ import annotations

from softrdma.memory.buddy import BuddyAllocator

#: First frame above the 32-bit range (``dma_32bit_pfn`` for 4 KiB granules).
IOVA_32BIT_PFN = 1 << 20
#: Sizes below 2**(IOVA_RANGE_CACHE_MAX_SIZE - 1) pages are cached.
IOVA_RANGE_CACHE_MAX_SIZE = 6
#: Cached ranges per size and region: two per-CPU magazines plus a depot
#: (IOVA_MAG_SIZE 127, MAX_GLOBAL_MAGS 32).
IOVA_RCACHE_DEPTH = 127 * 34


class IovaDomain:
    """``struct iova_domain`` for frames ``[0, limit_pfn)``."""

    def __init__(self, limit_pfn: int) -> None:
        if limit_pfn <= 1:
            raise ValueError("an IOVA domain needs at least two frames")
        low_end = min(limit_pfn, IOVA_32BIT_PFN)
        self._regions = [BuddyAllocator(0, low_end, low_end.bit_length())]
        if limit_pfn > IOVA_32BIT_PFN:
            self._regions.append(
                BuddyAllocator(IOVA_32BIT_PFN, limit_pfn, min(limit_pfn.bit_length(), 63))
            )
        self._allocs: dict[int, tuple[int, BuddyAllocator]] = {}
        self._rcache: dict[int, list[list[int]]] = {
            id(r): [[] for _ in range(IOVA_RANGE_CACHE_MAX_SIZE)] for r in self._regions
        }
        self.limit_pfn = limit_pfn

    def __len__(self) -> int:
        """Live allocations."""
        return len(self._allocs)

    def alloc(self, npages: int) -> int | None:
        """``alloc_iova_fast``: the first frame of ``npages`` (rounded up to a
        power of two, size-aligned), or None when the domain is full."""
        order = (npages - 1).bit_length()
        pfn = self._alloc(order)
        if pfn is None and any(any(c) for c in self._rcache.values()):
            self.flush_rcache()
            pfn = self._alloc(order)
        return pfn

    def _alloc(self, order: int) -> int | None:
        for region in self._regions:
            cached = self._rcache[id(region)]
            if order < IOVA_RANGE_CACHE_MAX_SIZE and cached[order]:
                pfn: int | None = cached[order].pop()
            else:
                pfn = region.alloc(order)
                if pfn == 0:
                    # Keep IOVA 0 out of use; only reached once the region is
                    # nearly full, so the common path never splits near zero.
                    region.free(0, order)
                    region.reserve(0, 1)
                    pfn = region.alloc(order)
            if pfn is not None:
                self._allocs[pfn] = (order, region)
                return pfn
        return None

    def flush_rcache(self) -> None:
        """``free_global_cached_iovas``: give every cached range back."""
        for region in self._regions:
            for order, cached in enumerate(self._rcache[id(region)]):
                for pfn in cached:
                    region.free(pfn, order)
                cached.clear()

    def find(self, pfn: int) -> int | None:
        """``find_iova`` by first frame: the allocation's size in pages."""
        entry = self._allocs.get(pfn)
        return None if entry is None else 1 << entry[0]

    def free(self, pfn: int) -> int:
        """``free_iova_fast``: release an allocation by its first frame;
        returns its size in pages."""
        order, region = self._allocs.pop(pfn)
        if order < IOVA_RANGE_CACHE_MAX_SIZE:
            cached = self._rcache[id(region)][order]
            if len(cached) < IOVA_RCACHE_DEPTH:
                cached.append(pfn)
                return 1 << order
        region.free(pfn, order)
        return 1 << order
