"""An IOMMU and the DMA API on top of it (``drivers/iommu/dma-iommu.c``,
``drivers/iommu/iommu.c``).

Each device behind the IOMMU gets its own DMA domain: an IOVA allocator
and an IO page table with per-page read / write permission taken from the
mapping's direction (``dma_info_to_prot``: TO_DEVICE is read-only to the
device, FROM_DEVICE write-only). A device access to an IOVA that is not
mapped, or not mapped for that kind of access, is blocked before any byte
moves and recorded in :attr:`Iommu.faults`.

Translations are cached in an IOTLB. In strict mode an unmap invalidates
the IOTLB at once and frees the IOVA; in lazy mode (``iommu.strict=0``,
the flush queue) the page-table entries go at once but the IOTLB is
flushed in batches — when the queue holds ``fq_size`` entries or
``fq_timeout`` seconds have passed — and the IOVAs are reused only after
that. Until then a device can still reach a page through a stale IOTLB
entry: the security trade-off lazy mode makes, observable here.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from softrdma.dma.errors import DmaApiError, IommuFaultError
from softrdma.dma.iova import IovaDomain
from softrdma.dma.ops import (
    DmaOps,
    alloc_coherent_pages,
    arch_sync_dma_for_cpu,
    arch_sync_dma_for_device,
    free_coherent_pages,
)
from softrdma.dma.types import DMA_MAPPING_ERROR, DmaBackend, DmaDirection
from softrdma.memory.layout import PAGE_MASK, PAGE_SHIFT, PAGE_SIZE, BytesLike, VirtAddr, page_align
from softrdma.memory.page import Gfp

if TYPE_CHECKING:
    from softrdma.dma.device import Device
    from softrdma.memory.page import Page
    from softrdma.memory.scatterlist import Scatterlist

IOMMU_READ = 1
IOMMU_WRITE = 2
IOVA_FQ_SIZE = 256
IOVA_FQ_TIMEOUT = 0.010


def dma_info_to_prot(direction: DmaDirection) -> int:
    """``dma_info_to_prot``: IO page permissions for a direction."""
    return {
        DmaDirection.BIDIRECTIONAL: IOMMU_READ | IOMMU_WRITE,
        DmaDirection.TO_DEVICE: IOMMU_READ,
        DmaDirection.FROM_DEVICE: IOMMU_WRITE,
    }.get(direction, 0)


@dataclass(frozen=True)
class IommuFault:
    """One blocked device access (what ``report_iommu_fault`` logs)."""

    device: str
    iova: int
    access: str  # "read" or "write"
    reason: str  # "not mapped" or "no <access> permission"

    def __str__(self) -> str:
        return f"DMAR: [DMA {self.access}] device {self.device} iova {self.iova:#x}: {self.reason}"


class IommuDomain:
    """``struct iommu_domain`` of type DMA: one device's IOVA space."""

    def __init__(self, iommu: Iommu, device: str, dma_mask: int) -> None:
        self.iommu = iommu
        self.device = device
        self.iovad = IovaDomain((dma_mask >> PAGE_SHIFT) + 1)
        self.pgtable: dict[int, int] = {}  # iova pfn -> phys pfn << 2 | prot
        # The IOTLB entries tagged with this domain's ID.
        self.iotlb: OrderedDict[int, int] = OrderedDict()

    def map(self, iova_pfn: int, phys_pfn: int, npages: int, prot: int) -> None:
        """``iommu_map``."""
        table = self.pgtable
        for i in range(npages):
            table[iova_pfn + i] = (phys_pfn + i) << 2 | prot

    def unmap(self, iova_pfn: int) -> int:
        """``__iommu_dma_unmap``: remove an IOVA allocation's page-table
        entries, then flush now (strict) or queue the flush (lazy)."""
        npages = self.iovad.find(iova_pfn)
        if npages is None:
            raise DmaApiError(
                f"{self.device}: unmapping IOVA {iova_pfn << PAGE_SHIFT:#x}, "
                "which is not the start of a mapping"
            )
        table = self.pgtable
        for i in range(npages):
            table.pop(iova_pfn + i, None)
        self.iommu.retire(self, iova_pfn, npages)
        return npages

    def iova_to_phys(self, iova: int) -> int | None:
        """``iommu_iova_to_phys``."""
        pte = self.pgtable.get(iova >> PAGE_SHIFT)
        return None if pte is None else (pte >> 2 << PAGE_SHIFT) | (iova & ~PAGE_MASK)

    def translate(self, iova: int, length: int, write: bool) -> list[tuple[int, int]]:
        """Translate a device access into physical runs, through the IOTLB.
        Every page is checked before the access may proceed."""
        need = IOMMU_WRITE if write else IOMMU_READ
        if self.iommu._fq:
            self.iommu.expire()  # the flush timer may have fired since
        iotlb = self.iotlb
        pgtable = self.pgtable
        first, last = iova >> PAGE_SHIFT, (iova + length - 1) >> PAGE_SHIFT
        # Runs of physically consecutive frames as [first_ppfn, frames].
        runs: list[list[int]] = []
        expect = -1
        for vpfn in range(first, last + 1):
            pte = iotlb.get(vpfn)
            if pte is None:
                pte = pgtable.get(vpfn)
                if pte is not None:
                    iotlb[vpfn] = pte
                    if len(iotlb) > self.iommu.iotlb_entries:
                        iotlb.popitem(last=False)
            if pte is None or not pte & need:
                access = "write" if write else "read"
                reason = "not mapped" if pte is None else f"no {access} permission"
                where = max(iova, vpfn << PAGE_SHIFT)
                raise self.iommu.fault(self.device, where, access, reason)
            ppfn = pte >> 2
            if ppfn == expect:
                runs[-1][1] += 1
            else:
                runs.append([ppfn, 1])
            expect = ppfn + 1
        # Trim the first and last frames to the bytes actually accessed.
        offset = iova & ~PAGE_MASK
        out: list[tuple[int, int]] = []
        remaining = length
        for ppfn, frames in runs:
            chunk = min(remaining, (frames << PAGE_SHIFT) - offset)
            out.append(((ppfn << PAGE_SHIFT) + offset, chunk))
            remaining -= chunk
            offset = 0
        return out


class Iommu:
    """An IOMMU unit: domains, the IOTLB, the flush queue and the fault log."""

    def __init__(
        self,
        *,
        strict: bool = True,
        iotlb_entries: int = 4096,  # per domain
        fq_size: int = IOVA_FQ_SIZE,
        fq_timeout: float = IOVA_FQ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.strict = strict
        self.iotlb_entries = iotlb_entries
        self.fq_size = fq_size
        self.fq_timeout = fq_timeout
        self.clock = clock
        self._domains: list[IommuDomain] = []
        self.faults: list[IommuFault] = []
        self._fq: list[tuple[IommuDomain, int, int]] = []
        self._fq_since = 0.0
        self.iotlb_flushes = 0

    def attach(self, dev: Device) -> IommuDomain:
        """``iommu_attach_device`` to a fresh DMA domain."""
        domain = IommuDomain(self, dev.name, dev.dma_mask)
        self._domains.append(domain)
        return domain

    def detach(self, domain: IommuDomain) -> None:
        """``iommu_detach_device``: the domain goes, with its IOTLB entries."""
        self._fq = [entry for entry in self._fq if entry[0] is not domain]
        self._domains.remove(domain)

    def fault(self, device: str, iova: int, access: str, reason: str) -> IommuFaultError:
        """Record a fault; the error to raise to the device."""
        rec = IommuFault(device, iova, access, reason)
        self.faults.append(rec)
        return IommuFaultError("iova", iova, f"IOMMU blocked {device}'s {access}: {reason}")

    def retire(self, domain: IommuDomain, iova_pfn: int, npages: int) -> None:
        """After the page-table entries are gone: strict mode invalidates
        the IOTLB and frees the IOVA now; lazy mode queues both."""
        if self.strict:
            for i in range(npages):
                domain.iotlb.pop(iova_pfn + i, None)
            domain.iovad.free(iova_pfn)
            return
        now = self.clock()
        if not self._fq:
            self._fq_since = now
        self._fq.append((domain, iova_pfn, npages))
        if len(self._fq) >= self.fq_size or now - self._fq_since >= self.fq_timeout:
            self.flush_iotlb_all()

    def expire(self) -> None:
        """The flush-queue timer (``fq_timer`` → ``fq_flush_timeout``): once
        ``fq_timeout`` has passed since the first queued unmap, the IOTLB is
        flushed whether or not anything else is unmapped. Nothing can see the
        flush before the next translation, so it is done then."""
        if self._fq and self.clock() - self._fq_since >= self.fq_timeout:
            self.flush_iotlb_all()

    def flush_iotlb_all(self) -> None:
        """``iommu_flush_iotlb_all``, then free what the flush queue held
        (``fq_flush_iotlb`` + ``fq_ring_free``)."""
        for domain in self._domains:
            domain.iotlb.clear()
        self.iotlb_flushes += 1
        queued, self._fq = self._fq, []
        for domain, pfn, _ in queued:
            domain.iovad.free(pfn)

    @property
    def pending_flush(self) -> int:
        """IOVA ranges waiting in the flush queue."""
        return len(self._fq)


class IommuOps(DmaOps):
    """``iommu_dma_ops``: streaming and coherent DMA through IOVAs."""

    backend = DmaBackend.IOMMU

    def __init__(self, iommu: Iommu) -> None:
        self.iommu = iommu

    @staticmethod
    def _domain(dev: Device) -> IommuDomain:
        domain = dev.iommu_domain
        if domain is None:
            raise DmaApiError(f"{dev.name} is not attached to an IOMMU domain")
        return domain

    def map_page(
        self, dev: Device, page: Page, offset: int, size: int, direction: DmaDirection
    ) -> int:
        """``iommu_dma_map_page``: whole pages are mapped; the offset is kept."""
        phys = page.phys + offset
        iova_off = phys & ~PAGE_MASK
        npages = page_align(size + iova_off) >> PAGE_SHIFT
        domain = self._domain(dev)
        pfn = domain.iovad.alloc(npages)
        if pfn is None:
            return DMA_MAPPING_ERROR
        domain.map(pfn, phys >> PAGE_SHIFT, npages, dma_info_to_prot(direction))
        if not dev.coherent:
            arch_sync_dma_for_device(dev.host, phys, size, direction)
        return (pfn << PAGE_SHIFT) + iova_off

    def unmap_page(self, dev: Device, dma: int, size: int, direction: DmaDirection) -> None:
        """``iommu_dma_unmap_page``."""
        domain = self._domain(dev)
        phys = domain.iova_to_phys(dma)
        if phys is not None and not dev.coherent:
            arch_sync_dma_for_cpu(dev.host, phys, size, direction)
        domain.unmap(dma >> PAGE_SHIFT)

    def map_sg(self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection) -> int:
        """``iommu_dma_map_sg``: one IOVA range for the whole list, each entry
        mapped into it page-aligned; entries that meet at page boundaries
        merge into one DMA segment (``__finalise_sg``) within
        ``max_seg_size`` and the segment boundary."""
        entries = sgl.entries[:nents]
        spans = [page_align(s.length + (s.phys & ~PAGE_MASK)) for s in entries]
        domain = self._domain(dev)
        base = domain.iovad.alloc(sum(spans) >> PAGE_SHIFT)
        if base is None:
            return 0
        prot = dma_info_to_prot(direction)
        iova = base << PAGE_SHIFT
        segs: list[tuple[int, int]] = []
        for s, span in zip(entries, spans, strict=True):
            phys_page = s.phys & PAGE_MASK
            domain.map(iova >> PAGE_SHIFT, phys_page >> PAGE_SHIFT, span >> PAGE_SHIFT, prot)
            start = iova + (s.phys & ~PAGE_MASK)
            if not dev.coherent:
                arch_sync_dma_for_device(dev.host, s.phys, s.length, direction)
            if segs:
                last_start, last_len = segs[-1]
                merged = start + s.length - last_start
                if (
                    last_start + last_len == start
                    and merged <= dev.max_seg_size
                    and (last_start | dev.seg_boundary_mask)
                    == ((start + s.length - 1) | dev.seg_boundary_mask)
                ):
                    segs[-1] = (last_start, merged)
                    iova += span
                    continue
            segs.append((start, s.length))
            iova += span
        for i, s in enumerate(sgl.entries):
            if i < len(segs):
                s.dma_address, s.dma_length = segs[i]
            else:
                s.dma_address, s.dma_length = None, 0
        return len(segs)

    def unmap_sg(self, dev: Device, sgl: Scatterlist, nents: int, direction: DmaDirection) -> None:
        """``iommu_dma_unmap_sg``: the list's IOVA range goes in one piece."""
        first = sgl.entries[0].dma_address
        if first is None:
            raise DmaApiError(f"{dev.name}: unmap_sg of a list that is not mapped")
        if not dev.coherent:
            for s in sgl.entries[:nents]:
                arch_sync_dma_for_cpu(dev.host, s.phys, s.length, direction)
        self._domain(dev).unmap(first >> PAGE_SHIFT)

    def sync_single_for_cpu(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        if not dev.coherent:
            for phys, length in self._phys_ranges(dev, dma, size):
                arch_sync_dma_for_cpu(dev.host, phys, length, direction)

    def sync_single_for_device(
        self, dev: Device, dma: int, size: int, direction: DmaDirection
    ) -> None:
        if not dev.coherent:
            for phys, length in self._phys_ranges(dev, dma, size):
                arch_sync_dma_for_device(dev.host, phys, length, direction)

    def _phys_ranges(self, dev: Device, dma: int, size: int) -> list[tuple[int, int]]:
        """The physical ranges behind ``size`` bytes at IOVA ``dma``, one per
        IOMMU page: a merged sg segment is contiguous only in IOVA space, so
        each page is synced where it really is (dma-iommu.c
        ``iommu_dma_sync_sg_for_cpu`` syncs each entry's ``sg_phys``)."""
        domain = self._domain(dev)
        ranges = []
        end = dma + size
        while dma < end:
            n = min(end, (dma | (PAGE_SIZE - 1)) + 1) - dma
            phys = domain.iova_to_phys(dma)
            if phys is not None:
                ranges.append((phys, n))
            dma += n
        return ranges

    def release(self, dev: Device) -> None:
        if dev.iommu_domain is not None:
            self.iommu.detach(dev.iommu_domain)

    def alloc(self, dev: Device, size: int, gfp: Gfp) -> tuple[VirtAddr, int] | None:
        """``iommu_dma_alloc``: pages anywhere in lowmem, mapped read-write."""
        host = dev.host
        page = alloc_coherent_pages(host, size, gfp)
        if page is None:
            return None
        npages = page_align(size) >> PAGE_SHIFT
        domain = self._domain(dev)
        pfn = domain.iovad.alloc(npages)
        if pfn is None:
            free_coherent_pages(host, page, size)
            return None
        domain.map(pfn, page.pfn, npages, IOMMU_READ | IOMMU_WRITE)
        if not dev.coherent:
            host.enable_cpu_cache().set_uncached(page.pfn, npages, True)
        host.cpu_write_phys(page.phys, bytes(npages * PAGE_SIZE))
        kva = host.page_address(page)
        assert kva is not None
        return kva, pfn << PAGE_SHIFT

    def free(self, dev: Device, size: int, kva: int, dma: int) -> None:
        host = dev.host
        page = host.virt_to_page(kva)
        self._domain(dev).unmap(dma >> PAGE_SHIFT)
        if not dev.coherent and host.cache is not None:
            host.cache.set_uncached(page.pfn, page_align(size) >> PAGE_SHIFT, False)
        free_coherent_pages(host, page, size)

    def probe(self, dev: Device, dma: int, length: int, write: bool) -> None:
        self._domain(dev).translate(dma, length, write)

    def read(self, dev: Device, dma: int, length: int) -> memoryview:
        host = dev.host
        runs = self._domain(dev).translate(dma, length, write=False)
        if len(runs) == 1:
            return host.bus_read(runs[0][0], length, snoop=dev.coherent)
        return memoryview(b"".join([host.bus_read(p, n, snoop=dev.coherent) for p, n in runs]))

    def write(self, dev: Device, dma: int, data: BytesLike) -> None:
        host = dev.host
        view = memoryview(data).cast("B")
        pos = 0
        for phys, n in self._domain(dev).translate(dma, len(view), write=True):
            host.bus_write(phys, view[pos : pos + n], snoop=dev.coherent)
            pos += n
