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

A device in a confidential-computing guest whose DMA is forced through
swiotlb (``ib_device.cc_dma_bounce``) cannot work on pinned private
memory: the device would keep using the bounce slots while the process
works on its own pages. ``ib_umem_get`` refuses there (``EOPNOTSUPP``);
such a device registers dma-buf memory of the shared heap instead
(:func:`ib_umem_dmabuf_get`), which it reaches without bouncing.

An on-demand-paging umem (:func:`ib_umem_odp_get`, ``ib_umem_odp``)
pins nothing: the MR's page list starts empty, and the device's first
access to a page faults it in (``ib_umem_odp_map_dma_and_lock``: the
frame the process has there now, DMA-mapped); an MMU notifier unmaps a
page the process unmaps, so the next access faults again — and finds
nothing, which the device reports as an access error.
:func:`ib_umem_odp_prefetch` maps ahead (``ibv_advise_mr``). An implicit
ODP umem (:func:`ib_umem_odp_alloc_implicit`) is the same over the whole
address space, its page list sparse.

Kernel counterparts: ``drivers/infiniband/core/umem.c``,
``drivers/infiniband/core/uverbs_cmd.c`` (``ib_uverbs_reg_mr``),
rxe's ``rxe_mr_init_user``.
"""

from __future__ import annotations

import errno
import itertools
import operator
import weakref
from dataclasses import dataclass, field
from typing import SupportsIndex, overload

from softrdma.dma.types import DMA_BIDIRECTIONAL, DmaBackend
from softrdma.memory.layout import PAGE_SHIFT, PAGE_SIZE
from softrdma.memory.mm import TASK_SIZE, MmStruct, VmError
from softrdma.memory.page import Page
from softrdma.memory.scatterlist import Scatterlist, ScatterlistEntry
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import (
    ib_dma_map_page,
    ib_dma_map_sg,
    ib_dma_mapping_error,
    ib_dma_max_seg_size,
    ib_dma_unmap_page,
    ib_dma_unmap_sg,
)
from softrdma.verbs.enums import IbAccess, IbMrType
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, MrState, ib_check_mr_access
from softrdma.verbs.pd import ProtectionDomain

__all__ = [
    "IMPLICIT_ODP_LENGTH",
    "IbUmem",
    "ib_dereg_user_mr",
    "ib_device_cc_dma_bounce",
    "ib_device_set_cc_dma_bounce",
    "ib_reg_user_mr",
    "ib_rereg_user_mr",
    "ib_umem_dmabuf_get",
    "ib_umem_get",
    "ib_umem_odp_alloc_implicit",
    "ib_umem_odp_get",
    "ib_umem_odp_prefetch",
    "ib_umem_release",
]


#: The MR page-list entry of a page the device has not faulted in.
ODP_NOT_PRESENT = -1
#: The DMA address a fault that finds no page gives: every device access
#: to it fails, which the device reports as an access error.
ODP_FAULT_DMA = (1 << 64) - PAGE_SIZE
#: The length of an implicit ODP MR (``U64_MAX``: ``ibv_reg_mr``'s ``SIZE_MAX``).
IMPLICIT_ODP_LENGTH = (1 << 64) - 1
#: ``ibv_sge.length`` is 32 bits: the most one prefetch SGE asks for.
_MAX_SGE_LENGTH = (1 << 32) - 1


class OdpPageList(list[int]):
    """The page list of an ODP MR: reading an entry the device has not
    mapped is the device's page fault (the page is faulted in then). The
    entries are kept sparse (``present``): an implicit MR spans the whole
    address space, far more pages than a list could hold."""

    def __init__(self, odp: OdpMap) -> None:
        super().__init__()
        self.odp = odp
        self.present: dict[int, int] = {}
        """Page index -> DMA address of the pages mapped now."""

    def __len__(self) -> int:
        return self.odp.npages

    @overload
    def __getitem__(self, i: SupportsIndex) -> int: ...
    @overload
    def __getitem__(self, i: slice) -> list[int]: ...
    def __getitem__(self, i: SupportsIndex | slice) -> int | list[int]:
        if isinstance(i, slice):
            return [self.present.get(j, ODP_NOT_PRESENT) for j in range(*i.indices(len(self)))]
        index = operator.index(i)
        value = self.present.get(index)
        if value is None:
            if not 0 <= index < self.odp.npages:
                raise IndexError(f"page {index} outside the ODP MR")
            return self.odp.fault(index)
        return value


@dataclass(eq=False)
class OdpMap:
    """``struct ib_umem_odp``: per page of the ``npages`` from user address
    ``first``, its frame and DMA address while the device has it mapped
    (``implicit``: the whole address space, ``is_implicit_odp``)."""

    device: IbDevice
    mm: MmStruct
    first: int
    writable: bool
    npages: int
    implicit: bool = False
    token: int = 0
    faults: int = 0
    """Pages faulted in (by an access or a prefetch)."""
    invalidations: int = 0
    """Pages the MMU notifier took away."""

    def __post_init__(self) -> None:
        self.frames: dict[int, Page] = {}
        self.dma = OdpPageList(self)

    def fault(self, index: int) -> int:
        """``ib_umem_odp_map_dma_and_lock`` of page ``index``: its DMA
        address, or :data:`ODP_FAULT_DMA` when the process has nothing
        mapped there (nothing is recorded: the next access tries again)."""
        addr = self.first + (index << PAGE_SHIFT)
        page = self.mm.follow_page(addr) if addr < TASK_SIZE else None
        if page is None:
            return ODP_FAULT_DMA
        dma = ib_dma_map_page(self.device, page, 0, PAGE_SIZE, DMA_BIDIRECTIONAL)
        if ib_dma_mapping_error(self.device, dma):
            return ODP_FAULT_DMA  # no IOVA space: the access fails, a later one may not
        self.frames[index] = page
        self.dma.present[index] = int(dma)
        self.faults += 1
        return int(dma)

    def invalidate(self, lo: int, hi: int) -> None:
        """The MMU notifier: the pages of ``[lo, hi)`` go; unmap them for
        the device (under its lock: no access is half way through)."""
        first = max(0, (lo - self.first) >> PAGE_SHIFT)
        last = min(self.npages, (hi - self.first + PAGE_SIZE - 1) >> PAGE_SHIFT)
        present = self.dma.present
        with self.device.lock:
            # walk whichever is shorter: the range, or the pages mapped now
            if last - first <= len(present):
                doomed = [i for i in range(first, last) if i in present]
            else:
                doomed = [i for i in present if first <= i < last]
            for i in doomed:
                self._unmap(i)

    def _unmap(self, i: int) -> None:
        dma = self.dma.present.pop(i)
        ib_dma_unmap_page(self.device, dma, PAGE_SIZE, DMA_BIDIRECTIONAL)
        del self.frames[i]
        self.invalidations += 1

    def mapped(self) -> list[int]:
        """The DMA addresses of the pages mapped now."""
        return list(self.dma.present.values())

    def release(self) -> None:
        self.mm.mmu_notifier_unregister(self.token)
        with self.device.lock:
            for dma in self.dma.present.values():
                ib_dma_unmap_page(self.device, dma, PAGE_SIZE, DMA_BIDIRECTIONAL)
            self.dma.present.clear()
            self.frames.clear()


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
    sgt: Scatterlist | None
    """The pinned pages' scatterlist, DMA-mapped (None for ODP)."""
    nmap: int
    released: bool = field(default=False)
    dmabuf: bool = field(default=False)
    odp: OdpMap | None = field(default=None)
    """The on-demand paging state of an ``IB_ACCESS_ON_DEMAND`` umem."""
    """A dma-buf import (``ib_umem_dmabuf``): the exporter's coherent,
    DMA-mapped pages, neither pinned nor mapped here, needing no syncs."""

    @property
    def offset(self) -> int:
        """``ib_umem_offset``: where the range starts in its first page."""
        return self.address & (PAGE_SIZE - 1)

    @property
    def npages(self) -> int:
        return len(self.pages) if self.odp is None else self.odp.npages

    def dma_segments(self) -> list[tuple[int, int]]:
        """The mapped ``(dma_address, dma_length)`` segments (of ODP: the
        pages mapped now)."""
        if self.sgt is None:
            return [] if self.odp is None else [(d, PAGE_SIZE) for d in self.odp.mapped()]
        return self.sgt.dma_segments()

    def sync_for_cpu(self) -> None:
        """``ib_dma_sync_sg_for_cpu`` over the whole umem: on a bounce
        platform, the device's writes reach the user pages."""
        dev = self.device.dma_device
        if self.sgt is None:
            for dma, n in self.dma_segments():
                dev.sync_single_for_cpu(dma, n, DMA_BIDIRECTIONAL)
        elif not self.dmabuf:
            dev.sync_sg_for_cpu(self.sgt, DMA_BIDIRECTIONAL)

    def sync_for_device(self) -> None:
        """``ib_dma_sync_sg_for_device``: the CPU's writes reach the device."""
        dev = self.device.dma_device
        if self.sgt is None:
            for dma, n in self.dma_segments():
                dev.sync_single_for_device(dma, n, DMA_BIDIRECTIONAL)
        elif not self.dmabuf:
            dev.sync_sg_for_device(self.sgt, DMA_BIDIRECTIONAL)


# ib_device.cc_dma_bounce of registered devices (a side table: the flag is
# set once, when the device is registered in a CoCo guest)
_CC_DMA_BOUNCE: weakref.WeakSet[IbDevice] = weakref.WeakSet()


def ib_device_set_cc_dma_bounce(device: IbDevice) -> None:
    """Mark ``device`` as registered in a confidential-computing guest
    (``cc_platform_has(CC_ATTR_GUEST_MEM_ENCRYPT)``): with its DMA forced
    through swiotlb, as it must be there, it gets ``cc_dma_bounce``.
    Raises :class:`VerbsError` (``EINVAL``) for a device whose DMA is not
    bounced (an encrypted guest cannot give it private memory at all)."""
    if device.dma_device.backend is not DmaBackend.SWIOTLB:
        raise VerbsError(errno.EINVAL, f"{device.name}: a CoCo guest's device DMAs through swiotlb")
    _CC_DMA_BOUNCE.add(device)


def ib_device_cc_dma_bounce(device: IbDevice) -> bool:
    """``ib_device.cc_dma_bounce`` (``IB_UVERBS_DEVICE_CC_DMA_BOUNCE``)."""
    return device in _CC_DMA_BOUNCE


def ib_umem_get(device: IbDevice, mm: MmStruct, addr: int, size: int, access: IbAccess) -> IbUmem:
    """``ib_umem_get``: pin and DMA-map ``size`` bytes at user address
    ``addr``. Raises :class:`VerbsError`: ``EINVAL`` for an empty or
    wrapping range, ``EFAULT`` when a page is not mapped, ``ENOMEM`` when
    the mapping fails (IOVA space or bounce slots exhausted)."""
    if ib_device_cc_dma_bounce(device):
        raise VerbsError(
            errno.EOPNOTSUPP, f"{device.name}: pinned memory cannot be bounce-buffered"
        )
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


def ib_umem_dmabuf_get(
    device: IbDevice,
    mm: MmStruct,
    addr: int,
    size: int,
    access: IbAccess,
    pages: list[Page],
    dma: int,
) -> IbUmem:
    """``ib_umem_dmabuf_get_pinned``: ``size`` bytes at user address
    ``addr`` of a dma-buf whose exporter gave ``device`` the physically
    contiguous ``pages`` at DMA address ``dma`` (``addr`` maps the start
    of ``pages``' first page plus ``addr``'s page offset). Raises
    :class:`VerbsError` (``EINVAL``) for an empty range or one past the
    buffer."""
    offset = addr & (PAGE_SIZE - 1)
    if size <= 0 or not pages or offset + size > len(pages) * PAGE_SIZE:
        raise VerbsError(errno.EINVAL, f"dma-buf umem of {size} bytes at {addr:#x}")
    npages = (offset + size + PAGE_SIZE - 1) >> PAGE_SHIFT
    used = pages[:npages]
    for prev, page in itertools.pairwise(used):
        if page.pfn != prev.pfn + 1:
            raise VerbsError(errno.EINVAL, "dma-buf pages are not contiguous")
    entry = ScatterlistEntry(used[0], 0, npages * PAGE_SIZE)
    entry.dma_address, entry.dma_length = dma, npages * PAGE_SIZE
    sgt = Scatterlist([entry])
    sgt.nents = 1
    writable = bool(access & (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE))
    return IbUmem(device, mm, addr, size, writable, used, sgt, 1, dmabuf=True)


def ib_umem_odp_get(
    device: IbDevice, mm: MmStruct, addr: int, size: int, access: IbAccess
) -> IbUmem:
    """``ib_umem_odp_get``: ``size`` bytes at user address ``addr``, nothing
    pinned or mapped yet, an MMU notifier on the range. Raises
    :class:`VerbsError`: ``EINVAL`` for an empty or wrapping range,
    ``EFAULT`` past user space, ``EOPNOTSUPP`` on a device whose DMA
    bounces (a bounced page could not stay coherent with the process's)."""
    if ib_device_cc_dma_bounce(device) or device.dma_device.backend is DmaBackend.SWIOTLB:
        raise VerbsError(errno.EOPNOTSUPP, f"{device.name}: no on-demand paging over bouncing")
    if size <= 0 or addr < 0 or addr + size < addr:
        raise VerbsError(errno.EINVAL, f"umem of {size} bytes at {addr:#x}")
    if addr + size > TASK_SIZE:
        raise VerbsError(errno.EFAULT, f"{addr:#x}+{size:#x} is not user memory")
    first = addr & ~(PAGE_SIZE - 1)
    npages = (addr + size - first + PAGE_SIZE - 1) >> PAGE_SHIFT
    writable = bool(access & (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE))
    odp = OdpMap(device, mm, first, writable, npages)
    odp.token = mm.mmu_notifier_register(first, npages << PAGE_SHIFT, odp.invalidate)
    return IbUmem(device, mm, addr, size, writable, [], None, 0, odp=odp)


def ib_umem_odp_alloc_implicit(device: IbDevice, mm: MmStruct, access: IbAccess) -> IbUmem:
    """``ib_umem_odp_alloc_implicit``: the umem of an implicit ODP MR
    (``ibv_reg_mr(pd, NULL, SIZE_MAX, access | IBV_ACCESS_ON_DEMAND)``),
    starting at address 0 and :data:`IMPLICIT_ODP_LENGTH` bytes long, so its
    keys cover every address of ``mm``: a page the process has mapped is
    faulted in on the device's first access; any other address (past
    ``TASK_SIZE`` included) is an access error. Raises :class:`VerbsError`
    ``EOPNOTSUPP`` on a device whose DMA bounces."""
    if ib_device_cc_dma_bounce(device) or device.dma_device.backend is DmaBackend.SWIOTLB:
        raise VerbsError(errno.EOPNOTSUPP, f"{device.name}: no on-demand paging over bouncing")
    writable = bool(access & (IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE))
    # page indices past TASK_SIZE exist (the keys cover them) but never map
    npages = (IMPLICIT_ODP_LENGTH >> PAGE_SHIFT) + 1
    odp = OdpMap(device, mm, 0, writable, npages, implicit=True)
    odp.token = mm.mmu_notifier_register(0, TASK_SIZE, odp.invalidate)
    return IbUmem(device, mm, 0, IMPLICIT_ODP_LENGTH, writable, [], None, 0, odp=odp)


def ib_umem_odp_prefetch(
    pd: ProtectionDomain, lkey: int, iova: int, length: int, fault: bool = True
) -> None:
    """``ib_uverbs_advise_mr`` ``PREFETCH`` / ``PREFETCH_WRITE`` (``fault``)
    or ``PREFETCH_NO_FAULT`` of one SGE: map the pages behind ``[iova, iova
    + length)`` of the ODP MR ``lkey`` of ``pd`` now. Raises
    :class:`VerbsError`: ``EINVAL`` for a key that names no ODP MR of
    ``pd`` or a range outside it, ``EFAULT`` when a faulting prefetch finds
    a page unmapped (``PREFETCH_NO_FAULT`` maps only what is there)."""
    device = pd.device
    mr = device.mr_table.lookup(lkey, pd, 0, remote=False)
    pages = mr.page_list
    if (
        not isinstance(pages, OdpPageList)
        or not 0 <= length <= _MAX_SGE_LENGTH
        or not mr.check_range(iova, length)
    ):
        raise VerbsError(errno.EINVAL, f"prefetch of {iova:#x}+{length:#x}: no ODP MR there")
    odp = pages.odp
    base = mr.iova & ~(PAGE_SIZE - 1)
    first = (iova - base) >> PAGE_SHIFT
    last = (iova + max(length, 1) - base + PAGE_SIZE - 1) >> PAGE_SHIFT
    present = odp.dma.present
    with device.lock:
        for i in range(first, last):
            if i not in present and odp.fault(i) == ODP_FAULT_DMA and fault:
                raise VerbsError(errno.EFAULT, f"prefetch: nothing mapped at page {i}")


def ib_umem_release(umem: IbUmem) -> None:
    """``ib_umem_release``: unmap and unpin (idempotent); a dma-buf import
    leaves its pages and mapping to the exporter."""
    if umem.released:
        return
    umem.released = True
    if umem.odp is not None:
        umem.odp.release()
        return
    if umem.dmabuf or umem.sgt is None:
        return
    ib_dma_unmap_sg(umem.device, umem.sgt, DMA_BIDIRECTIONAL)
    umem.mm.unpin_user_pages(umem.pages)


def _map_umem(mr: MemoryRegion, umem: IbUmem, iova: int) -> None:
    """Point ``mr`` at ``umem``: its page list from the DMA segments, its
    iova the user's (``rxe_mr_fill_pages_from_sgt``)."""
    if umem.odp is not None:
        # nothing mapped yet: the device faults pages into this list
        mr.page_size = PAGE_SIZE
        mr.page_list = umem.odp.dma
        mr.iova = iova
        mr.length = umem.length
        return
    assert umem.sgt is not None
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
    ib_check_mr_access(access, device.attrs.device_cap_flags)
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
        ib_check_mr_access(access, device.attrs.device_cap_flags)
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
