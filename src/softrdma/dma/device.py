"""A bus device and the DMA-mapping API it offers its driver
(``struct device`` with its DMA fields; ``kernel/dma/mapping.c``).

Every call goes to the device's backend (:class:`~softrdma.dma.ops.DmaOps`)
and, when the device has DMA-API debugging on, through the checker first.
``dma_read`` / ``dma_write`` are the only way a simulated device touches
memory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from softrdma.dma.debug import DmaDebug
from softrdma.dma.errors import DmaApiError
from softrdma.dma.types import DMA_MAPPING_ERROR, DmaAddr, DmaBackend, DmaDirection, MapType
from softrdma.memory.layout import PAGE_MASK, BytesLike, VirtAddr
from softrdma.memory.page import GFP_KERNEL, Gfp

if TYPE_CHECKING:
    from softrdma.dma.iommu import IommuDomain
    from softrdma.dma.ops import DmaOps
    from softrdma.dma.platform import Platform
    from softrdma.memory.host import Host
    from softrdma.memory.page import Page
    from softrdma.memory.scatterlist import Scatterlist


class Device:
    """A DMA-capable device on a platform. Create with
    :meth:`Platform.add_device <softrdma.dma.platform.Platform.add_device>`."""

    def __init__(
        self,
        platform: Platform,
        name: str,
        *,
        ops: DmaOps,
        dma_mask: int,
        coherent_dma_mask: int,
        bus_offset: int,
        coherent: bool,
        max_seg_size: int,
        seg_boundary_mask: int,
        debug: DmaDebug | None,
        driver: str,
    ) -> None:
        self.platform = platform
        self.host: Host = platform.host
        self.name = name
        self.driver = driver
        self.ops = ops
        self.dma_mask = dma_mask
        self.coherent_dma_mask = coherent_dma_mask
        self.bus_offset = bus_offset
        self.coherent = coherent
        self.max_seg_size = max_seg_size
        self.seg_boundary_mask = seg_boundary_mask
        self.iommu_domain: IommuDomain | None = None
        self._debug = debug
        self.released = False

    def __repr__(self) -> str:
        return f"Device({self.name!r}, {self.backend.value}{'' if self.coherent else ', non-coherent'})"

    @property
    def backend(self) -> DmaBackend:
        return self.ops.backend

    @property
    def debug(self) -> DmaDebug | None:
        """The DMA-API debug checker, when on for this device."""
        return self._debug

    def _check(self, direction: DmaDirection, size: int) -> None:
        if self.released:
            raise DmaApiError(f"{self.name} has been released")
        if not isinstance(direction, DmaDirection) or direction == DmaDirection.NONE:
            raise DmaApiError(f"{self.name}: invalid DMA direction {direction!r}")
        if size <= 0:
            raise DmaApiError(f"{self.name}: mapping size must be positive, got {size}")

    # -- streaming mappings -------------------------------------------------

    def map_single(self, kva: int, size: int, direction: DmaDirection) -> DmaAddr:
        """``dma_map_single``: map a direct-mapped kernel buffer. vmalloc and
        other non-linear addresses are refused with ``DMA_MAPPING_ERROR``
        ("rejecting DMA map of vmalloc memory")."""
        self._check(direction, size)
        host = self.host
        if self._debug:
            self._debug.check_map_single(self, kva, size)
        if not (host.virt_addr_valid(kva) and host.virt_addr_valid(kva + size - 1)):
            return DMA_MAPPING_ERROR
        dma = self.ops.map_page(self, host.virt_to_page(kva), kva & ~PAGE_MASK, size, direction)
        if self._debug:
            self._debug.add_mapping(self, MapType.SINGLE, dma, size, direction)
        return DmaAddr(dma)

    def unmap_single(self, dma: int, size: int, direction: DmaDirection) -> None:
        """``dma_unmap_single``."""
        self._unmap(MapType.SINGLE, dma, size, direction)

    def map_page(self, page: Page, offset: int, size: int, direction: DmaDirection) -> DmaAddr:
        """``dma_map_page``: map ``size`` bytes at ``offset`` into ``page``
        (and the physically contiguous pages after it)."""
        self._check(direction, size)
        if page.host is not self.host or offset < 0:
            raise DmaApiError(f"{self.name}: bad page {page} / offset {offset}")
        self.host.check_phys(page.phys + offset, size)
        dma = self.ops.map_page(self, page, offset, size, direction)
        if self._debug:
            self._debug.add_mapping(self, MapType.PAGE, dma, size, direction)
        return DmaAddr(dma)

    def unmap_page(self, dma: int, size: int, direction: DmaDirection) -> None:
        """``dma_unmap_page``."""
        self._unmap(MapType.PAGE, dma, size, direction)

    def _unmap(self, mtype: MapType, dma: int, size: int, direction: DmaDirection) -> None:
        self._check(direction, size)
        if self._debug:
            self._debug.unmap(self, mtype, dma, size, direction)
        if dma == DMA_MAPPING_ERROR:
            raise DmaApiError(f"{self.name}: unmapping DMA_MAPPING_ERROR")
        self.ops.unmap_page(self, dma, size, direction)

    def mapping_error(self, dma: int) -> bool:
        """``dma_mapping_error``: did the mapping fail?"""
        if self._debug:
            self._debug.mapping_error(self, dma)
        return dma == DMA_MAPPING_ERROR

    def map_sg(self, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None) -> int:
        """``dma_map_sg``: map the first ``nents`` entries (all by default);
        returns the number of DMA segments (fewer when an IOMMU merges),
        0 on failure. Unmap with the same list and ``nents``."""
        nents = len(sgl) if nents is None else nents
        self._check(direction, 1)
        if not 0 < nents <= len(sgl):
            raise DmaApiError(f"{self.name}: map_sg of {nents} entries from a list of {len(sgl)}")
        for s in sgl.entries[:nents]:
            if s.page.host is not self.host:
                raise DmaApiError(f"{self.name}: scatterlist page {s.page} is on another host")
        mapped = self.ops.map_sg(self, sgl, nents, direction)
        sgl.nents = mapped
        if self._debug:
            self._debug.map_sg(self, sgl, nents, mapped, direction)
        return mapped

    def unmap_sg(self, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None) -> None:
        """``dma_unmap_sg``: pass the ``nents`` given to :meth:`map_sg`, not
        the count it returned."""
        nents = len(sgl) if nents is None else nents
        self._check(direction, 1)
        if self._debug:
            self._debug.unmap_sg(self, sgl, nents, direction)
        if not sgl.nents:
            raise DmaApiError(f"{self.name}: unmap_sg of a list that is not mapped")
        self.ops.unmap_sg(self, sgl, nents, direction)
        sgl.nents = 0

    # -- ownership transfers -----------------------------------------------

    def sync_single_for_cpu(self, dma: int, size: int, direction: DmaDirection) -> None:
        """``dma_sync_single_for_cpu``: give the buffer back to the CPU."""
        self._check(direction, size)
        if self._debug:
            self._debug.sync(self, dma, size, direction, to_cpu=True)
        self.ops.sync_single_for_cpu(self, dma, size, direction)

    def sync_single_for_device(self, dma: int, size: int, direction: DmaDirection) -> None:
        """``dma_sync_single_for_device``: give the buffer to the device."""
        self._check(direction, size)
        if self._debug:
            self._debug.sync(self, dma, size, direction, to_cpu=False)
        self.ops.sync_single_for_device(self, dma, size, direction)

    def sync_sg_for_cpu(
        self, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None
    ) -> None:
        """``dma_sync_sg_for_cpu``."""
        self._sync_sg(sgl, direction, nents, to_cpu=True)

    def sync_sg_for_device(
        self, sgl: Scatterlist, direction: DmaDirection, nents: int | None = None
    ) -> None:
        """``dma_sync_sg_for_device``."""
        self._sync_sg(sgl, direction, nents, to_cpu=False)

    def _sync_sg(
        self, sgl: Scatterlist, direction: DmaDirection, nents: int | None, to_cpu: bool
    ) -> None:
        nents = len(sgl) if nents is None else nents
        self._check(direction, 1)
        if self._debug:
            self._debug.sync_sg(self, sgl, nents, direction, to_cpu)
        sync = self.ops.sync_single_for_cpu if to_cpu else self.ops.sync_single_for_device
        for dma, length in sgl.dma_segments():
            sync(self, dma, length, direction)

    # -- coherent memory -----------------------------------------------------

    def alloc_coherent(self, size: int, gfp: Gfp = GFP_KERNEL) -> tuple[VirtAddr, DmaAddr] | None:
        """``dma_alloc_coherent``: zeroed memory the CPU and the device see
        alike without syncs; ``(kva, dma)``, or None (the kernel's NULL)."""
        self._check(DmaDirection.BIDIRECTIONAL, size)
        got = self.ops.alloc(self, size, gfp)
        if got is None:
            return None
        kva, dma = got
        if self._debug:
            self._debug.add_mapping(
                self, MapType.COHERENT, dma, size, DmaDirection.BIDIRECTIONAL, kva=kva
            )
        return kva, DmaAddr(dma)

    def free_coherent(self, size: int, kva: int, dma: int) -> None:
        """``dma_free_coherent``."""
        self._check(DmaDirection.BIDIRECTIONAL, size)
        if self._debug:
            self._debug.unmap(
                self, MapType.COHERENT, dma, size, DmaDirection.BIDIRECTIONAL, kva=kva
            )
        self.ops.free(self, size, kva, dma)

    # -- limits ----------------------------------------------------------------

    def get_max_seg_size(self) -> int:
        """``dma_get_max_seg_size``."""
        return self.max_seg_size

    def max_mapping_size(self) -> int:
        """``dma_max_mapping_size``."""
        return self.ops.max_mapping_size(self)

    # -- the device side --------------------------------------------------------

    def dma_read(self, dma: int, length: int) -> memoryview:
        """The device reads ``length`` bytes at a DMA address. The view is
        valid until memory is next written; copy it to keep it."""
        if length <= 0:
            if length < 0:
                raise DmaApiError(f"{self.name}: negative DMA read length {length}")
            return memoryview(b"")
        if self._debug:
            self._debug.device_access(self, dma, length, write=False)
        return self.ops.read(self, dma, length)

    def dma_probe(self, dma: int, length: int, write: bool) -> None:
        """Check that the device can reach ``[dma, dma + length)`` for a
        read or a write, moving no data: an HCA validating a request before
        its first DMA. Raises :class:`DmaAccessError` (an IOMMU records the
        fault). The debug checker looks at the accesses that follow."""
        if length > 0:
            self.ops.probe(self, dma, length, write)

    def dma_write(self, dma: int, data: BytesLike) -> None:
        """The device writes ``data`` at a DMA address."""
        if not len(data):
            return
        if self._debug:
            self._debug.device_access(self, dma, len(data), write=True)
        self.ops.write(self, dma, data)

    # -- teardown ------------------------------------------------------------------

    def release(self) -> None:
        """The driver unbinds: report mappings still live, detach."""
        if self.released:
            return
        if self._debug:
            self._debug.release(self)
        self.ops.release(self)
        self.iommu_domain = None
        self.released = True
