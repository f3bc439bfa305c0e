"""The RDMA core's DMA-mapping wrappers (``include/rdma/ib_verbs.h``).

A consumer maps memory for an RDMA device with these and only these; the
device decides what a "DMA address" is. A hardware HCA passes them through
to its bus device's DMA API (direct, swiotlb or IOMMU). A CPU-copy device
(rxe, siw, rdmavt; ipath in 2006) uses virtual DMA: the address is the
kernel virtual address. softrdma gives a CPU-copy device a bus device with
the virtual backend — the ``dma_virt_ops`` design of Linux 4.11–5.10 — so
the same wrappers, and the DMA-API debug checker, work for it unchanged.

Whatever the address is, it is meaningful to the device that produced it:
it can go into an SGE with ``pd.local_dma_lkey``, into a fast-registration
MR's page list, or into a protocol message with an rkey for a remote peer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.dma.debug import register_api_module
from softrdma.dma.types import DmaAddr, DmaBackend, DmaDirection
from softrdma.memory.layout import VirtAddr
from softrdma.memory.page import GFP_KERNEL, Gfp, Page
from softrdma.memory.scatterlist import Scatterlist

if TYPE_CHECKING:
    from softrdma.verbs.device import IbDevice

# DMA-API debug reports name the caller of these wrappers.
register_api_module(__name__)


def ib_uses_virt_dma(dev: IbDevice) -> bool:
    """``ib_uses_virt_dma``: the device moves data with the CPU, and its DMA
    addresses are kernel virtual addresses."""
    return dev.dma_device.backend == DmaBackend.VIRTUAL


def ib_dma_mapping_error(dev: IbDevice, dma: int) -> bool:
    """``ib_dma_mapping_error``."""
    return dev.dma_device.mapping_error(dma)


def ib_dma_map_single(dev: IbDevice, kva: int, size: int, direction: DmaDirection) -> DmaAddr:
    """``ib_dma_map_single``."""
    return dev.dma_device.map_single(kva, size, direction)


def ib_dma_unmap_single(dev: IbDevice, dma: int, size: int, direction: DmaDirection) -> None:
    """``ib_dma_unmap_single``."""
    dev.dma_device.unmap_single(dma, size, direction)


def ib_dma_map_page(
    dev: IbDevice, page: Page, offset: int, size: int, direction: DmaDirection
) -> DmaAddr:
    """``ib_dma_map_page``."""
    return dev.dma_device.map_page(page, offset, size, direction)


def ib_dma_unmap_page(dev: IbDevice, dma: int, size: int, direction: DmaDirection) -> None:
    """``ib_dma_unmap_page``."""
    dev.dma_device.unmap_page(dma, size, direction)


def ib_dma_map_sg(
    dev: IbDevice, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None
) -> int:
    """``ib_dma_map_sg``: the number of DMA segments (0 on failure)."""
    return dev.dma_device.map_sg(sgl, direction, nents)


def ib_dma_unmap_sg(
    dev: IbDevice, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None
) -> None:
    """``ib_dma_unmap_sg``."""
    dev.dma_device.unmap_sg(sgl, direction, nents)


def ib_dma_sync_single_for_cpu(dev: IbDevice, dma: int, size: int, direction: DmaDirection) -> None:
    """``ib_dma_sync_single_for_cpu``."""
    dev.dma_device.sync_single_for_cpu(dma, size, direction)


def ib_dma_sync_single_for_device(
    dev: IbDevice, dma: int, size: int, direction: DmaDirection
) -> None:
    """``ib_dma_sync_single_for_device``."""
    dev.dma_device.sync_single_for_device(dma, size, direction)


def ib_dma_alloc_coherent(
    dev: IbDevice, size: int, gfp: Gfp = GFP_KERNEL
) -> tuple[VirtAddr, DmaAddr] | None:
    """``ib_dma_alloc_coherent`` (2.6.20–5.10): ``(kva, dma)`` or None."""
    return dev.dma_device.alloc_coherent(size, gfp)


def ib_dma_free_coherent(dev: IbDevice, size: int, kva: int, dma: int) -> None:
    """``ib_dma_free_coherent``."""
    dev.dma_device.free_coherent(size, kva, dma)


def ib_dma_max_seg_size(dev: IbDevice) -> int:
    """``ib_dma_max_seg_size``: 2 GiB for a virtual-DMA device."""
    return dev.dma_device.get_max_seg_size()
