"""``pyverbs.pd``: protection domains (``ibv_alloc_pd``, ``ibv_dealloc_pd``).

A PD is a softrdma :class:`~softrdma.verbs.pd.ProtectionDomain` of the
context's device; closing it first closes the MRs, QPs and AHs created on
it.

A parent domain (``ibv_alloc_parent_domain``) wraps a PD: objects created
on it belong to that PD, and the queue buffers of the QPs, SRQs and
extended CQs created on it come from the user's allocator (``alloc`` /
``free`` of ``ibv_parent_domain_init_attr``), which the provider then
pins and DMA-maps for the device as the kernel does a user queue buffer
(``ib_umem_get``). The allocator may answer
``IBV_ALLOCATOR_USE_DEFAULT`` to let the provider allocate, or NULL (0)
to fail the creation with ``ENOMEM``. With
``IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC`` on a device
that reports ``IBV_DEVICE_CC_DMA_BOUNCE``, the provider's allocations
(queue rings, ``ibv_alloc_buf``) come from the shared heap
(:mod:`pyverbs.cc_heap`).
"""

from __future__ import annotations

import errno
import mmap as _mmap
from collections.abc import Callable
from typing import Any

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.cc_heap import CcSharedBuffer
from pyverbs.device import Context
from pyverbs.libibverbs_enums import ibv_parent_domain_init_attr_mask
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from softrdma.errors import SoftRdmaError
from softrdma.memory.mm import VmError
from softrdma.verbs.enums import IbAccess
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.srq import SharedReceiveQueue
from softrdma.verbs.umem import (
    IbUmem,
    ib_device_cc_dma_bounce,
    ib_umem_get,
    ib_umem_odp_prefetch,
    ib_umem_release,
)

__all__ = [
    "PD",
    "PD_RES_TYPE_CQ",
    "PD_RES_TYPE_QP",
    "PD_RES_TYPE_SRQ",
    "ParentDomain",
    "ParentDomainContext",
    "ParentDomainInitAttr",
    "QueueBuffer",
]

# The ``resource_type`` values the allocator is called with. They are
# provider-specific in rdma-core (libmlx5's ``MLX5DV_RES_TYPE_*``: the
# driver id in the high 32 bits); softrdma's provider numbers its own the
# same way, with RDMA_DRIVER_RXE (17) as driver id.
_DRIVER_ID = 17 << 32
PD_RES_TYPE_QP = _DRIVER_ID + 1
PD_RES_TYPE_SRQ = _DRIVER_ID + 2
PD_RES_TYPE_CQ = _DRIVER_ID + 3
#: Bytes of one completion queue entry in the provider's CQ buffer.
CQE_SIZE = 64
#: The smallest send / receive work queue entry (a basic block).
WQE_BASIC_BLOCK = 64
#: Bytes of one scatter/gather entry in a WQE.
WQE_SGE_SIZE = 16
#: Bytes of a send WQE's control and address segments.
WQE_SEND_HEADER = 48
PAGE_SIZE = _mmap.PAGESIZE

_ALLOW_CC_UNPROTECTED_ALLOC = (
    ibv_parent_domain_init_attr_mask.IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC
)

AllocFunc = Callable[[Any, Any, int, int, int], int]
FreeFunc = Callable[[Any, Any, int, int], Any]


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def qp_buffer_size(
    max_send_wr: int, max_send_sge: int, max_inline: int, max_recv_wr: int, max_recv_sge: int
) -> int:
    """Bytes of a QP's send and receive rings: power-of-two WQE strides of
    at least a basic block (as libmlx5 sizes them), whole pages."""
    send_stride = _pow2(
        max(
            WQE_BASIC_BLOCK,
            WQE_SEND_HEADER + WQE_SGE_SIZE * max_send_sge,
            WQE_SEND_HEADER + max_inline,
        )
    )
    recv_stride = _pow2(max(WQE_SGE_SIZE, WQE_SGE_SIZE * max_recv_sge))
    size = _pow2(max(1, max_send_wr)) * send_stride + _pow2(max(1, max_recv_wr)) * recv_stride
    return -(-size // PAGE_SIZE) * PAGE_SIZE


def cq_buffer_size(cqe: int) -> int:
    """Bytes of a CQ's ring: a power of two of entries above ``cqe``."""
    return -(-(_pow2(cqe + 1) * CQE_SIZE) // PAGE_SIZE) * PAGE_SIZE


class PD(PyverbsCM):
    """``struct ibv_pd``: ``PD(context)``."""

    def __init__(self, creator: Context, **kwargs: Any) -> None:
        super().__init__()
        if not isinstance(creator, Context):
            raise PyverbsUserError("A PD is created on a Context")
        self.ctx = creator
        self.imported = False
        if kwargs.get("handle") is not None:
            # ibv_import_pd: the PD of that handle on the context's file
            origin = creator.import_object(PD, int(kwargs["handle"]), "Failed to import PD")
            self.pd: ProtectionDomain = origin.pd
            self.handle = int(kwargs["handle"])
            self.imported = True
            creator.add_ref(self)
            return
        dev = creator._alive()
        try:
            self.pd = dev.alloc_pd()
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to allocate PD", ex) from None
        self.handle = id(self.pd) & 0xFFFFFFFF
        creator.add_ref(self)

    def alive(self, what: str) -> ProtectionDomain:
        """The softrdma PD, or :class:`PyverbsRDMAError` (``EINVAL``) with
        ``what`` when this PD is closed."""
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the PD is closed", errno.EINVAL)
        return self.pd

    def unimport(self) -> None:
        """``ibv_unimport_pd``: forget an imported PD without deallocating
        it (it stays with the context that created it)."""
        if not self.imported:
            raise PyverbsRDMAError("Failed to unimport PD: it was not imported", errno.EINVAL)
        self.imported = False
        self._closed = True
        self._dependants.clear()

    def _release(self) -> None:
        # closing an imported PD deallocates it for every user, as
        # ibv_dealloc_pd does
        if not self.pd.deallocated:
            self.pd.dealloc()

    def advise_mr(self, advise: int, flags: int, sg_list: list[Any]) -> None:
        """``ibv_advise_mr``: prefetch the pages of ODP MRs behind the SGEs
        (``PREFETCH`` / ``PREFETCH_WRITE`` fault them in, ``PREFETCH_NO_FAULT``
        maps what is there). With ``IBV_ADVISE_MR_FLAG_FLUSH`` it is
        synchronous and a page that cannot be faulted in fails it
        (``EFAULT``); without, failures stay unreported, as an asynchronous
        prefetch's are. ``EINVAL``: an unknown advice, no SGEs, an SGE of
        no ODP MR of this PD; ``EOPNOTSUPP``: unknown flags."""
        what = "Failed to advise MR"
        ibpd = self.alive(what)
        faults = {
            e._IBV_ADVISE_MR_ADVICE_PREFETCH: True,
            e._IBV_ADVISE_MR_ADVICE_PREFETCH_WRITE: True,
            e._IBV_ADVISE_MR_ADVICE_PREFETCH_NO_FAULT: False,
        }
        if advise not in faults or not sg_list:
            raise PyverbsRDMAError(f"{what}: advice {advise}, {len(sg_list)} SGEs", errno.EINVAL)
        if flags & ~e._IBV_ADVISE_MR_FLAG_FLUSH:
            raise PyverbsRDMAError(f"{what}: flags {flags:#x}", errno.EOPNOTSUPP)
        sync = bool(flags & e._IBV_ADVISE_MR_FLAG_FLUSH)
        for sge in sg_list:
            try:
                ib_umem_odp_prefetch(ibpd, sge.lkey, sge.addr, sge.length, faults[advise])
            except VerbsError as ex:
                if sync or ex.errno != errno.EFAULT:
                    raise sim.rdma_error(what, ex) from None


class ParentDomainContext(PyverbsObject):
    """pyverbs' ``pd_context`` of a parent domain: the Python ``alloc`` /
    ``free`` callbacks, called as ``alloc_func(pd, context, size,
    alignment, resource_type)`` and ``free_func(pd, context, ptr,
    resource_type)`` with ``pd`` the PD given here."""

    def __init__(
        self,
        pd: PD,
        alloc_func: AllocFunc | None = None,
        free_func: FreeFunc | None = None,
        user_data: Any = None,
    ) -> None:
        super().__init__()
        self.pd = pd
        self.p_alloc = alloc_func
        self.p_free = free_func
        self.user_data = user_data


class ParentDomainInitAttr(PyverbsObject):
    """``struct ibv_parent_domain_init_attr``: the PD, through
    ``pd_context`` the allocators (which set ``PD_CONTEXT | ALLOCATORS``
    in ``comp_mask``, as pyverbs does), and ``comp_mask`` bits of the
    caller's (``IBV_PARENT_DOMAIN_INIT_ATTR_ALLOW_CC_UNPROTECTED_ALLOC``)."""

    def __init__(
        self, pd: PD, pd_context: ParentDomainContext | None = None, comp_mask: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(pd, PD):
            raise PyverbsUserError("ParentDomainInitAttr needs a PD")
        self.pd = pd
        self.pd_context = pd_context
        self.comp_mask = int(comp_mask)
        if pd_context is not None:
            self.comp_mask |= (
                e.IBV_PARENT_DOMAIN_INIT_ATTR_PD_CONTEXT | e.IBV_PARENT_DOMAIN_INIT_ATTR_ALLOCATORS
            )


class QueueBuffer(PyverbsCM):
    """The ring of one queue created on a parent domain: ``length`` bytes
    at user address ``addr`` from the allocator (or the provider's default
    allocation), pinned and DMA-mapped for the device while the queue
    lives (the kernel's ``ib_umem`` of a user QP / CQ buffer). Closed with
    its queue: unmapped, unpinned, then given back to ``free``. The default
    allocation of a CC parent domain on a DMA-bounce device is a buffer of
    the shared heap, imported rather than pinned."""

    def __init__(self, domain: ParentDomain, size: int, resource_type: int, what: str) -> None:
        super().__init__()
        self.domain = domain
        self.resource_type = resource_type
        self.length = size
        self.custom = False
        self.shared: CcSharedBuffer | None = None
        mm = sim.process().mm
        addr = domain._call_alloc(size, PAGE_SIZE, resource_type)
        if addr is None and domain.cc_shared:
            self.shared = CcSharedBuffer(domain.pd.device, mm, size)
            self.addr = self.shared.addr
            try:
                self.umem: IbUmem = self.shared.import_range(self.addr, size, IbAccess.LOCAL_WRITE)
            except PyverbsRDMAError:
                self.shared.free()
                raise
            return
        if addr is None:
            try:
                addr = mm.mmap(size)
            except VmError as ex:
                raise PyverbsRDMAError(f"{what}: no memory for the queue", ex.errno) from None
        else:
            self.custom = True
            if addr == 0:
                raise PyverbsRDMAError(f"{what}: the allocator returned NULL", errno.ENOMEM)
            if addr % PAGE_SIZE:
                domain._call_free(addr, resource_type)
                raise PyverbsRDMAError(
                    f"{what}: the allocator returned {addr:#x}, not {PAGE_SIZE}-aligned",
                    errno.EINVAL,
                )
        self.addr = addr
        try:
            self.umem = ib_umem_get(domain.pd.device, mm, addr, size, IbAccess.LOCAL_WRITE)
        except SoftRdmaError as ex:
            self._give_back()
            raise sim.rdma_error(f"{what}: the queue buffer at {addr:#x}", ex) from None

    def _give_back(self) -> None:
        if self.shared is not None:
            self.shared.free()
        elif self.custom:
            self.domain._call_free(self.addr, self.resource_type)
        else:
            sim.process().mm.munmap(self.addr, self.length)

    def _release(self) -> None:
        ib_umem_release(self.umem)
        self._give_back()
        self.domain._rings.discard(self)


class ParentDomain(PD):
    """``struct ibv_pd`` of ``ibv_alloc_parent_domain``:
    ``ParentDomain(context, attr)``. It shares the protection domain of
    ``attr.pd`` (MRs, QPs and AHs created on it belong to that PD) and is
    closed with it; queue buffers come from its allocators."""

    def __init__(self, context: Context, attr: ParentDomainInitAttr) -> None:
        PyverbsCM.__init__(self)
        what = "Failed to allocate Parent Domain"
        if not isinstance(context, Context):
            raise PyverbsUserError("A parent domain is created on a Context")
        if not isinstance(attr, ParentDomainInitAttr):
            raise PyverbsUserError("A parent domain needs a ParentDomainInitAttr")
        parent = attr.pd
        dev = context._alive()
        ibpd = parent.alive(what)
        if ibpd.device is not dev:
            raise PyverbsRDMAError(f"{what}: the PD is of another device", errno.EINVAL)
        if isinstance(parent, ParentDomain):
            raise PyverbsRDMAError(f"{what}: the PD is itself a parent domain", errno.EINVAL)
        ctx = attr.pd_context
        if ctx is not None and (not callable(ctx.p_alloc) or not callable(ctx.p_free)):
            raise PyverbsRDMAError(f"{what}: both alloc and free are needed", errno.EINVAL)
        known = (
            e.IBV_PARENT_DOMAIN_INIT_ATTR_ALLOCATORS
            | e.IBV_PARENT_DOMAIN_INIT_ATTR_PD_CONTEXT
            | _ALLOW_CC_UNPROTECTED_ALLOC
        )
        if attr.comp_mask & ~known:
            raise PyverbsRDMAError(f"{what}: comp_mask {attr.comp_mask:#x}", errno.EINVAL)
        self.cc_unprotected = bool(attr.comp_mask & _ALLOW_CC_UNPROTECTED_ALLOC)
        # only a device that needs it gets shared memory: elsewhere the
        # opt-in falls back to ordinary allocations
        self.cc_shared = self.cc_unprotected and ib_device_cc_dma_bounce(dev)
        self.ctx = context
        self.pd = ibpd
        self.handle = parent.handle
        self.protection_domain = parent
        self.pd_context = ctx
        # its queues hold their rings by weak reference (as dependants)
        self._rings: set[QueueBuffer] = set()
        parent.add_ref(self)

    def _call_alloc(self, size: int, alignment: int, resource_type: int) -> int | None:
        """The user's ``alloc``: an address, 0 (NULL) or ``None`` for
        ``IBV_ALLOCATOR_USE_DEFAULT`` (also when there is no allocator)."""
        ctx = self.pd_context
        if ctx is None or ctx.p_alloc is None:
            return None
        ptr = ctx.p_alloc(ctx.pd, ctx, size, alignment, resource_type)
        if not isinstance(ptr, int) or ptr < 0:
            raise PyverbsUserError(f"The parent domain allocator returned {ptr!r}")
        return None if ptr == e._IBV_ALLOCATOR_USE_DEFAULT else ptr

    def _call_free(self, ptr: int, resource_type: int) -> None:
        ctx = self.pd_context
        if ctx is not None and ctx.p_free is not None:
            ctx.p_free(ctx.pd, ctx, ptr, resource_type)

    def queue_buffer(self, size: int, resource_type: int, what: str) -> QueueBuffer:
        """A :class:`QueueBuffer` of ``size`` bytes for a queue being
        created (``what`` names the verb in errors)."""
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the parent domain is closed", errno.EINVAL)
        ring = QueueBuffer(self, size, resource_type, what)
        self._rings.add(ring)
        return ring

    def add_ref(self, obj: PyverbsCM) -> None:
        """A QP or SRQ created on the parent domain gets its ring from the
        allocators (the ring closes with it); then it is recorded as on any
        PD. A failed allocation destroys the new object and raises."""
        ring: QueueBuffer | None = None
        cap = getattr(getattr(obj, "qp", None), "cap", None)
        try:
            if cap is not None:
                size = qp_buffer_size(
                    cap.max_send_wr,
                    cap.max_send_sge,
                    cap.max_inline_data,
                    cap.max_recv_wr,
                    cap.max_recv_sge,
                )
                ring = self.queue_buffer(size, PD_RES_TYPE_QP, "Failed to create QP")
            elif isinstance(getattr(obj, "srq", None), SharedReceiveQueue):
                attr = obj.query()  # type: ignore[attr-defined]
                size = qp_buffer_size(0, 0, 0, attr.max_wr, attr.max_sge)
                ring = self.queue_buffer(size, PD_RES_TYPE_SRQ, "Failed to create SRQ")
        except Exception:
            obj.close()
            raise
        if ring is not None:
            obj.add_ref(ring)
        super().add_ref(obj)

    def _release(self) -> None:
        # the protection domain is the parent's: it deallocates it
        self.pd_context = None
