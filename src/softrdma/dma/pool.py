"""DMA pools: small coherent blocks carved from coherent pages
(``mm/dmapool.c``: ``dma_pool_create``, ``dma_pool_alloc``,
``dma_pool_free``, ``dma_pool_destroy``).

Blocks are ``size`` rounded up to ``align`` and never cross a ``boundary``
(a power of two), as hardware descriptor rings require. Free blocks are
reused last-in first-out and pages are kept until the pool is destroyed;
destroying a pool with blocks still allocated is reported
("dma_pool_destroy <name> busy") and its pages are leaked, as in the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

from softrdma.dma.debug import DebugKind
from softrdma.dma.device import Device
from softrdma.dma.types import DmaAddr
from softrdma.memory.errors import BadFreeError, DoubleFreeError, OutOfMemoryError
from softrdma.memory.layout import PAGE_SIZE, VirtAddr
from softrdma.memory.page import GFP_KERNEL, Gfp


@dataclass(slots=True)
class _PoolPage:
    kva: int
    dma: int
    size: int


class DmaPool:
    """``struct dma_pool``."""

    def __init__(
        self, name: str, dev: Device, size: int, align: int = 0, boundary: int = 0
    ) -> None:
        """``dma_pool_create``; invalid parameters raise ``ValueError``
        where the kernel returns NULL."""
        align = align or 1
        if align & (align - 1):
            raise ValueError(f"dma_pool {name}: align {align} is not a power of two")
        if size <= 0:
            raise ValueError(f"dma_pool {name}: size must be positive")
        size = max(size, 8)
        size = (size + align - 1) // align * align
        allocation = max(size, PAGE_SIZE)
        boundary = boundary or allocation
        if boundary < size or boundary & (boundary - 1):
            raise ValueError(f"dma_pool {name}: boundary {boundary} must be a power of two >= size")
        self.name = name
        self.dev = dev
        self.size = size
        self.allocation = allocation
        self.boundary = min(boundary, allocation)
        self._pages: list[_PoolPage] = []
        self._free: list[tuple[int, int]] = []  # (kva, dma), LIFO
        self._busy: dict[int, int] = {}  # kva -> dma
        self._freed: set[int] = set()
        self.destroyed = False

    def _grow(self, gfp: Gfp) -> None:
        got = self.dev.alloc_coherent(self.allocation, gfp)
        if got is None:
            raise OutOfMemoryError(f"dma_pool {self.name}: no coherent memory for a new page")
        kva, dma = got
        self._pages.append(_PoolPage(kva, dma, self.allocation))
        blocks = []
        offset = 0
        while offset + self.size <= self.allocation:
            if offset // self.boundary != (offset + self.size - 1) // self.boundary:
                offset = (offset // self.boundary + 1) * self.boundary  # skip to the next boundary
                continue
            blocks.append((kva + offset, dma + offset))
            offset += self.size
        self._free.extend(reversed(blocks))

    def alloc(self, gfp: Gfp = GFP_KERNEL) -> tuple[VirtAddr, DmaAddr]:
        """``dma_pool_alloc``: a block as ``(kva, dma)`` (zeroed with
        ``Gfp.ZERO``, as ``dma_pool_zalloc``)."""
        if self.destroyed:
            raise BadFreeError(f"dma_pool {self.name}: allocating from a destroyed pool")
        if not self._free:
            self._grow(gfp & ~Gfp.ZERO)
        kva, dma = self._free.pop()
        self._busy[kva] = dma
        self._freed.discard(kva)
        if gfp & Gfp.ZERO:
            self.dev.host.cpu_write(kva, bytes(self.size))
        return VirtAddr(kva), DmaAddr(dma)

    def free(self, kva: int, dma: int) -> None:
        """``dma_pool_free``: both addresses must be those ``alloc`` gave."""
        mapped = self._busy.get(kva)
        if mapped is None:
            if kva in self._freed:
                raise DoubleFreeError(f"dma_pool_free {self.name}, dma {dma:#x} already free")
            raise BadFreeError(f"dma_pool_free {self.name}, {kva:#x}/{dma:#x} (bad vaddr)")
        if mapped != dma:
            raise BadFreeError(f"dma_pool_free {self.name}, {kva:#x}/{dma:#x} (bad dma)")
        del self._busy[kva]
        self._freed.add(kva)
        self._free.append((kva, dma))

    @property
    def busy(self) -> int:
        """Blocks currently allocated."""
        return len(self._busy)

    def destroy(self) -> None:
        """``dma_pool_destroy``: free the pages, or report and leak them if
        blocks are still in use."""
        if self.destroyed:
            return
        self.destroyed = True
        if self._busy:
            self.dev.platform.dma_debug.report(
                self.dev,
                DebugKind.POOL_BUSY,
                f"dma_pool_destroy {self.name} busy [count={len(self._busy)}]",
                count=len(self._busy),
                size=self.size,
            )
            return
        for page in self._pages:
            self.dev.free_coherent(page.size, page.kva, page.dma)
        self._pages.clear()
        self._free.clear()
