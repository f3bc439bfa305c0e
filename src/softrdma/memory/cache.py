"""A CPU data cache in front of a host's RAM, for non-coherent DMA.

A device that does not snoop the CPU caches (``dev_is_dma_coherent()``
false) sees RAM only. This model makes the two classic bugs observable:

* a CPU write not followed by ``dma_sync_*_for_device`` stays in a dirty
  line, so the device reads the old bytes from RAM;
* a device write read by the CPU without ``dma_sync_*_for_cpu`` returns the
  stale line the CPU still holds.

The cache is write-back and write-allocate with 64-byte lines, kept per
page (a ``bytearray`` plus valid / dirty line bitmaps) in LRU order with a
bounded capacity; an evicted page writes its dirty lines back. The
architecture hooks mirror arm64's: ``arch_sync_dma_for_device`` cleans the
range, ``arch_sync_dma_for_cpu`` invalidates it (cleaning partial lines at
the edges first). To make a missing ``sync_for_cpu`` fail every time rather
than by luck, the for-device hook also models the worst case of
speculative prefetch: it leaves clean copies of the whole range in the
cache (``prefetch``), as a CPU may legally do while the device owns it.
Pages allocated as coherent DMA memory for a non-coherent device are
mapped uncached and bypass the model (``set_uncached``).

Kernel counterparts: ``arch/arm64/mm/dma-mapping.c``,
``arch/arm64/mm/cache.S`` (``dcache_clean_poc``, ``dcache_inval_poc``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator

from softrdma.memory.layout import L1_CACHE_BYTES, PAGE_SHIFT, PAGE_SIZE, BytesLike

_LINE_SHIFT = L1_CACHE_BYTES.bit_length() - 1


class _CachedPage:
    __slots__ = ("data", "dirty", "valid")

    def __init__(self) -> None:
        self.data = bytearray(PAGE_SIZE)
        self.valid = 0
        self.dirty = 0


def _line_mask(offset: int, length: int) -> int:
    first = offset >> _LINE_SHIFT
    last = (offset + length - 1) >> _LINE_SHIFT
    return ((1 << (last - first + 1)) - 1) << first


def _runs(mask: int) -> Iterator[tuple[int, int]]:
    """Runs of set bits in ``mask`` as ``(first_line, end_line)``."""
    while mask:
        low = (mask & -mask).bit_length() - 1
        shifted = mask >> low
        length = (shifted ^ (shifted + 1)).bit_length() - 1
        yield low, low + length
        mask &= ~(((1 << length) - 1) << low)


def _page_chunks(phys: int, length: int) -> Iterator[tuple[int, int, int]]:
    """Split ``[phys, phys + length)`` into ``(pfn, offset, chunk)`` per page."""
    end = phys + length
    while phys < end:
        offset = phys & (PAGE_SIZE - 1)
        chunk = min(PAGE_SIZE - offset, end - phys)
        yield phys >> PAGE_SHIFT, offset, chunk
        phys += chunk


class CpuCache:
    """The CPU's view of RAM for a host with non-coherent devices."""

    def __init__(self, ram: memoryview, capacity_pages: int = 4096) -> None:
        self._ram = ram
        self.capacity_pages = capacity_pages
        self._pages: OrderedDict[int, _CachedPage] = OrderedDict()
        self._uncached: set[int] = set()

    # -- the CPU's accesses ------------------------------------------------

    def read(self, phys: int, length: int) -> bytes:
        """A CPU load: hits return cached lines, misses fill them from RAM."""
        parts: list[BytesLike] = []
        for pfn, offset, chunk in _page_chunks(phys, length):
            if pfn in self._uncached:
                start = (pfn << PAGE_SHIFT) + offset
                parts.append(self._ram[start : start + chunk])
                continue
            page = self._page(pfn)
            self._fill(pfn, page, _line_mask(offset, chunk))
            parts.append(page.data[offset : offset + chunk])
        return b"".join(parts)

    def write(self, phys: int, data: BytesLike) -> None:
        """A CPU store: the lines become dirty; RAM is not touched."""
        view = memoryview(data).cast("B")
        pos = 0
        for pfn, offset, chunk in _page_chunks(phys, len(view)):
            if pfn in self._uncached:
                start = (pfn << PAGE_SHIFT) + offset
                self._ram[start : start + chunk] = view[pos : pos + chunk]
            else:
                page = self._page(pfn)
                mask = _line_mask(offset, chunk)
                self._fill(pfn, page, mask)
                page.data[offset : offset + chunk] = view[pos : pos + chunk]
                page.dirty |= mask
            pos += chunk

    # -- cache maintenance (the arch_sync_dma_* hooks) ---------------------

    def clean(self, phys: int, length: int) -> None:
        """Write dirty lines of the range back to RAM (``dcache_clean_poc``)."""
        for pfn, offset, chunk in _page_chunks(phys, length):
            page = self._pages.get(pfn)
            if page is not None:
                self._writeback(pfn, page, page.dirty & _line_mask(offset, chunk))

    def invalidate(self, phys: int, length: int) -> None:
        """Drop the range's lines (``dcache_inval_poc``); lines only partly
        inside the range are cleaned first so bytes outside survive."""
        for pfn, offset, chunk in _page_chunks(phys, length):
            page = self._pages.get(pfn)
            if page is None:
                continue
            mask = _line_mask(offset, chunk)
            edges = 0
            if offset & (L1_CACHE_BYTES - 1):
                edges |= mask & -mask
            if (offset + chunk) & (L1_CACHE_BYTES - 1):
                edges |= 1 << (mask.bit_length() - 1)
            self._writeback(pfn, page, page.dirty & edges)
            page.valid &= ~mask
            page.dirty &= ~mask

    def prefetch(self, phys: int, length: int) -> None:
        """Bring the range's lines in clean, as speculative prefetch may."""
        for pfn, offset, chunk in _page_chunks(phys, length):
            if pfn not in self._uncached:
                self._fill(pfn, self._page(pfn), _line_mask(offset, chunk))

    def set_uncached(self, pfn: int, count: int, uncached: bool) -> None:
        """Map frames uncached (coherent memory of a non-coherent device)."""
        for frame in range(pfn, pfn + count):
            if uncached:
                page = self._pages.pop(frame, None)
                if page is not None:
                    self._writeback(frame, page, page.dirty)
                self._uncached.add(frame)
            else:
                self._uncached.discard(frame)

    def dirty_bytes(self, phys: int, length: int) -> int:
        """Bytes of the range held in dirty lines (for tests and the demo)."""
        total = 0
        for pfn, offset, chunk in _page_chunks(phys, length):
            page = self._pages.get(pfn)
            if page is not None:
                total += (page.dirty & _line_mask(offset, chunk)).bit_count()
        return total * L1_CACHE_BYTES

    # -- internals ---------------------------------------------------------

    def _page(self, pfn: int) -> _CachedPage:
        page = self._pages.get(pfn)
        if page is None:
            page = self._pages[pfn] = _CachedPage()
            if len(self._pages) > self.capacity_pages:
                victim_pfn, victim = self._pages.popitem(last=False)
                self._writeback(victim_pfn, victim, victim.dirty)
        else:
            self._pages.move_to_end(pfn)
        return page

    def _fill(self, pfn: int, page: _CachedPage, mask: int) -> None:
        missing = mask & ~page.valid
        if not missing:
            return
        base = pfn << PAGE_SHIFT
        for first, end in _runs(missing):
            lo, hi = first << _LINE_SHIFT, end << _LINE_SHIFT
            page.data[lo:hi] = self._ram[base + lo : base + hi]
        page.valid |= missing

    def _writeback(self, pfn: int, page: _CachedPage, mask: int) -> None:
        if not mask:
            return
        base = pfn << PAGE_SHIFT
        for first, end in _runs(mask):
            lo, hi = first << _LINE_SHIFT, end << _LINE_SHIFT
            self._ram[base + lo : base + hi] = page.data[lo:hi]
        page.dirty &= ~mask
