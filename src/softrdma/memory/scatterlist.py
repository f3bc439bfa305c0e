"""Scatterlists: memory described as (page, offset, length) entries, with a
DMA address and length per entry once mapped (``include/linux/scatterlist.h``,
``struct scatterlist``, ``struct sg_table``, ``sg_init_one``,
``sg_alloc_table_from_pages``)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from softrdma.memory.errors import KvaError, PhysAddressError
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, PhysAddr, VirtAddr
from softrdma.memory.page import Page


@dataclass(slots=True)
class ScatterlistEntry:
    """``struct scatterlist``: ``length`` bytes at ``offset`` into ``page``
    (and physically contiguous frames after it). ``dma_address`` and
    ``dma_length`` are set by ``dma_map_sg`` (``sg_dma_address``,
    ``sg_dma_len``)."""

    page: Page
    offset: int
    length: int
    dma_address: int | None = None
    dma_length: int = 0

    @property
    def phys(self) -> PhysAddr:
        """``sg_phys``."""
        return PhysAddr(self.page.phys + self.offset)

    def virt(self) -> VirtAddr:
        """``sg_virt``: the kernel address, which highmem pages lack unless kmapped."""
        base = self.page.host.page_address(self.page)
        if base is None:
            raise KvaError(0, f"sg_virt: {self.page} is highmem and not kmapped")
        return VirtAddr(base + self.offset)


class Scatterlist:
    """``struct sg_table``: ``orig_nents`` entries; after mapping, the first
    ``nents`` carry the DMA segments (an IOMMU may merge entries, so
    ``nents`` can be smaller)."""

    def __init__(self, entries: Iterable[ScatterlistEntry]) -> None:
        self.entries = list(entries)
        if not self.entries:
            raise ValueError("a scatterlist needs at least one entry")
        for e in self.entries:
            if e.offset < 0 or e.length <= 0:
                raise ValueError(f"bad scatterlist entry offset={e.offset} length={e.length}")
            e.page.host.check_phys(e.phys, e.length)
        self.nents = 0

    @classmethod
    def from_pages(cls, chunks: Iterable[tuple[Page, int, int]]) -> Scatterlist:
        """``sg_set_page`` for each ``(page, offset, length)``."""
        return cls(ScatterlistEntry(p, off, n) for p, off, n in chunks)

    @classmethod
    def from_buffer(cls, host: Host, kva: int, length: int) -> Scatterlist:
        """A scatterlist for a kernel buffer: one entry for direct-mapped
        memory (``sg_init_one``), one per physically contiguous run for
        vmalloc or kmap memory (``sg_alloc_table_from_pages``)."""
        if length <= 0:
            raise ValueError("length must be positive")
        entries = []
        for phys, n in host.kva_segments(kva, length):
            page = host.phys_to_page(phys)
            entries.append(ScatterlistEntry(page, phys & (PAGE_SIZE - 1), n))
        return cls(entries)

    @property
    def orig_nents(self) -> int:
        return len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[ScatterlistEntry]:
        return iter(self.entries)

    def __getitem__(self, i: int) -> ScatterlistEntry:
        return self.entries[i]

    @property
    def total_length(self) -> int:
        return sum(e.length for e in self.entries)

    def dma_segments(self) -> list[tuple[int, int]]:
        """``for_each_sgtable_dma_sg``: the mapped ``(dma_address, dma_length)``."""
        out = []
        for e in self.entries[: self.nents]:
            if e.dma_address is None:
                raise PhysAddressError(e.phys, "scatterlist entry is not DMA-mapped")
            out.append((e.dma_address, e.dma_length))
        return out

    def pfns(self) -> Iterator[int]:
        """Every frame the list touches."""
        for e in self.entries:
            first = e.phys >> PAGE_SHIFT
            last = (e.phys + e.length - 1) >> PAGE_SHIFT
            yield from range(first, last + 1)
