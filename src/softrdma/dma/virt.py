"""Virtual DMA: the DMA address is the kernel virtual address and the
device reaches memory through the CPU's page tables — the model of
CPU-copy RDMA devices (ipath in 2006, rxe / siw / rdmavt today).

Kernel counterparts: ``kernel/dma/virt.c`` (``dma_virt_ops``, 4.11-5.10),
``drivers/infiniband/hw/ipath/ipath_dma.c``, ``ib_uses_virt_dma``.

Highmem pages have no permanent kernel address. ipath returned
``BAD_DMA_ADDRESS`` for them and ``dma_virt_ops`` used ``page_address``
(NULL); this backend instead ``kmap``s the page for the life of the
mapping, so one driver code path works for every page. The cost is the
one Roland Dreier named: a kmap slot is held while the device owns the
page. A highmem mapping must therefore fit in its page, and when the
kmap window is full the mapping fails with ``DMA_MAPPING_ERROR``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.dma.errors import DmaAccessError, DmaApiError
from softrdma.dma.ops import DmaOps, alloc_coherent_pages, free_coherent_pages
from softrdma.dma.types import DMA_MAPPING_ERROR, DmaBackend, DmaDirection
from softrdma.memory.errors import KvaError, OutOfMemoryError
from softrdma.memory.layout import PAGE_OFFSET, PAGE_SHIFT, PAGE_SIZE, BytesLike, VirtAddr
from softrdma.memory.page import Gfp

if TYPE_CHECKING:
    from softrdma.dma.device import Device
    from softrdma.memory.page import Page


class VirtOps(DmaOps):
    """``dma_virt_ops``: no translation, no bouncing, nothing to sync."""

    backend = DmaBackend.VIRTUAL

    def map_page(
        self, dev: Device, page: Page, offset: int, size: int, direction: DmaDirection
    ) -> int:
        host = dev.host
        if not page.is_highmem:
            base = host.page_address(page)
            assert base is not None
            return base + offset
        if offset + size > PAGE_SIZE:
            return DMA_MAPPING_ERROR
        try:
            return host.kmap(page) + offset
        except OutOfMemoryError:
            return DMA_MAPPING_ERROR

    def unmap_page(self, dev: Device, dma: int, size: int, direction: DmaDirection) -> None:
        host = dev.host
        if host.pkmap.contains(dma):
            pfn = host.pkmap.translate(dma)
            if pfn is None:
                raise DmaApiError(
                    f"{dev.name}: unmapping kmap address {dma:#x}, which is not mapped"
                )
            host.kunmap(host.pfn_to_page(pfn))

    def sync_single_for_cpu(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """Nothing to do: the device is the CPU."""

    def sync_single_for_device(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        """Nothing to do: the device is the CPU."""

    def alloc(self, dev: Device, size: int, gfp: Gfp) -> tuple[VirtAddr, int] | None:
        page = alloc_coherent_pages(dev.host, size, gfp | Gfp.ZERO)
        if page is None:
            return None
        kva = dev.host.page_address(page)
        assert kva is not None
        return kva, kva

    def free(self, dev: Device, size: int, kva: int, dma: int) -> None:
        free_coherent_pages(dev.host, dev.host.virt_to_page(kva), size)

    def probe(self, dev: Device, dma: int, length: int, write: bool) -> None:
        host = dev.host
        phys = dma - PAGE_OFFSET
        if phys >= 0 and phys + length <= host.lowmem_pfn << PAGE_SHIFT:
            return  # the direct map: every lowmem page is there
        try:
            host.kva_segments(dma, length)
        except KvaError as e:
            raise DmaAccessError("dma", dma, f"{dev.name}: {e.why}") from e

    def read(self, dev: Device, dma: int, length: int) -> memoryview:
        try:
            return dev.host.cpu_read(dma, length)
        except KvaError as e:
            raise DmaAccessError("dma", dma, f"{dev.name}: {e.why}") from e

    def write(self, dev: Device, dma: int, data: BytesLike) -> None:
        host = dev.host
        # Fault before writing anything; the direct map (lowmem) cannot
        # fault, so a write inside it needs no page walk first.
        n = len(data)
        phys = dma - PAGE_OFFSET
        if not (phys >= 0 and phys + n <= host.lowmem_pfn << PAGE_SHIFT):
            self.probe(dev, dma, n, True)
        host.cpu_write(dma, data)
