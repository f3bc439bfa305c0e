"""swiotlb: the software IO TLB, a pool of bounce buffers in low memory
(``kernel/dma/swiotlb.c``, ``include/linux/swiotlb.h``).

The pool is ``nslabs`` slots of ``IO_TLB_SIZE`` (2 KiB) carved from
physically contiguous memory below 4 GiB. A mapping takes contiguous
slots within one 128-slot segment (page-aligned for a page or more) and
copies are real: the original is copied into the bounce buffer at map
time whatever the direction (so a partial device write cannot leak stale
pool contents), back at unmap and ``sync_for_cpu`` for FROM_DEVICE /
BIDIRECTIONAL, and forward again at ``sync_for_device`` for TO_DEVICE /
BIDIRECTIONAL. A driver that skips a sync really sees stale data. An
exhausted pool is a mapping error ("swiotlb buffer is full").
"""

from __future__ import annotations

import logging

from softrdma.dma.errors import DmaApiError
from softrdma.dma.types import DmaDirection
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, PhysAddr
from softrdma.memory.page import GFP_DMA32

log = logging.getLogger("softrdma.dma.swiotlb")

IO_TLB_SHIFT = 11
IO_TLB_SIZE = 1 << IO_TLB_SHIFT
IO_TLB_SEGSIZE = 128
IO_TLB_DEFAULT_SIZE = 64 << 20
_INVALID = -1


class Swiotlb:
    """``struct io_tlb_mem``: one bounce pool of a host."""

    def __init__(self, host: Host, size: int = IO_TLB_DEFAULT_SIZE, *, force: bool = False) -> None:
        nslabs = max(IO_TLB_SEGSIZE, size >> IO_TLB_SHIFT)
        nslabs = (nslabs + IO_TLB_SEGSIZE - 1) // IO_TLB_SEGSIZE * IO_TLB_SEGSIZE
        npages = (nslabs << IO_TLB_SHIFT) >> PAGE_SHIFT
        self.host = host
        self.force = force
        self.nslabs = nslabs
        page = host.alloc_contig_pages(npages, GFP_DMA32, limit=1 << 32, owner="swiotlb")
        self.start = PhysAddr(page.phys)
        self.end = PhysAddr(page.phys + (nslabs << IO_TLB_SHIFT))
        self._orig = [_INVALID] * nslabs  # original phys per slot
        self._alloc_size = [0] * nslabs  # bytes from this slot to the mapping's end
        # Free contiguous slots from here to the segment end (0 = in use).
        self._list = [IO_TLB_SEGSIZE - (i % IO_TLB_SEGSIZE) for i in range(nslabs)]
        self._mapped: dict[int, int] = {}  # first slot -> slots of a live mapping
        self._index = 0
        self.used = 0
        self.used_hiwater = 0
        self.bounced_bytes = 0  # bytes copied either way, for the demo and tests

    def __repr__(self) -> str:
        return f"Swiotlb({self.nslabs} slots at {self.start:#x}, used {self.used})"

    def is_swiotlb_buffer(self, phys: int) -> bool:
        """``is_swiotlb_buffer``."""
        return self.start <= phys < self.end

    @staticmethod
    def max_mapping_size() -> int:
        """``swiotlb_max_mapping_size``: one segment of slots."""
        return IO_TLB_SIZE * IO_TLB_SEGSIZE

    # -- slots -------------------------------------------------------------

    def _find_slots(self, nslots: int, stride: int) -> int | None:
        """``swiotlb_search_pool_area``: first fit from the cursor."""
        n = self.nslabs
        start = (self._index + stride - 1) // stride * stride % n
        i = start
        while True:
            if self._list[i] >= nslots:
                self._index = (i + nslots) % n
                return i
            i = (i + stride) % n
            if i == start:
                return None

    def _take(self, index: int, nslots: int) -> None:
        for i in range(index, index + nslots):
            self._list[i] = 0
        i = index - 1
        while i >= 0 and i % IO_TLB_SEGSIZE != IO_TLB_SEGSIZE - 1 and self._list[i]:
            self._list[i] = index - i
            i -= 1

    def _release(self, index: int, nslots: int) -> None:
        end = index + nslots
        count = self._list[end] if end < self.nslabs and end % IO_TLB_SEGSIZE else 0
        for i in range(end - 1, index - 1, -1):
            count += 1
            self._list[i] = count
            self._orig[i] = _INVALID
            self._alloc_size[i] = 0
        i = index - 1
        while i >= 0 and i % IO_TLB_SEGSIZE != IO_TLB_SEGSIZE - 1 and self._list[i]:
            count += 1
            self._list[i] = count
            i -= 1

    # -- map, unmap, sync ----------------------------------------------------

    def map(self, orig: int, size: int) -> int | None:
        """``swiotlb_tbl_map_single``: a bounce buffer for ``size`` bytes at
        ``orig``, filled with the original's bytes; None when the pool is full."""
        if size <= 0 or size > self.max_mapping_size():
            return None
        nslots = (size + IO_TLB_SIZE - 1) >> IO_TLB_SHIFT
        stride = PAGE_SIZE >> IO_TLB_SHIFT if size >= PAGE_SIZE else 1
        index = self._find_slots(nslots, stride)
        if index is None:
            log.warning(
                "swiotlb buffer is full (sz: %d bytes), total %d (slots), used %d (slots)",
                size,
                self.nslabs,
                self.used,
            )
            return None
        self._take(index, nslots)
        self._mapped[index] = nslots
        for i in range(nslots):
            self._orig[index + i] = orig + (i << IO_TLB_SHIFT)
            self._alloc_size[index + i] = size - (i << IO_TLB_SHIFT)
        self.used += nslots
        self.used_hiwater = max(self.used_hiwater, self.used)
        tlb = self.start + (index << IO_TLB_SHIFT)
        self._bounce(tlb, size, to_device=True)
        return tlb

    def unmap(self, tlb: int, size: int, direction: DmaDirection) -> None:
        """``swiotlb_tbl_unmap_single``: copy back if the device may have
        written, then release the slots."""
        index = self._slot(tlb)
        nslots = self._mapped.pop(index, None) if not tlb & (IO_TLB_SIZE - 1) else None
        if nslots is None:
            raise DmaApiError(f"swiotlb: unmapping {tlb:#x}, which is not the start of a mapping")
        alloc_size = self._alloc_size[index]
        if direction.device_may_write:
            self._bounce(tlb, min(size, alloc_size), to_device=False)
        self._release(index, nslots)
        self.used -= nslots

    def sync_for_device(self, tlb: int, size: int, direction: DmaDirection) -> None:
        """``swiotlb_sync_single_for_device``: refresh the bounce buffer."""
        if direction.device_may_read:
            self._bounce(tlb, size, to_device=True)

    def sync_for_cpu(self, tlb: int, size: int, direction: DmaDirection) -> None:
        """``swiotlb_sync_single_for_cpu``: copy what the device wrote back."""
        if direction.device_may_write:
            self._bounce(tlb, size, to_device=False)

    def _slot(self, tlb: int) -> int:
        if not self.is_swiotlb_buffer(tlb):
            raise DmaApiError(f"swiotlb: {tlb:#x} is not in the bounce pool")
        return (tlb - self.start) >> IO_TLB_SHIFT

    def _bounce(self, tlb: int, size: int, *, to_device: bool) -> None:
        """``swiotlb_bounce``: a CPU copy between original and bounce buffer,
        clamped to the mapping (a sync past its end copies no further)."""
        index = self._slot(tlb)
        orig = self._orig[index]
        if orig == _INVALID:
            raise DmaApiError(f"swiotlb: {tlb:#x} is not mapped")
        offset = tlb & (IO_TLB_SIZE - 1)
        remaining = self._alloc_size[index] - offset
        if size > remaining:
            log.warning(
                "swiotlb: Buffer overflow detected. Allocation size: %d. Mapping size: %d.",
                remaining,
                size,
            )
            size = max(remaining, 0)
        orig += offset
        host = self.host
        if to_device:
            host.cpu_write_phys(tlb, host.cpu_read_phys(orig, size))
        else:
            host.cpu_write_phys(orig, host.cpu_read_phys(tlb, size))
        self.bounced_bytes += size
