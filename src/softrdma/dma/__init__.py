"""The DMA-mapping API: bus devices, the direct / swiotlb / IOMMU / virtual
backends, coherent allocations, ``dma_pool`` and the DMA-API debug checker.

Kernel counterparts: ``kernel/dma/``, ``drivers/iommu/``, ``mm/dmapool.c``.
"""

from softrdma.dma.debug import DebugKind, DmaDebug, DmaDebugReport
from softrdma.dma.device import Device
from softrdma.dma.errors import (
    DmaAccessError,
    DmaApiError,
    DmaDebugError,
    DmaError,
    IommuFaultError,
)
from softrdma.dma.iommu import IommuFault
from softrdma.dma.platform import Platform
from softrdma.dma.pool import DmaPool
from softrdma.dma.types import (
    DMA_BIDIRECTIONAL,
    DMA_BIT_MASK,
    DMA_FROM_DEVICE,
    DMA_MAPPING_ERROR,
    DMA_NONE,
    DMA_TO_DEVICE,
    DmaAddr,
    DmaBackend,
    DmaDirection,
)

__all__ = [
    "DMA_BIDIRECTIONAL",
    "DMA_BIT_MASK",
    "DMA_FROM_DEVICE",
    "DMA_MAPPING_ERROR",
    "DMA_NONE",
    "DMA_TO_DEVICE",
    "DebugKind",
    "Device",
    "DmaAccessError",
    "DmaAddr",
    "DmaApiError",
    "DmaBackend",
    "DmaDebug",
    "DmaDebugError",
    "DmaDebugReport",
    "DmaDirection",
    "DmaError",
    "DmaPool",
    "IommuFault",
    "IommuFaultError",
    "Platform",
]
