"""``struct dma_map_ops``: what a DMA backend provides, and the cache
maintenance hooks non-coherent devices need.

Kernel counterparts: ``include/linux/dma-map-ops.h``,
``arch_sync_dma_for_device`` / ``arch_sync_dma_for_cpu``.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

from softrdma.dma.types import DMA_MAPPING_ERROR, DmaBackend, DmaDirection
from softrdma.memory.errors import OutOfMemoryError
from softrdma.memory.layout import MAX_ORDER, PAGE_SHIFT, BytesLike, VirtAddr, get_order
from softrdma.memory.page import Gfp, Page

if TYPE_CHECKING:
    from softrdma.dma.device import Device
    from softrdma.memory.host import Host
    from softrdma.memory.scatterlist import Scatterlist


def arch_sync_dma_for_device(host: Host, phys: int, size: int, direction: DmaDirection) -> None:
    """Hand a buffer to a non-coherent device: clean the CPU's dirty lines
    to RAM. Where the device may write, leave clean copies in the cache,
    the worst a speculating CPU may do (see :mod:`softrdma.memory.cache`)."""
    cache = host.cache
    if cache is not None:
        cache.clean(phys, size)
        if direction != DmaDirection.TO_DEVICE:
            cache.prefetch(phys, size)


def arch_sync_dma_for_cpu(host: Host, phys: int, size: int, direction: DmaDirection) -> None:
    """Hand a buffer back to the CPU: drop lines the device may have written."""
    cache = host.cache
    if cache is not None and direction != DmaDirection.TO_DEVICE:
        cache.invalidate(phys, size)


class DmaOps(abc.ABC):
    """One backend's implementation of the DMA API for its devices."""

    backend: DmaBackend

    @abc.abstractmethod
    def map_page(
        self, dev: Device, page: Page, offset: int, size: int, direction: DmaDirection
    ) -> int:
        """``map_page``: a DMA address, or ``DMA_MAPPING_ERROR``."""

    @abc.abstractmethod
    def unmap_page(self, dev: Device, dma: int, size: int, direction: DmaDirection) -> None:
        """``unmap_page``."""

    def map_sg(self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection) -> int:
        """``map_sg``: map each entry; all or nothing. Returns the number of
        DMA segments, 0 on failure."""
        done = 0
        for s in sgl.entries[:nents]:
            dma = self.map_page(dev, s.page, s.offset, s.length, direction)
            if dma == DMA_MAPPING_ERROR:
                for undo in sgl.entries[:done]:
                    assert undo.dma_address is not None
                    self.unmap_page(dev, undo.dma_address, undo.dma_length, direction)
                    undo.dma_address = None
                return 0
            s.dma_address, s.dma_length = dma, s.length
            done += 1
        return done

    def unmap_sg(self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection) -> None:
        """``unmap_sg``: undo each mapped segment."""
        for s in sgl.entries[: min(nents, sgl.nents)]:
            if s.dma_address is not None:
                self.unmap_page(dev, s.dma_address, s.dma_length, direction)

    @abc.abstractmethod
    def sync_single_for_cpu(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """``sync_single_for_cpu``."""

    @abc.abstractmethod
    def sync_single_for_device(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """``sync_single_for_device``."""

    @abc.abstractmethod
    def alloc(self, dev: Device, size: int, gfp: Gfp) -> tuple[VirtAddr, int] | None:
        """``alloc``: zeroed coherent memory and its DMA address."""

    @abc.abstractmethod
    def free(self, dev: Device, size: int, kva: int, dma: int) -> None:
        """``free``."""

    @abc.abstractmethod
    def read(self, dev: Device, dma: int, length: int) -> memoryview:
        """The device reads memory at a DMA address (no CPU involved)."""

    @abc.abstractmethod
    def write(self, dev: Device, dma: int, data: BytesLike) -> None:
        """The device writes memory at a DMA address."""

    @abc.abstractmethod
    def probe(self, dev: Device, dma: int, length: int, write: bool) -> None:
        """Raise :class:`DmaAccessError` unless the device could access the
        range (for the IOMMU this is the translation, fault recorded)."""

    def max_mapping_size(self, dev: Device) -> int:
        """``dma_max_mapping_size``."""
        return (1 << 64) - 1

    def release(self, dev: Device) -> None:  # noqa: B027 - optional hook
        """The device goes away (detach from an IOMMU domain, ...)."""


def alloc_coherent_pages(host: Host, size: int, gfp: Gfp) -> Page | None:
    """Physically contiguous, direct-mapped pages for a coherent buffer
    (``dma_direct_alloc``'s page allocation), or None."""
    order = get_order(size)
    try:
        if order <= MAX_ORDER:
            return host.alloc_pages(order, gfp & ~Gfp.HIGHMEM, owner="dma_alloc_coherent")
        count = (size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT
        return host.alloc_contig_pages(count, gfp & ~Gfp.HIGHMEM, owner="dma_alloc_coherent")
    except OutOfMemoryError:
        return None


def free_coherent_pages(host: Host, page: Page, size: int) -> None:
    """Free what :func:`alloc_coherent_pages` returned for ``size`` bytes."""
    order = get_order(size)
    if order <= MAX_ORDER:
        host.free_pages(page, order)
    else:
        host.free_contig_pages(page, (size + (1 << PAGE_SHIFT) - 1) >> PAGE_SHIFT)
