"""A platform: how a host's devices reach its memory — the swiotlb pool,
an IOMMU, and the DMA-API debug checker, set up as the kernel's boot
options would (``swiotlb=``, ``swiotlb=force``, ``iommu=``,
``iommu.strict=``, ``dma_debug``).

Each device picks a backend (its ``dma_map_ops``): by default IOMMU when
the platform has one, swiotlb when bouncing is forced, else direct.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from softrdma.dma.debug import DmaDebug
from softrdma.dma.device import Device
from softrdma.dma.direct import DirectOps
from softrdma.dma.iommu import Iommu, IommuOps
from softrdma.dma.ops import DmaOps
from softrdma.dma.swiotlb import IO_TLB_DEFAULT_SIZE, IO_TLB_SEGSIZE, IO_TLB_SIZE, Swiotlb
from softrdma.dma.types import DMA_BIT_MASK, DmaBackend
from softrdma.dma.virt import VirtOps
from softrdma.memory.host import Host
from softrdma.memory.page import Zone

#: ``swiotlb_size`` default: the kernel's 64 MiB, capped at an eighth of ZONE_DMA32.
AUTO = -1


class Platform:
    """The DMA side of one host."""

    def __init__(
        self,
        host: Host,
        *,
        swiotlb_size: int | None = AUTO,
        swiotlb_force: bool = False,
        iommu: bool = False,
        iommu_strict: bool = True,
        dma_debug: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.host = host
        if swiotlb_size == AUTO:
            zone = host.zone_range(Zone.DMA32)
            dma32 = 0 if zone is None else zone[1] - zone[0]
            segment = IO_TLB_SIZE * IO_TLB_SEGSIZE
            swiotlb_size = max(segment, min(IO_TLB_DEFAULT_SIZE, dma32 // 8) // segment * segment)
        self.swiotlb = Swiotlb(host, swiotlb_size, force=swiotlb_force) if swiotlb_size else None
        if swiotlb_force and self.swiotlb is None:
            raise ValueError("swiotlb_force needs a swiotlb pool")
        self.iommu = Iommu(strict=iommu_strict, clock=clock) if iommu else None
        self.dma_debug = DmaDebug()
        """The DMA-API debug checker: ``reports``, ``strict()``, ``capture()``."""
        self.dma_debug_default = dma_debug
        self.devices: list[Device] = []
        self._ops: dict[DmaBackend, DmaOps] = {DmaBackend.VIRTUAL: VirtOps()}
        if self.swiotlb is not None:
            self._ops[DmaBackend.SWIOTLB] = DirectOps(self.swiotlb, force_bounce=True)
        self._ops[DmaBackend.DIRECT] = DirectOps(self.swiotlb, force_bounce=swiotlb_force)
        if self.iommu is not None:
            self._ops[DmaBackend.IOMMU] = IommuOps(self.iommu)

    def __repr__(self) -> str:
        parts = [repr(self.host)]
        if self.iommu:
            parts.append(f"iommu={'strict' if self.iommu.strict else 'lazy'}")
        if self.swiotlb:
            parts.append(
                f"swiotlb={self.swiotlb.nslabs} slots{' force' if self.swiotlb.force else ''}"
            )
        return f"Platform({', '.join(parts)})"

    @property
    def default_backend(self) -> DmaBackend:
        if self.iommu is not None:
            return DmaBackend.IOMMU
        if self.swiotlb is not None and self.swiotlb.force:
            return DmaBackend.SWIOTLB
        return DmaBackend.DIRECT

    def add_device(
        self,
        name: str,
        *,
        backend: DmaBackend | None = None,
        dma_mask: int = DMA_BIT_MASK(64),
        coherent_dma_mask: int | None = None,
        bus_offset: int = 0,
        coherent: bool = True,
        max_seg_size: int = 65536,
        seg_boundary_mask: int = DMA_BIT_MASK(32),
        debug: bool | None = None,
        driver: str = "softrdma",
    ) -> Device:
        """Probe a device: ``dma_set_mask_and_coherent``,
        ``dma_set_max_seg_size``, attach to the IOMMU if it goes through one."""
        backend = self.default_backend if backend is None else backend
        ops = self._ops.get(backend)
        if ops is None:
            raise ValueError(
                f"{backend.value} backend needs the platform to have "
                f"{'an IOMMU' if backend == DmaBackend.IOMMU else 'a swiotlb pool'}"
            )
        if not 0 < dma_mask <= DMA_BIT_MASK(64) or bus_offset < 0:
            raise ValueError("bad dma_mask or bus_offset")
        debug = self.dma_debug_default if debug is None else debug
        dev = Device(
            self,
            name,
            ops=ops,
            dma_mask=dma_mask,
            coherent_dma_mask=dma_mask if coherent_dma_mask is None else coherent_dma_mask,
            bus_offset=bus_offset,
            coherent=coherent or backend == DmaBackend.VIRTUAL,
            max_seg_size=max_seg_size,
            seg_boundary_mask=seg_boundary_mask,
            debug=self.dma_debug if debug else None,
            driver=driver,
        )
        if backend == DmaBackend.IOMMU:
            assert self.iommu is not None
            dev.iommu_domain = self.iommu.attach(dev)
        if not dev.coherent:
            self.host.enable_cpu_cache()
        self.devices.append(dev)
        return dev
