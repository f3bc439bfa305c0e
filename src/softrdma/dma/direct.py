"""dma-direct: bus address = physical address + bus offset, with swiotlb
for what the device cannot reach or when every mapping must bounce
(``kernel/dma/direct.c``, ``direct.h``, ``include/linux/dma-direct.h``)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from softrdma.dma.errors import DmaAccessError
from softrdma.dma.ops import (
    DmaOps,
    alloc_coherent_pages,
    arch_sync_dma_for_cpu,
    arch_sync_dma_for_device,
    free_coherent_pages,
)
from softrdma.dma.swiotlb import Swiotlb
from softrdma.dma.types import DMA_BIT_MASK, DMA_MAPPING_ERROR, DmaBackend, DmaDirection
from softrdma.memory.errors import PhysAddressError
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE, BytesLike, VirtAddr
from softrdma.memory.page import GFP_DMA32, Gfp

if TYPE_CHECKING:
    from softrdma.dma.device import Device
    from softrdma.memory.page import Page

log = logging.getLogger("softrdma.dma.direct")


class DirectOps(DmaOps):
    """The DMA API of a device without an IOMMU in its path.

    ``force_bounce`` is swiotlb's ``force`` (``swiotlb=force``, or a
    per-device restricted pool / confidential-computing guest): every
    streaming mapping goes through a bounce buffer.
    """

    def __init__(self, swiotlb: Swiotlb | None, force_bounce: bool) -> None:
        if force_bounce and swiotlb is None:
            raise ValueError("forced bouncing needs a swiotlb pool")
        self.swiotlb = swiotlb
        self.force_bounce = force_bounce
        self.backend = DmaBackend.SWIOTLB if force_bounce else DmaBackend.DIRECT

    @staticmethod
    def dma_capable(dev: Device, dma: int, size: int) -> bool:
        """``dma_capable``: the device can drive every address of the range."""
        return dma + size - 1 <= dev.dma_mask

    def map_page(
        self, dev: Device, page: Page, offset: int, size: int, direction: DmaDirection
    ) -> int:
        """``dma_direct_map_page``."""
        phys = page.phys + offset
        dma = phys + dev.bus_offset
        if self.force_bounce or not self.dma_capable(dev, dma, size):
            return self._swiotlb_map(dev, phys, size, direction)
        if not dev.coherent:
            arch_sync_dma_for_device(dev.host, phys, size, direction)
        return dma

    def _swiotlb_map(self, dev: Device, phys: int, size: int, direction: DmaDirection) -> int:
        """``swiotlb_map``."""
        if self.swiotlb is None:
            log.warning(
                "%s: DMA addr %#x+%d overflow (mask %#x, bus limit 0)",
                dev.name,
                phys + dev.bus_offset,
                size,
                dev.dma_mask,
            )
            return DMA_MAPPING_ERROR
        tlb = self.swiotlb.map(phys, size)
        if tlb is None:
            return DMA_MAPPING_ERROR
        dma = tlb + dev.bus_offset
        if not self.dma_capable(dev, dma, size):
            log.warning(
                "%s: swiotlb addr %#x+%d overflow (mask %#x)", dev.name, dma, size, dev.dma_mask
            )
            self.swiotlb.unmap(tlb, size, DmaDirection.TO_DEVICE)
            return DMA_MAPPING_ERROR
        if not dev.coherent:
            arch_sync_dma_for_device(dev.host, tlb, size, direction)
        return dma

    def _bounce_pool(self, phys: int) -> Swiotlb | None:
        pool = self.swiotlb
        return pool if pool is not None and pool.is_swiotlb_buffer(phys) else None

    def unmap_page(self, dev: Device, dma: int, size: int, direction: DmaDirection) -> None:
        """``dma_direct_unmap_page``."""
        phys = dma - dev.bus_offset
        if not dev.coherent:
            arch_sync_dma_for_cpu(dev.host, phys, size, direction)
        pool = self._bounce_pool(phys)
        if pool is not None:
            pool.unmap(phys, size, direction)

    def sync_single_for_cpu(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """``dma_direct_sync_single_for_cpu``."""
        phys = dma - dev.bus_offset
        if not dev.coherent:
            arch_sync_dma_for_cpu(dev.host, phys, size, direction)
        pool = self._bounce_pool(phys)
        if pool is not None:
            pool.sync_for_cpu(phys, size, direction)

    def sync_single_for_device(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """``dma_direct_sync_single_for_device``."""
        phys = dma - dev.bus_offset
        pool = self._bounce_pool(phys)
        if pool is not None:
            pool.sync_for_device(phys, size, direction)
        if not dev.coherent:
            arch_sync_dma_for_device(dev.host, phys, size, direction)

    def alloc(self, dev: Device, size: int, gfp: Gfp) -> tuple[VirtAddr, int] | None:
        """``dma_direct_alloc``: zone from the coherent mask, zeroed, mapped
        uncached for a non-coherent device."""
        host = dev.host
        tries = [GFP_DMA32] if dev.coherent_dma_mask <= DMA_BIT_MASK(32) else [gfp, GFP_DMA32]
        for flags in tries:
            page = alloc_coherent_pages(host, size, flags)
            if page is None:
                continue
            dma = page.phys + dev.bus_offset
            if dma + size - 1 <= dev.coherent_dma_mask:
                return self._prepare(dev, page, size), dma
            free_coherent_pages(host, page, size)
        return None

    @staticmethod
    def _prepare(dev: Device, page: Page, size: int) -> VirtAddr:
        host = dev.host
        npages = (size + PAGE_SIZE - 1) >> PAGE_SHIFT
        if not dev.coherent:
            host.enable_cpu_cache().set_uncached(page.pfn, npages, True)
        host.cpu_write_phys(page.phys, bytes(npages * PAGE_SIZE))
        kva = host.page_address(page)
        assert kva is not None
        return kva

    def free(self, dev: Device, size: int, kva: int, dma: int) -> None:
        """``dma_direct_free``."""
        host = dev.host
        page = host.virt_to_page(kva)
        if not dev.coherent and host.cache is not None:
            host.cache.set_uncached(page.pfn, (size + PAGE_SIZE - 1) >> PAGE_SHIFT, False)
        free_coherent_pages(host, page, size)

    def _phys(self, dev: Device, dma: int, length: int) -> int:
        if dma < dev.bus_offset or not self.dma_capable(dev, dma, length):
            raise DmaAccessError(
                "dma", dma, f"{dev.name} cannot address +{length:#x} (mask {dev.dma_mask:#x})"
            )
        phys = dma - dev.bus_offset
        try:
            dev.host.check_phys(phys, length)
        except PhysAddressError as e:
            raise DmaAccessError("dma", dma, f"bus error: {e}") from e
        return phys

    def probe(self, dev: Device, dma: int, length: int, write: bool) -> None:
        self._phys(dev, dma, length)

    def read(self, dev: Device, dma: int, length: int) -> memoryview:
        return dev.host.bus_read(self._phys(dev, dma, length), length, snoop=dev.coherent)

    def write(self, dev: Device, dma: int, data: BytesLike) -> None:
        dev.host.bus_write(self._phys(dev, dma, len(data)), data, snoop=dev.coherent)

    def max_mapping_size(self, dev: Device) -> int:
        """``dma_direct_max_mapping_size``: swiotlb's limit where it may bounce."""
        if self.swiotlb is not None and (
            self.force_bounce or dev.dma_mask < dev.host.mem_size + dev.bus_offset - 1
        ):
            return Swiotlb.max_mapping_size()
        return (1 << 64) - 1
