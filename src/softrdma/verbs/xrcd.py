"""XRC domains (``struct ib_xrcd``; ``ib_alloc_xrcd_user``,
``ib_dealloc_xrcd_user``; the uverbs ``xrcd_table`` behind rdma-core's
``ibv_open_xrcd`` / ``ibv_close_xrcd``).

An XRC domain groups XRC SRQs and XRC TGT QPs: a TGT QP only takes
receive WQEs from XRC SRQs of its own domain. It is refcounted by them
(``ib_xrcd.usecnt``): deallocating a domain still in use is ``EBUSY``.

Domains opened with a file are shared by inode: whoever opens the same file
on the same device gets the same domain (``ibv_open_xrcd`` with
``IBV_XRCD_INIT_ATTR_FD``), ``O_CREAT`` creates it when it does not exist
yet, ``O_EXCL`` with ``O_CREAT`` refuses one that does (the kernel's
``ib_uverbs_open_xrcd``: both failures are ``EINVAL``). Each open is closed
once; the domain goes when its last opener closes it and nothing uses it.

XRC TGT QPs have no PD and no CQ in verbs; as mlx5 does with its device
resources ``p0`` / ``c0``, the domain gives them an internal PD and CQ
that never see a work request or a completion (receive completions go to
the CQ of the XRC SRQ that supplied the WQE).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Hashable
from typing import TYPE_CHECKING

from softrdma.verbs.enums import IbQpType
from softrdma.verbs.errors import VerbsError

if TYPE_CHECKING:
    from softrdma.verbs.cq import CompletionQueue
    from softrdma.verbs.device import EventHandler, IbDevice, IbEvent
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.qp import QpCap, QpInitAttr, QueuePair

__all__ = ["XrcDomain", "ib_alloc_xrcd_user", "ib_dealloc_xrcd_user", "ib_open_qp"]


class XrcDomain:
    """``struct ib_xrcd``. Create with :func:`ib_alloc_xrcd_user`."""

    def __init__(self, device: IbDevice, inode: Hashable | None) -> None:
        self.device = device
        self.inode = inode
        self.usecnt = 0
        """XRC SRQs and TGT QPs of the domain (``ib_xrcd.usecnt``)."""
        self.opens = 1
        """Openers sharing the domain by inode (uverbs ``xrcd->uobject`` refs)."""
        self.tgt_qps: dict[int, QueuePair] = {}
        self.deallocated = False
        self._pd: ProtectionDomain | None = None
        self._cq: CompletionQueue | None = None

    def __repr__(self) -> str:
        return f"XrcDomain({self.device.name}, inode={self.inode!r}, usecnt={self.usecnt})"

    def alive(self) -> None:
        """Raise ``EINVAL`` once the domain is deallocated."""
        if self.deallocated:
            raise VerbsError(errno.EINVAL, "XRC domain is deallocated")

    def create_tgt_qp(
        self,
        cap: QpCap | None = None,
        event_handler: EventHandler | None = None,
    ) -> QueuePair:
        """``ib_create_qp`` of an ``IB_QPT_XRC_TGT`` QP (``pd`` NULL,
        ``qp_init_attr.xrcd`` this domain): no send queue, no receive queue;
        its receives come from the domain's XRC SRQs."""
        from softrdma.verbs.qp import QpCap, QpInitAttr

        self.alive()
        dev = self.device
        if self._pd is None:
            self._pd = dev.alloc_pd()
        if self._cq is None:
            self._cq = dev.create_cq(1)
        zero = QpCap(0, 0, 0, 0, 0) if cap is None else cap
        attr = QpInitAttr(
            IbQpType.XRC_TGT, self._cq, self._cq, zero, event_handler=event_handler, xrcd=self
        )
        qp = dev.create_qp(self._pd, attr)
        self.tgt_qps[qp.qp_num] = qp
        return qp

    def attach(self, qp: QueuePair | None) -> None:
        """A TGT QP or an XRC SRQ starts using the domain."""
        self.alive()
        self.usecnt += 1

    def detach(self, qp: QueuePair | None = None) -> None:
        """A TGT QP or an XRC SRQ is gone."""
        self.usecnt -= 1
        if qp is not None:
            self.tgt_qps.pop(qp.qp_num, None)
        self._release_internal()

    def _release_internal(self) -> None:
        # The internal PD / CQ go with the last TGT QP.
        if self.tgt_qps or self._pd is None:
            return
        if self._cq is not None and not self._cq.usecnt:
            self._cq.destroy()
            self._cq = None
        if not self._pd.usecnt:
            self._pd.dealloc()
            self._pd = None


def ib_alloc_xrcd_user(
    device: IbDevice, inode: Hashable | None = None, oflags: int = os.O_CREAT
) -> XrcDomain:
    """``ib_alloc_xrcd_user`` behind ``ib_uverbs_open_xrcd``: a new domain,
    or with ``inode`` the device's domain of that inode (``O_CREAT`` creates
    it if missing, ``O_CREAT | O_EXCL`` insists on a new one). A device
    without ``IB_DEVICE_XRC`` refuses with ``EOPNOTSUPP``; past
    ``max_xrcds`` ``ENOMEM``."""
    from softrdma.verbs.device import IB_DEVICE_XRC

    if not device.attrs.device_cap_flags & IB_DEVICE_XRC:
        raise VerbsError(errno.EOPNOTSUPP, f"{device.name} has no XRC domains")
    with device.lock:
        table = device._tables.xrcds_by_inode
        if inode is not None:
            xrcd = table.get(inode)
            if xrcd is not None:
                if oflags & os.O_EXCL and oflags & os.O_CREAT:
                    raise VerbsError(errno.EINVAL, "XRC domain of this file exists (O_EXCL)")
                xrcd.opens += 1
                return xrcd
            if not oflags & os.O_CREAT:
                raise VerbsError(errno.EINVAL, "no XRC domain for this file (no O_CREAT)")
        if len(device._tables.xrcds) >= device.attrs.max_xrcds:
            raise VerbsError(errno.ENOMEM, "max_xrcds reached")
        xrcd = XrcDomain(device, inode)
        if inode is not None:
            table[inode] = xrcd
        device._tables.xrcds.append(xrcd)
        return xrcd


def ib_dealloc_xrcd_user(xrcd: XrcDomain) -> None:
    """``ib_dealloc_xrcd_user`` / ``ibv_close_xrcd``: one opener closes; the
    last one frees the domain, which must have no XRC SRQ or TGT QP left
    (``EBUSY``)."""
    dev = xrcd.device
    with dev.lock:
        xrcd.alive()
        if xrcd.opens == 1 and xrcd.usecnt:
            raise VerbsError(errno.EBUSY, f"XRC domain still has {xrcd.usecnt} SRQs / QPs")
        xrcd.opens -= 1
        if xrcd.opens:
            return
        xrcd.deallocated = True
        dev._tables.xrcds.remove(xrcd)
        if xrcd.inode is not None:
            dev._tables.xrcds_by_inode.pop(xrcd.inode, None)
        xrcd._release_internal()


def ib_open_qp(
    xrcd: XrcDomain, qp_num: int, event_handler: EventHandler | None = None
) -> QueuePair:
    """``ib_open_qp``: another user of the domain attaches to one of its
    TGT QPs (``EINVAL`` if ``qp_num`` is no TGT QP of this domain). The
    handler, if given, also receives the QP's events."""
    with xrcd.device.lock:
        xrcd.alive()
        qp = xrcd.tgt_qps.get(qp_num)
        if qp is None or qp.destroyed:
            raise VerbsError(errno.EINVAL, f"QP {qp_num:#x} is no XRC TGT QP of this domain")
        if event_handler is not None:
            prev = qp.event_handler

            def both(event: IbEvent) -> None:
                # Every opener of the QP hears its events (uverbs' per-open handlers).
                if prev is not None:
                    prev(event)
                event_handler(event)

            qp.event_handler = both
        return qp


def qp_init_check(init_attr: QpInitAttr) -> None:
    """What ``ib_create_qp`` checks of an XRC QP's init attributes."""
    if init_attr.qp_type == IbQpType.XRC_TGT:
        if init_attr.xrcd is None:
            raise VerbsError(errno.EINVAL, "an XRC TGT QP needs an XRC domain")
        init_attr.xrcd.alive()
    elif init_attr.xrcd is not None:
        raise VerbsError(errno.EINVAL, "only XRC TGT QPs take an XRC domain")
    if init_attr.qp_type in (IbQpType.XRC_INI, IbQpType.XRC_TGT) and init_attr.srq is not None:
        raise VerbsError(errno.EINVAL, "XRC QPs take no SRQ")
