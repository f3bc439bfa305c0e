"""The DMA-mapping API: bus devices, the direct / swiotlb / IOMMU / virtual
backends, coherent allocations, ``dma_pool`` and the DMA-API debug checker.

Kernel counterparts: ``kernel/dma/``, ``drivers/iommu/``, ``mm/dmapool.c``.
"""
