"""User memory registered for RDMA (``struct ib_umem``; ``ib_umem_get``,
``ib_umem_release``, ``ib_umem_offset``) and the user MR built on it (the
``reg_user_mr`` / ``rereg_user_mr`` / ``dereg_mr`` path of
``ibv_reg_mr``, ``ibv_rereg_mr``, ``ibv_dereg_mr``).

``ib_umem_get`` pins the pages behind a user range, builds a scatterlist
of whole pages (physically contiguous pages coalesced up to the device's
segment limit, as ``sg_alloc_append_table_from_pages`` does) and maps it
for the device with ``ib_dma_map_sg`` — so a device behind an IOMMU gets
IOVAs, a bounce-buffer platform bounces, a CPU-copy device gets kernel
addresses, and the DMA-API debug checker tracks the mapping until
``ib_umem_release``. The MR's page list holds those DMA addresses; its
iova is the user virtual address, which is what an rkey is paired with on
the wire.

Kernel counterparts: ``drivers/infiniband/core/umem.c``,
``drivers/infiniband/core/uverbs_cmd.c`` (``ib_uverbs_reg_mr``),
rxe's ``rxe_mr_init_user``.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE
from softrdma.memory.mm import MmStruct, VmError
from softrdma.memory.page import Page
from softrdma.memory.scatterlist import Scatterlist, ScatterlistEntry
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_map_sg, ib_dma_max_seg_size, ib_dma_unmap_sg
from softrdma.verbs.enums import IbAccess, IbMrType
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, MrState, ib_check_mr_access
from softrdma.verbs.pd import ProtectionDomain

__all__ = [
    "IbUmem",
    "ib_dereg_user_mr",
    "ib_reg_user_mr",
    "ib_rereg_user_mr",
    "ib_umem_get",
    "ib_umem_release",
]


@dataclass(eq=False)
class IbUmem:
    """``struct ib_umem``: ``length`` bytes at user address ``address`` of
    ``mm``, pinned (``pages``) and mapped for ``device`` (``sgt``)."""

    device: IbDevice
    mm: MmStruct
    address: int
    length: int
    writable: bool
    pages: list[Page]
    sgt: Scatterlist
    nmap: int
    released: bool = field(default=False)

    @property
    def offset(self) -> int:
        """``ib_umem_offset``: where the range starts in its first page."""
        return self.address & (PAGE_SIZE - 1)

    @property
    def npages(self) -> int:
        return len(self.pages)

    def dma_segments(self) -> list[tuple[int, int]]:
        """The mapped ``(dma_address, dma_length)`` segments."""
        return self.sgt.dma_segments()

    def sync_for_cpu(self) -> None:
        """``ib_dma_sync_sg_for_cpu`` over the whole umem: on a bounce
        platform, the device's writes reach the user pages."""
        self.device.dma_device.sync_sg_for_cpu(self.sgt, DMA_BIDIRECTIONAL)

    def sync_for_device(self) -> None:
        """``ib_dma_sync_sg_for_device``: the CPU's writes reach the device."""
        self.device.dma_device.sync_sg_for_device(self.sgt, DMA_BIDIRECTIONAL)


def ib_umem_get(device: IbDevice, mm: MmStruct, addr: int, size: int, access: IbAccess) -> IbUmem:
    """``ib_umem_get``: pin and DMA-map ``size`` bytes at user address
    ``addr``. Raises :class:`VerbsError`: ``EINVAL`` for an empty or
    wrapping range, ``EFAULT`` when a page is not mapped, ``ENOMEM`` when
    the mapping fails (IOVA space or bounce slots exhausted)."""
    if size <= 0 or addr < 0 or addr + size < addr:
        raise VerbsError(errno.EINVAL, f"umem of {size} bytes at {addr:#x}")
    first = addr & ~(PAGE_SIZE - 1)
    npages = (addr + size - first + PAGE_SIZE - 1) >> PAGE_SHIFT
    try:
        pages = mm.pin_user_pages(first, npages)
    except VmError as e:
        raise VerbsError(e.errno, f"ib_umem_get: {e}") from e
    # whole pages; physically contiguous ones in one entry, up to what one
    # DMA segment and one mapping may hold
    limit = min(ib_dma_max_seg_size(device), device.dma_device.max_mapping_size())
    limit = max(PAGE_SIZE, limit & ~(PAGE_SIZE - 1))
    entries: list[ScatterlistEntry] = []
    for page in pages:
        last = entries[-1] if entries else None
        if (
            last is not None
            and last.page.pfn + (last.length >> PAGE_SHIFT) == page.pfn
            and last.length + PAGE_SIZE <= limit
        ):
            last.length += PAGE_SIZE
        else:
            entries.append(ScatterlistEntry(page, 0, PAGE_SIZE))
    sgt = Scatterlist(entries)
    nmap = ib_dma_map_sg(device, sgt, DMA_BIDIRECTIONAL)
    if nmap <= 0:
        mm.unpin_user_pages(pages)
        raise VerbsError(errno.ENOMEM, f"ib_umem_get: DMA mapping of {npages} pages failed")
    writable = bool(access & (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE))
    return IbUmem(device, mm, addr, size, writable, pages, sgt, nmap)


def ib_umem_release(umem: IbUmem) -> None:
    """``ib_umem_release``: unmap and unpin (idempotent)."""
    if umem.released:
        return
    umem.released = True
    ib_dma_unmap_sg(umem.device, umem.sgt, DMA_BIDIRECTIONAL)
    umem.mm.unpin_user_pages(umem.pages)


def _map_umem(mr: MemoryRegion, umem: IbUmem, iova: int) -> None:
    """Point ``mr`` at ``umem``: its page list from the DMA segments, its
    iova the user's (``rxe_mr_fill_pages_from_sgt``)."""
    mapped = mr.map_sg(umem.sgt, page_size=PAGE_SIZE)
    if mapped != umem.nmap:
        raise VerbsError(errno.EINVAL, "umem DMA segments do not form a page list")
    mr.iova = iova
    mr.length = umem.length


def ib_reg_user_mr(pd: ProtectionDomain, umem: IbUmem, iova: int, access: IbAccess) -> MemoryRegion:
    """``ib_uverbs_reg_mr`` → ``ops.reg_user_mr``: a valid MR over ``umem``
    whose iova is ``iova`` (the user address, or another start with
    ``ibv_reg_mr_iova``). Raises :class:`VerbsError` (``EINVAL`` for bad
    access flags or a umem of another device, ``ENOMEM`` past ``max_mr``)."""
    device = pd.device
    ib_check_mr_access(access)
    if umem.device is not device or umem.released:
        raise VerbsError(errno.EINVAL, "umem of another device, or released")
    if access & (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE) and not umem.writable:
        raise VerbsError(errno.EFAULT, "writable MR over a read-only umem")
    with device.lock:
        if pd.deallocated:
            raise VerbsError(errno.EINVAL, "PD is deallocated")
        if len(device.mr_table) >= device.attrs.max_mr:
            raise VerbsError(errno.ENOMEM, "max_mr reached")
        mr = device.mr_table.add(pd, IbMrType.MEM_REG, access, max_num_sg=umem.npages)
        try:
            _map_umem(mr, umem, iova)
        except VerbsError:
            device.mr_table.remove(mr)
            raise
        mr.state = MrState.VALID
        pd.usecnt += 1
    return mr


def ib_rereg_user_mr(
    mr: MemoryRegion,
    *,
    pd: ProtectionDomain | None = None,
    access: IbAccess | None = None,
    umem: IbUmem | None = None,
    iova: int | None = None,
) -> None:
    """``ops.rereg_user_mr`` in place: a new PD, new access flags and / or a
    new translation (``umem`` with its ``iova``); the keys stay. The caller
    releases the old umem after a new one is in place."""
    device = mr.device
    if access is not None:
        ib_check_mr_access(access)
    with device.lock:
        if mr.deregistered:
            raise VerbsError(errno.EINVAL, f"MR {mr.lkey:#x} is deregistered")
        if pd is not None and pd is not mr.pd:
            if pd.device is not device or pd.deallocated:
                raise VerbsError(errno.EINVAL, "PD of another device, or deallocated")
            mr.pd.usecnt -= 1
            pd.usecnt += 1
            mr.pd = pd
        if access is not None:
            mr.access = access
        if umem is not None:
            mr.state = MrState.FREE  # map_sg wants an MR that is not valid
            mr.max_num_sg = umem.npages
            try:
                _map_umem(mr, umem, umem.address if iova is None else iova)
            finally:
                mr.state = MrState.VALID


def ib_dereg_user_mr(mr: MemoryRegion, umem: IbUmem) -> None:
    """``ib_dereg_mr`` of a user MR: the key stops working, then the umem
    is unmapped and unpinned."""
    mr.device.dereg_mr(mr)
    ib_umem_release(umem)
