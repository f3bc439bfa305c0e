"""``pyverbs.mr``: memory regions (``ibv_reg_mr``, ``ibv_rereg_mr``,
``ibv_dereg_mr``) and the memory-window types.

``MR(pd, length, access)`` allocates ``length`` bytes of process memory
(``MR.buf`` is its user virtual address) and registers it;
``MR(pd, length, access, address=addr)`` registers memory the caller
allocated (:mod:`pyverbs.mem_alloc`). Registration pins the pages and
DMA-maps them for the device (:func:`~softrdma.verbs.umem.ib_umem_get`),
so on an IOMMU device the MR's pages are IOVA mappings the DMA-API debug
checker tracks until ``close()``. ``MR.read`` / ``MR.write`` are CPU
accesses to that memory, with the DMA syncs a bounce-buffer platform
needs around them.

``MR(..., access | IBV_ACCESS_ON_DEMAND)`` registers an ODP MR
(:func:`~softrdma.verbs.umem.ib_umem_odp_get`), with ``implicit=True`` one
over the whole address space. ``DMMR`` registers device memory
(:class:`pyverbs.device.DM`); ``MW`` is a memory window of type 1 or 2.
``Buf`` / ``BufMR`` are ``ibv_alloc_buf`` / ``ibv_reg_buf_mr``; ``MREx``
is ``ibv_reg_mr_ex`` (ordinary memory with an optional iova, or a ``Buf``
range). dma-buf MRs of an exporter's fd are not supported: ``DmaBufMR``
raises ``EOPNOTSUPP``, and so does ``DMAHandle`` (``ibv_alloc_dmah``).
"""

from __future__ import annotations

import errno
from typing import Any

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs._unsupported import unsupported_class
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.cc_heap import CcSharedBuffer
from pyverbs.device import DM
from pyverbs.pd import PD, ParentDomain
from pyverbs.pyverbs_error import PyverbsError, PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.memory.mm import UserAddressError, VmError
from softrdma.verbs.dm import ib_dereg_dm_mr, ib_reg_dm_mr
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.mr import MemoryRegion
from softrdma.verbs.mw import MemoryWindow
from softrdma.verbs.umem import (
    IMPLICIT_ODP_LENGTH,
    IbUmem,
    ib_dereg_user_mr,
    ib_reg_user_mr,
    ib_rereg_user_mr,
    ib_umem_get,
    ib_umem_odp_alloc_implicit,
    ib_umem_odp_get,
    ib_umem_release,
)

__all__ = [
    "DMMR",
    "MR",
    "MW",
    "Buf",
    "BufMR",
    "DMAHandle",
    "DmaBufMR",
    "DmaHandleInitAttr",
    "MREx",
    "MWBind",
    "MWBindInfo",
    "ibv_access_to_ib",
]

#: The access bits the kernel's RDMA core takes (``IB_ACCESS_SUPPORTED``
#: without ODP): the ones the MR enforces.
_CORE_ACCESS = (
    e.IBV_ACCESS_LOCAL_WRITE
    | e.IBV_ACCESS_REMOTE_WRITE
    | e.IBV_ACCESS_REMOTE_READ
    | e.IBV_ACCESS_REMOTE_ATOMIC
    | e.IBV_ACCESS_MW_BIND
    | e.IBV_ACCESS_ZERO_BASED
    | e.IBV_ACCESS_FLUSH_GLOBAL
    | e.IBV_ACCESS_FLUSH_PERSISTENT
)
#: ``IBV_ACCESS_OPTIONAL_RANGE``: hints a device may ignore (relaxed
#: ordering among them), and ``IBV_ACCESS_HUGETLB``, a hint about the memory.
_IGNORED_ACCESS = 0x3FF00000 | e.IBV_ACCESS_HUGETLB


def ibv_access_to_ib(access: int, what: str) -> IbAccess:
    """The kernel access flags of ``ibv_access_flags``: optional bits and
    ``IBV_ACCESS_ON_DEMAND`` dropped (a registration asks for an ODP umem
    itself; on a QP the bit means nothing), unknown bits refused
    (``EINVAL``)."""
    unknown = access & ~(_CORE_ACCESS | _IGNORED_ACCESS | e.IBV_ACCESS_ON_DEMAND)
    if unknown:
        raise PyverbsRDMAError(f"{what}: unknown access flags {unknown:#x}", errno.EINVAL)
    return IbAccess(access & _CORE_ACCESS)


class MR(PyverbsCM):
    """``struct ibv_mr``: ``MR(pd, length, access, address=None)``.

    ``implicit=True`` (with ``IBV_ACCESS_ON_DEMAND``) registers an implicit
    ODP MR, ``ibv_reg_mr(pd, NULL, SIZE_MAX, access)``: its keys reach any
    address of the process (iova 0), pages faulting in on first access;
    ``buf`` is still a ``length``-byte buffer, as pyverbs allocates one."""

    def __init__(
        self,
        creator: PD,
        length: int = 0,
        access: int = 0,
        address: int | None = None,
        implicit: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs.get("handle") is not None:
            self._import(creator, int(kwargs["handle"]), address)
            return
        what = "Failed to register a MR"
        if not isinstance(creator, PD):
            raise PyverbsUserError("MR needs a PD (RDMA CM registration is not supported)")
        self._reg_user(creator, length, access, address, None, implicit, what)

    def _reg_user(
        self,
        pd: PD,
        length: int,
        access: int,
        address: int | None,
        iova: int | None,
        implicit: bool,
        what: str,
    ) -> None:
        """``ibv_reg_mr`` / ``ibv_reg_mr_iova2`` of ordinary memory at
        ``address`` (or ``length`` bytes the MR allocates), pinned and
        DMA-mapped by ``ib_umem_get`` (an ODP umem with
        ``IBV_ACCESS_ON_DEMAND``; an implicit one over the whole address
        space with ``implicit``). ``iova`` defaults to the address (0 when
        zero-based or implicit)."""
        self.pd = pd
        ibpd = pd.alive(what)
        # IBV_ACCESS_ON_DEMAND: an ODP umem, faulted in by the device
        odp = bool(access & e.IBV_ACCESS_ON_DEMAND)
        ib_access = ibv_access_to_ib(access, what)
        if length <= 0:
            raise PyverbsRDMAError(f"{what} of length {length}", errno.EINVAL)
        proc = sim.process()
        self._mm = proc.mm
        self._owns_buf = address is None
        if address is None:
            try:
                address = proc.mm.mmap(length)
            except VmError as ex:
                raise PyverbsRDMAError(f"{what}: no memory", ex.errno) from None
        address = int(address)
        self._buf = address
        self._length = length
        self._access = access
        self._implicit = implicit
        if iova is None:
            iova = 0 if ib_access & IbAccess.ZERO_BASED or implicit else address
        try:
            if implicit and odp:
                # ibv_reg_mr(pd, NULL, SIZE_MAX): the keys cover the whole
                # address space (the buffer is only what read / write use)
                self.umem: IbUmem = ib_umem_odp_alloc_implicit(ibpd.device, proc.mm, ib_access)
            elif implicit:
                # without ON_DEMAND the core tries to pin it all, and fails
                self.umem = ib_umem_get(ibpd.device, proc.mm, 0, IMPLICIT_ODP_LENGTH, ib_access)
            else:
                get_umem = ib_umem_odp_get if odp else ib_umem_get
                self.umem = get_umem(ibpd.device, proc.mm, address, length, ib_access)
            try:
                self.mr: MemoryRegion = ib_reg_user_mr(ibpd, self.umem, int(iova), ib_access)
            except SoftRdmaError:
                ib_umem_release(self.umem)
                raise
        except SoftRdmaError as ex:
            if self._owns_buf:
                proc.mm.munmap(address, length)
            raise sim.rdma_error(what, ex) from None
        pd.add_ref(self)

    def _reg_buf(
        self, pd: PD, buf: Buf, address: int, length: int, access: int, iova: int | None, what: str
    ) -> None:
        """Register ``length`` bytes of ``buf`` at user address ``address``
        (libibverbs' ``ibv_reg_buf_mr`` / ``IBV_REG_MR_MASK_BUF`` path):
        ``pd`` must have allocated ``buf`` and the range must lie inside it
        (``EINVAL``). ``iova`` (``IBV_REG_MR_MASK_IOVA``) is refused for a
        dma-buf backed buffer, whose iova libibverbs derives itself."""
        ibpd = pd.alive(what)
        if buf.closed:
            raise PyverbsRDMAError(f"{what}: the buffer is freed", errno.EINVAL)
        if pd is not buf.pd:
            raise PyverbsRDMAError(f"{what}: the buffer is of another PD", errno.EINVAL)
        offset = address - buf.addr
        if length <= 0 or offset < 0 or offset + length > buf.length:
            raise PyverbsRDMAError(
                f"{what}: {length} bytes at offset {offset} of a {buf.length}-byte buffer",
                errno.EINVAL,
            )
        if iova is not None and buf.shared is not None:
            raise PyverbsRDMAError(f"{what}: an iova for a dma-buf backed buffer", errno.EINVAL)
        ib_access = ibv_access_to_ib(access, what)
        self.pd = pd
        self._mm = buf._mm
        self._owns_buf = False
        self._buf = address
        self._length = length
        self._access = access
        self._implicit = False
        self._shared = buf.shared is not None
        try:
            if buf.shared is not None:
                self.umem = buf.shared.import_range(address, length, ib_access)
            else:
                self.umem = ib_umem_get(ibpd.device, self._mm, address, length, ib_access)
            try:
                self.mr = ib_reg_user_mr(
                    ibpd, self.umem, address if iova is None else iova, ib_access
                )
            except SoftRdmaError:
                ib_umem_release(self.umem)
                raise
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        pd.add_ref(self)
        buf.add_ref(self)

    def __repr__(self) -> str:
        return f"MR(buf={self._buf:#x}, length={self._length}, lkey={self.lkey:#x})"

    @property
    def buf(self) -> int:
        """The user virtual address of the memory."""
        return self._buf

    @property
    def length(self) -> int:
        """``ibv_mr.length``: ``SIZE_MAX`` for an implicit ODP MR."""
        return IMPLICIT_ODP_LENGTH if self._implicit else self._length

    @property
    def lkey(self) -> int:
        return self.mr.lkey

    @property
    def rkey(self) -> int:
        return self.mr.rkey

    @property
    def handle(self) -> int:
        return self.mr.index

    def _range(self, length: int, offset: int, what: str) -> None:
        if self.closed:
            raise PyverbsUserError(f"{what}: the MR is closed")
        if length < 0 or offset < 0 or offset + length > self._length:
            raise PyverbsUserError(
                f"{what}: {length} bytes at offset {offset} are outside the MR "
                f"({self._length} bytes)"
            )

    def read(self, length: int, offset: int) -> bytes:
        """``length`` bytes of the MR's memory at ``offset`` (the CPU's view:
        synced from the device first)."""
        self._range(length, offset, "MR read")
        self.umem.sync_for_cpu()
        try:
            return self._mm.read(self._buf + offset, length)
        except UserAddressError as ex:
            raise PyverbsError(f"MR read: {ex}", errno.EFAULT) from None

    def write(self, data: bytes | str, length: int, offset: int = 0) -> None:
        """Store the first ``length`` bytes of ``data`` at ``offset`` (then
        hand the memory back to the device)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        length = min(length, len(raw))
        self._range(length, offset, "MR write")
        self.umem.sync_for_cpu()
        try:
            self._mm.write(self._buf + offset, raw[:length])
        except UserAddressError as ex:
            raise PyverbsError(f"MR write: {ex}", errno.EFAULT) from None
        self.umem.sync_for_device()

    def rereg(
        self, flags: int, pd: PD | None = None, addr: int = 0, length: int = 0, access: int = 0
    ) -> None:
        """``ibv_rereg_mr``: ``IBV_REREG_MR_CHANGE_TRANSLATION`` (``addr``,
        ``length``), ``IBV_REREG_MR_CHANGE_PD``, ``IBV_REREG_MR_CHANGE_ACCESS``;
        the keys stay. A new translation of a dma-buf import (a shared-heap
        buffer's MR) is refused (``EOPNOTSUPP``), as the kernel refuses it."""
        what = "Failed to rereg MR"
        if self._shared and flags & e.IBV_REREG_MR_CHANGE_TRANSLATION:
            raise PyverbsRDMAError(f"{what}: new translation of a dma-buf MR", errno.EOPNOTSUPP)
        supported = (
            e.IBV_REREG_MR_CHANGE_TRANSLATION
            | e.IBV_REREG_MR_CHANGE_PD
            | e.IBV_REREG_MR_CHANGE_ACCESS
        )
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the MR is closed", errno.EINVAL)
        if not flags or flags & ~supported:
            raise PyverbsRDMAError(f"{what}: flags {flags:#x}", errno.EINVAL)
        new_pd = None
        if flags & e.IBV_REREG_MR_CHANGE_PD:
            if pd is None:
                raise PyverbsRDMAError(f"{what}: no PD", errno.EINVAL)
            new_pd = pd.alive(what)
        ib_access = ibv_access_to_ib(access, what) if flags & e.IBV_REREG_MR_CHANGE_ACCESS else None
        umem = None
        if flags & e.IBV_REREG_MR_CHANGE_TRANSLATION:
            if self._implicit:
                raise PyverbsRDMAError(f"{what}: an implicit ODP MR", errno.EOPNOTSUPP)
            if length <= 0:
                raise PyverbsRDMAError(f"{what}: length {length}", errno.EINVAL)
            try:
                umem = ib_umem_get(
                    self.mr.device,
                    self._mm,
                    addr,
                    length,
                    ib_access if ib_access is not None else self.mr.access,
                )
            except SoftRdmaError as ex:
                raise sim.rdma_error(what, ex) from None
        try:
            ib_rereg_user_mr(self.mr, pd=new_pd, access=ib_access, umem=umem)
        except SoftRdmaError as ex:
            if umem is not None:
                ib_umem_release(umem)
            raise sim.rdma_error(what, ex) from None
        if umem is not None:
            ib_umem_release(self.umem)
            if self._owns_buf:
                self._mm.munmap(self._buf, self._length)
            self.umem, self._buf, self._length, self._owns_buf = umem, addr, length, False
        if pd is not None and new_pd is not None and pd is not self.pd:
            self.pd = pd
            pd.add_ref(self)
        if ib_access is not None:
            self._access = access

    #: Whether the MR is a dma-buf import of a shared-heap buffer.
    _shared = False
    #: Set on an MR made by ``ibv_import_mr``: the MR it shares.
    _origin: MR | None = None
    imported = False

    def _import(self, creator: PD, handle: int, address: int | None) -> None:
        """``ibv_import_mr``: the MR of ``handle`` on the command file of
        ``creator``'s context, which must be its PD (``EINVAL``); ``buf``
        is ``address`` (the user's pointer to the memory, as pyverbs takes
        it) or the MR's own."""
        what = "Failed to import MR"
        if not isinstance(creator, PD):
            raise PyverbsUserError("MR needs a PD")
        ibpd = creator.alive(what)
        origin = creator.ctx.import_object(MR, handle, what)
        if origin.mr.pd is not ibpd:
            raise PyverbsRDMAError(f"{what}: MR {handle:#x} is of another PD", errno.EINVAL)
        self.pd = creator
        self._origin = origin
        self.imported = True
        self._mm = origin._mm
        self._owns_buf = False
        self._buf = origin._buf if address is None else int(address)
        self._length = origin._length
        self._access = origin._access
        self._implicit = origin._implicit
        self._shared = origin._shared
        self.umem = origin.umem
        self.mr = origin.mr
        creator.add_ref(self)

    def unimport(self) -> None:
        """``ibv_unimport_mr``: forget an imported MR without deregistering
        it (it stays with the context that registered it)."""
        if not self.imported:
            raise PyverbsRDMAError("Failed to unimport MR: it was not imported", errno.EINVAL)
        self.imported = False
        self._closed = True
        self._dependants.clear()

    def _release(self) -> None:
        if self._origin is not None:
            # closing an imported MR deregisters it for every user, as
            # ibv_dereg_mr does
            self._origin.close()
            return
        ib_dereg_user_mr(self.mr, self.umem)
        if self._owns_buf:
            self._mm.munmap(self._buf, self._length)


class MWBindInfo(PyverbsObject):
    """``struct ibv_mw_bind_info``: the MR, the range of it and the
    window's access flags (``IBV_ACCESS_REMOTE_*``)."""

    def __init__(self, mr: MR, addr: int, length: int, mw_access_flags: int) -> None:
        super().__init__()
        self.mr = mr
        self.addr = addr
        self.length = length
        self.mw_access_flags = mw_access_flags


class MWBind(PyverbsObject):
    """``struct ibv_mw_bind``: what ``QP.bind_mw`` binds a type 1 window
    with (the bind info, send flags and the completion's ``wr_id``)."""

    def __init__(self, info: MWBindInfo, send_flags: int, wr_id: int = 0) -> None:
        super().__init__()
        self.bind_info = info
        self.send_flags = send_flags
        self.wr_id = wr_id


class MW(PyverbsCM):
    """``struct ibv_mw``: ``MW(pd, mw_type)`` is ``ibv_alloc_mw`` of a type 1
    or type 2 window (another type: ``EINVAL``); ``close()`` is
    ``ibv_dealloc_mw``. ``rkey`` is the window's current key: a type 1
    bind (``QP.bind_mw``) moves it on, as rdma-core's providers do; a
    type 2 window takes the key of its ``IBV_WR_BIND_MW``."""

    def __init__(self, pd: PD, mw_type: int) -> None:
        super().__init__()
        what = "Failed to allocate MW"
        ibpd = pd.alive(what)
        try:
            self.mw: MemoryWindow = ibpd.device.alloc_mw(ibpd, int(mw_type))
        except SoftRdmaError as ex:
            self._closed = True
            raise sim.rdma_error(what, ex) from None
        self.pd = pd
        self.mw_type = int(mw_type)
        self._rkey = self.mw.rkey
        pd.add_ref(self)

    @property
    def rkey(self) -> int:
        """``ibv_mw.rkey``, the user's copy: ``QP.bind_mw`` sets it when it
        posts the bind; an ``IBV_WR_BIND_MW`` leaves it (the key is the
        work request's ``rkey``)."""
        return self._rkey

    @property
    def handle(self) -> int:
        return self.mw.index

    def __str__(self) -> str:
        return f"MW: type {self.mw_type}, rkey {self.rkey:#x}"

    def _release(self) -> None:
        try:
            self.mw.device.dealloc_mw(self.mw)
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to dealloc MW", ex) from None


class DMMR(MR):
    """``ibv_reg_dm_mr``: ``DMMR(pd, length, access, dm, offset)``, a
    zero-based MR over device memory (``access`` must hold
    ``IBV_ACCESS_ZERO_BASED``; ``offset`` page aligned). ``buf`` is 0, the
    MR's first iova; ``read`` / ``write`` copy from / to the device memory."""

    def __init__(self, pd: PD, length: int, access: int, dm: DM, offset: int) -> None:
        PyverbsCM.__init__(self)
        what = "Failed to register a device MR"
        ib_access = ibv_access_to_ib(access, what)
        ibpd = pd.alive(what)
        if dm.closed:
            raise PyverbsRDMAError(f"{what}: the DM is closed", errno.EINVAL)
        try:
            self.mr = ib_reg_dm_mr(ibpd, dm.dm, int(offset), int(length), ib_access)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        self.pd = pd
        self.dm = dm
        self._dm_offset = int(offset)
        self._buf = 0
        self._length = int(length)
        self._access = access
        self._owns_buf = False
        pd.add_ref(self)
        dm.add_ref(self)

    def read(self, length: int, offset: int) -> bytes:
        """``length`` bytes of the MR at ``offset`` (``ibv_memcpy_from_dm``)."""
        if offset < 0 or length < 0 or offset + length > self._length:
            raise PyverbsRDMAError("Failed to copy from dm: outside the MR", errno.EINVAL)
        return self.dm.copy_from_dm(self._dm_offset + offset, length)

    def write(self, data: bytes | str, length: int, offset: int = 0) -> None:
        """Store ``data`` at ``offset`` of the MR (``ibv_memcpy_to_dm``)."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        if offset < 0 or length < 0 or offset + length > self._length:
            raise PyverbsRDMAError("Failed to copy to dm: outside the MR", errno.EINVAL)
        self.dm.copy_to_dm(self._dm_offset + offset, raw, length)

    def rereg(
        self, flags: int, pd: PD | None = None, addr: int = 0, length: int = 0, access: int = 0
    ) -> None:
        raise PyverbsRDMAError("Failed to rereg MR: a device-memory MR", errno.EOPNOTSUPP)

    def _release(self) -> None:
        ib_dereg_dm_mr(self.mr, self.dm.dm)


class DmaBufMR(MR):
    """``ibv_reg_dmabuf_mr``: dma-buf import is not supported (``EOPNOTSUPP``)."""

    def __init__(self, pd: PD, length: int, access: int, dmabuf: object = None, **kw: Any) -> None:
        PyverbsCM.__init__(self)
        self._closed = True
        raise PyverbsRDMAError("Failed to register a dma-buf MR", errno.EOPNOTSUPP)


class Buf(PyverbsCM):
    """``ibv_alloc_buf``: ``Buf(pd, size)``, ``size`` bytes of memory chosen
    for ``pd`` (``addr`` / ``buf`` is its user address). On a parent domain
    created with ``IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC``
    on a device that reports ``IBV_DEVICE_CC_DMA_BOUNCE`` it is a buffer of
    the shared heap (:mod:`pyverbs.cc_heap`); elsewhere ordinary process
    memory, as libibverbs' default allocator gives. ``close()`` is
    ``ibv_free_buf`` (its MRs are closed first)."""

    def __init__(self, pd: PD, size: int) -> None:
        super().__init__()
        what = "Failed to allocate a buffer"
        if not isinstance(pd, PD):
            raise PyverbsUserError("A Buf is allocated on a PD")
        ibpd = pd.alive(what)
        size = int(size)
        if size <= 0:
            raise PyverbsRDMAError(f"{what} of {size} bytes", errno.EINVAL)
        self.pd = pd
        self._mm = sim.process().mm
        self.shared: CcSharedBuffer | None = None
        if isinstance(pd, ParentDomain) and pd.cc_shared:
            self.shared = CcSharedBuffer(ibpd.device, self._mm, size)
            self.addr = self.shared.addr
        else:
            try:
                self.addr = self._mm.mmap(size)
            except VmError as ex:
                raise PyverbsRDMAError(f"{what}: no memory", ex.errno) from None
        self.length = size
        pd.add_ref(self)

    @property
    def buf(self) -> int:
        """The user address of the buffer (as ``addr``)."""
        return self.addr

    def _release(self) -> None:
        if self.shared is not None:
            self.shared.free()
        else:
            self._mm.munmap(self.addr, self.length)


class BufMR(MR):
    """``ibv_reg_buf_mr``: ``BufMR(pd, buf, length, access, offset=0)``
    registers ``length`` bytes at ``buf.addr + offset``. ``pd`` must be the
    PD that allocated ``buf`` and the range must lie inside it (``EINVAL``
    otherwise). Shared-heap memory is registered by dma-buf import;
    ordinary memory as ``ibv_reg_mr`` does (refused with ``EOPNOTSUPP`` on
    a DMA-bounce device)."""

    def __init__(self, pd: PD, buf: Buf, length: int, access: int, offset: int = 0) -> None:
        PyverbsCM.__init__(self)
        if not isinstance(pd, PD) or not isinstance(buf, Buf):
            raise PyverbsUserError("BufMR(pd, buf, length, access, offset=0)")
        self._reg_buf(
            pd,
            buf,
            buf.addr + int(offset),
            int(length),
            access,
            None,
            "Failed to register a buffer MR",
        )


class DmaHandleInitAttr(PyverbsObject):
    """``struct ibv_dmah_init_attr``: the CPU whose cache a DMA handle steers
    writes to (``cpu_id``), the PCIe TPH processing hint (``ph``) and the
    memory type (``tph_mem_type``); ``comp_mask`` says which are set."""

    def __init__(
        self, cpu_id: int = 0, ph: int = 0, tph_mem_type: int = 0, comp_mask: int = 0
    ) -> None:
        super().__init__()
        self.cpu_id = cpu_id
        self.ph = ph
        self.tph_mem_type = tph_mem_type
        self.comp_mask = comp_mask


#: ``ibv_alloc_dmah``: softrdma devices have no PCIe TPH steering tags, so
#: allocation refuses with ``EOPNOTSUPP`` as the kernel does for a device
#: without ``alloc_dmah``.
DMAHandle = unsupported_class(
    "DMAHandle", "DMA handles (ibv_alloc_dmah, PCIe TPH steering)", __name__
)


class MREx(MR):
    """``ibv_reg_mr_ex``: ``MREx(pd, length, access, address=None,
    iova=None, buf=None, dmah=None)``, the registration of
    ``struct ibv_mr_init_attr`` by its ``comp_mask``:

    - ``buf`` (``IBV_REG_MR_MASK_BUF`` with ``IBV_REG_MR_MASK_ADDR``): a
      :class:`Buf` of ``pd``; ``address`` (inside it) is where the MR
      starts, ``length`` must stay inside it (``EINVAL`` otherwise, and
      without ``address``). Shared-heap buffers are registered by dma-buf
      import, as ``ibv_reg_buf_mr`` does.
    - ``address`` alone (``IBV_REG_MR_MASK_ADDR``): memory the caller owns,
      as ``ibv_reg_mr`` registers it; without it the MR allocates
      ``length`` bytes, as pyverbs' ``MR`` does.
    - ``iova`` (``IBV_REG_MR_MASK_IOVA``): the MR's first iova
      (``ibv_reg_mr_iova2``); ``EINVAL`` with a dma-buf backed ``buf``.
    - ``dmah`` (``IBV_REG_MR_MASK_DMAH``): a :data:`DMAHandle`, which no
      softrdma device can allocate.
    """

    def __init__(
        self,
        pd: PD,
        length: int = 0,
        access: int = 0,
        address: int | None = None,
        iova: int | None = None,
        buf: Buf | None = None,
        dmah: object = None,
        **kwargs: Any,
    ) -> None:
        what = "Failed to register an MR (ibv_reg_mr_ex)"
        PyverbsCM.__init__(self)
        if not isinstance(pd, PD):
            raise PyverbsUserError("MREx needs a PD")
        if kwargs.get("fd") is not None or kwargs.get("fd_offset") is not None:
            # IBV_REG_MR_MASK_FD: no dma-buf exporter hands out fds here
            if buf is not None:
                raise PyverbsRDMAError(f"{what}: a dma-buf fd with a buffer", errno.EINVAL)
            raise PyverbsRDMAError(f"{what}: dma-buf fd registration", errno.EOPNOTSUPP)
        unknown = set(kwargs) - {"fd", "fd_offset"}
        if unknown:
            raise PyverbsUserError(f"MREx: unknown arguments {sorted(unknown)}")
        if dmah is not None:
            raise PyverbsUserError("MREx: dmah must be a DMAHandle")
        self.dmah = None
        length = int(length)
        if buf is not None:
            if not isinstance(buf, Buf):
                raise PyverbsUserError("MREx: buf must be a Buf")
            if address is None:
                raise PyverbsRDMAError(
                    f"{what}: IBV_REG_MR_MASK_BUF needs IBV_REG_MR_MASK_ADDR", errno.EINVAL
                )
            self._reg_buf(
                pd, buf, int(address), length, access, None if iova is None else int(iova), what
            )
            return
        self._reg_user(
            pd, length, access, address, None if iova is None else int(iova), False, what
        )
