"""DMA addresses, directions and masks (``include/linux/dma-direction.h``,
``dma-mapping.h``)."""

from __future__ import annotations

import enum
from typing import NewType

DmaAddr = NewType("DmaAddr", int)
"""A bus / DMA address: what a device is given. Depending on the backend
it is ``phys + bus_offset``, a swiotlb bounce-slot address, an IOVA, or a
kernel virtual address."""

#: ``DMA_MAPPING_ERROR``: the all-ones value a failed mapping returns.
DMA_MAPPING_ERROR = DmaAddr((1 << 64) - 1)


def DMA_BIT_MASK(n: int) -> int:
    """``DMA_BIT_MASK(n)``: the mask of a device that drives ``n`` address bits."""
    return (1 << 64) - 1 if n >= 64 else (1 << n) - 1


class DmaDirection(enum.IntEnum):
    """``enum dma_data_direction``, with the kernel's values."""

    BIDIRECTIONAL = 0
    TO_DEVICE = 1
    FROM_DEVICE = 2
    NONE = 3

    @property
    def kernel_name(self) -> str:
        return "DMA_" + self.name

    @property
    def device_may_read(self) -> bool:
        return self in (DmaDirection.TO_DEVICE, DmaDirection.BIDIRECTIONAL)

    @property
    def device_may_write(self) -> bool:
        return self in (DmaDirection.FROM_DEVICE, DmaDirection.BIDIRECTIONAL)


DMA_BIDIRECTIONAL = DmaDirection.BIDIRECTIONAL
DMA_TO_DEVICE = DmaDirection.TO_DEVICE
DMA_FROM_DEVICE = DmaDirection.FROM_DEVICE
DMA_NONE = DmaDirection.NONE


class DmaBackend(enum.Enum):
    """How a device's DMA addresses reach memory (its ``dma_map_ops``)."""

    DIRECT = "direct"  # dma-direct: bus = phys + offset, swiotlb if needed
    SWIOTLB = "swiotlb"  # dma-direct with every mapping bounced (force_bounce)
    IOMMU = "iommu"  # dma-iommu: IOVAs through an IO page table
    VIRTUAL = "virtual"  # dma_virt_ops: the DMA address is the kernel address


class MapType(enum.Enum):
    """How a DMA mapping was made, as dma-debug names it."""

    SINGLE = "single"
    PAGE = "page"
    SG = "scatter-gather"
    COHERENT = "coherent"
