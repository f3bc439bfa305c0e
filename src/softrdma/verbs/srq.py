"""Shared receive queues (``struct ib_srq``; ``ib_create_srq``,
``ib_post_srq_recv``, ``ib_modify_srq``, ``ib_query_srq``,
``ib_destroy_srq``).

One pool of receive WQEs that several QPs of the same PD draw from (a QP
created with ``srq=`` has no receive queue of its own).

An XRC SRQ (``srq_type`` ``IB_SRQT_XRC``, ``ib_srq.ext.xrc``) belongs to an
XRC domain and has its own CQ: the XRC TGT QPs of the domain take WQEs
from the XRC SRQ each request names by its number (``srq_num``,
``ibv_get_srq_num``), complete them on the SRQ's CQ, and check the
request's R_Key against the SRQ's PD. ``srq_limit`` arms
a low-water mark: when taking a WQE leaves fewer than that many, the SRQ's
event handler gets ``IB_EVENT_SRQ_LIMIT_REACHED`` once and the limit reads
0 again until re-armed with ``ib_modify_srq(IB_SRQ_LIMIT)``.

Who owns what, as for QPs: this layer validates, the driver's
:class:`SrqHardware` (rxe's ``struct rxe_srq``) holds the queue.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from softrdma.verbs.enums import IbSrqAttrMask, IbSrqType
from softrdma.verbs.errors import PostError, VerbsError
from softrdma.verbs.wr import RecvWR

if TYPE_CHECKING:
    from softrdma.verbs.cq import CompletionQueue
    from softrdma.verbs.device import EventHandler
    from softrdma.verbs.pd import ProtectionDomain
    from softrdma.verbs.xrcd import XrcDomain

__all__ = ["SharedReceiveQueue", "SrqAttr", "SrqHardware", "SrqInitAttr"]


@dataclass
class SrqAttr:
    """``struct ib_srq_attr``."""

    max_wr: int = 64
    max_sge: int = 4
    srq_limit: int = 0


@dataclass
class SrqInitAttr:
    """``struct ib_srq_init_attr``: ``IB_SRQT_BASIC``, or ``IB_SRQT_XRC``
    with its XRC domain and CQ (``ext.xrc.xrcd``, ``ext.cq``)."""

    attr: SrqAttr = field(default_factory=SrqAttr)
    srq_type: IbSrqType = IbSrqType.BASIC
    event_handler: EventHandler | None = None
    xrcd: XrcDomain | None = None
    cq: CompletionQueue | None = None


class SrqHardware(Protocol):
    """The driver's side of an SRQ (rxe's ``struct rxe_srq``)."""

    max_wr: int
    max_sge: int
    limit: int

    def __len__(self) -> int:
        """Receive WQEs queued and not yet taken by a QP."""
        ...


class SharedReceiveQueue:
    """``struct ib_srq``. Create with ``device.create_srq(pd, init_attr)``;
    the driver attaches its :class:`SrqHardware` as :attr:`hw`."""

    hw: SrqHardware

    def __init__(self, pd: ProtectionDomain, init_attr: SrqInitAttr, srq_num: int) -> None:
        """Validate as ``ib_create_srq`` / rxe ``rxe_srq_chk_init`` do."""
        attrs = pd.device.attrs
        a = init_attr.attr
        xrcd = cq = None
        if init_attr.srq_type == IbSrqType.XRC:
            xrcd, cq = init_attr.xrcd, init_attr.cq
            if xrcd is None or cq is None:
                raise VerbsError(errno.EINVAL, "an XRC SRQ needs an XRC domain and a CQ")
            xrcd.alive()
            if xrcd.device is not pd.device or cq.device is not pd.device or cq.destroyed:
                raise VerbsError(errno.EINVAL, "XRC domain or CQ of another device, or destroyed")
        elif init_attr.srq_type != IbSrqType.BASIC:
            raise VerbsError(errno.EOPNOTSUPP, f"{init_attr.srq_type.name} SRQs are not supported")
        if not 1 <= a.max_wr <= attrs.max_srq_wr:
            raise VerbsError(errno.EINVAL, f"max_wr {a.max_wr} outside 1..{attrs.max_srq_wr}")
        if not 1 <= a.max_sge <= attrs.max_srq_sge:
            raise VerbsError(errno.EINVAL, f"max_sge {a.max_sge} outside 1..{attrs.max_srq_sge}")
        if not 0 <= a.srq_limit <= a.max_wr:
            raise VerbsError(errno.EINVAL, f"srq_limit {a.srq_limit} above max_wr {a.max_wr}")
        self.pd = pd
        self.device = pd.device
        self.srq_num = srq_num
        self.srq_type = init_attr.srq_type
        self.event_handler = init_attr.event_handler
        self.usecnt = 0
        """QPs attached (``ib_srq.usecnt``): destroy is refused while > 0."""
        self.destroyed = False
        self.xrcd = xrcd
        """The XRC domain of an XRC SRQ (``ib_srq.ext.xrc.xrcd``), else None."""
        self.cq = cq
        """The CQ of an XRC SRQ's completions (``ib_srq.ext.cq``), else None."""
        pd.usecnt += 1
        if xrcd is not None and cq is not None:
            xrcd.attach(None)
            cq.usecnt += 1

    def __repr__(self) -> str:
        return f"SharedReceiveQueue({self.srq_num:#x} on {self.device.name})"

    def post_recv(self, wrs: RecvWR | Sequence[RecvWR]) -> None:
        """``ib_post_srq_recv``: the WRs before the first bad one are posted;
        the bad one is :class:`PostError`'s ``bad_wr`` (``ENOMEM`` when the
        SRQ is full, ``EINVAL`` for too many SGEs)."""
        batch = [wrs] if isinstance(wrs, RecvWR) else list(wrs)
        with self.device.lock:
            self._alive()
            hw = self.hw
            good: list[RecvWR] = []
            try:
                for wr in batch:
                    if len(hw) + len(good) >= hw.max_wr:
                        raise PostError(errno.ENOMEM, f"SRQ full ({hw.max_wr} WRs)", wr)
                    if len(wr.sg_list) > hw.max_sge:
                        raise PostError(
                            errno.EINVAL, f"{len(wr.sg_list)} SGEs > max_sge {hw.max_sge}", wr
                        )
                    good.append(wr)
            finally:
                if good:
                    self.device.ops_post_srq_recv(self, good)

    def modify(self, attr: SrqAttr, mask: int) -> None:
        """``ib_modify_srq``: ``IB_SRQ_MAX_WR`` resizes (never below the WQEs
        queued, nor below an armed limit), ``IB_SRQ_LIMIT`` arms the limit
        (at most ``max_wr``); anything else is ``EINVAL``."""
        with self.device.lock:
            self._alive()
            mask = int(mask)
            if not mask or mask & ~int(IbSrqAttrMask.MAX_WR | IbSrqAttrMask.LIMIT):
                raise VerbsError(errno.EINVAL, f"bad ib_srq_attr_mask {mask:#x}")
            hw = self.hw
            max_wr = attr.max_wr if mask & IbSrqAttrMask.MAX_WR else hw.max_wr
            if mask & IbSrqAttrMask.MAX_WR:
                if not 1 <= max_wr <= self.device.attrs.max_srq_wr:
                    raise VerbsError(errno.EINVAL, f"max_wr {max_wr} out of range")
                if max_wr < len(hw):
                    raise VerbsError(errno.EINVAL, f"max_wr {max_wr} below {len(hw)} queued")
            if mask & IbSrqAttrMask.LIMIT:
                if not 0 <= attr.srq_limit <= max_wr:
                    raise VerbsError(errno.EINVAL, f"srq_limit {attr.srq_limit} above {max_wr}")
            elif hw.limit > max_wr:
                raise VerbsError(errno.EINVAL, f"max_wr {max_wr} below the armed limit")
            self.device.ops_modify_srq(self, attr, IbSrqAttrMask(mask))

    def query(self) -> SrqAttr:
        """``ib_query_srq``: ``max_wr``, ``max_sge`` and the limit (0 once it
        fired)."""
        with self.device.lock:
            self._alive()
            return SrqAttr(self.hw.max_wr, self.hw.max_sge, self.hw.limit)

    def destroy(self) -> None:
        """``ib_destroy_srq``: refused with ``EBUSY`` while QPs use it; the
        WQEs still queued go without completions, as in the kernel."""
        with self.device.lock:
            if self.destroyed:
                return
            if self.usecnt:
                raise VerbsError(errno.EBUSY, f"SRQ {self.srq_num:#x} has {self.usecnt} QPs")
            self.device.ops_destroy_srq(self)
            self.destroyed = True
            self.device._forget_srq(self)
            self.pd.usecnt -= 1
            if self.xrcd is not None and self.cq is not None:
                self.cq.usecnt -= 1
                self.xrcd.detach()

    def _alive(self) -> None:
        if self.destroyed:
            raise VerbsError(errno.EINVAL, f"SRQ {self.srq_num:#x} is destroyed")
