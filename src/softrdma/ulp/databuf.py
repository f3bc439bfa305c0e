"""A target's data buffer for one command: host pages in physically
contiguous chunks in a scatterlist, mapped for the device while RDMA moves
the data (the kernel's ``sgl_alloc_order`` / ``sgl_free_order``, as LIO's
``ib_srpt`` and ``ib_isert`` allocate through the target core)."""

from __future__ import annotations

from dataclasses import dataclass

from softrdma.dma.types import DmaDirection
from softrdma.memory.host import Host
from softrdma.memory.layout import PAGE_SIZE, get_order
from softrdma.memory.page import Page
from softrdma.memory.scatterlist import Scatterlist

__all__ = ["CHUNK_ORDER", "DataBuf"]

CHUNK_ORDER = 4
"""Chunks of at most 64 KiB (order 4): large enough for few SGEs, small
enough for a fragmented host to find."""


@dataclass
class DataBuf:
    """``sgl_alloc_order(length, CHUNK_ORDER)``: ``sgl`` over ``pages``;
    ``direction`` is set while the target has it DMA-mapped."""

    host: Host
    pages: list[tuple[Page, int]]
    sgl: Scatterlist
    length: int
    direction: DmaDirection | None = None

    @classmethod
    def alloc(cls, host: Host, length: int, owner: str) -> DataBuf:
        """Pages for ``length`` bytes, charged to ``owner``."""
        pages: list[tuple[Page, int]] = []
        entries = []
        left = length
        while left > 0:
            order = get_order(min(left, PAGE_SIZE << CHUNK_ORDER))
            page = host.alloc_pages(order, owner=owner)
            n = min(left, PAGE_SIZE << order)
            pages.append((page, order))
            entries.append((page, 0, n))
            left -= n
        return cls(host, pages, Scatterlist.from_pages(entries), length)

    def write(self, data: bytes | memoryview) -> None:
        """Fill it by CPU (before mapping it TO_DEVICE)."""
        pos = 0
        for entry in self.sgl:
            self.host.cpu_write_phys(entry.phys, data[pos : pos + entry.length])
            pos += entry.length

    def read(self) -> bytes:
        """Its contents by CPU (after unmapping a FROM_DEVICE mapping)."""
        return b"".join(bytes(self.host.cpu_read_phys(e.phys, e.length)) for e in self.sgl)

    def free(self) -> None:
        """``sgl_free_order``; idempotent."""
        for page, order in self.pages:
            self.host.free_pages(page, order)
        self.pages = []
