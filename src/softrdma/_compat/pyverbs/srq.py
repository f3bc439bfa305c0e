"""``pyverbs.srq``: shared receive queues (``ibv_create_srq``,
``ibv_create_srq_ex`` for basic SRQs, ``ibv_post_srq_recv``,
``ibv_modify_srq``, ``ibv_query_srq``, ``ibv_get_srq_num``,
``ibv_destroy_srq``) on softrdma's
:class:`~softrdma.verbs.srq.SharedReceiveQueue`, basic or XRC
(``IBV_SRQT_XRC`` with its XRCD and CQ: the XRC TGT QPs of the domain
take from it the WQEs the XRC requests name it for). Tag matching
(``OpsWr``, ``IBV_SRQT_TM``) is not supported: ``EOPNOTSUPP``."""

from __future__ import annotations

import errno

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs._post import post_recv_chain
from pyverbs._unsupported import unsupported_class
from pyverbs.base import PyverbsCM, PyverbsObject
from pyverbs.cq import CQ
from pyverbs.device import Context
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from pyverbs.wr import RecvWR
from pyverbs.xrcd import XRCD
from softrdma.errors import SoftRdmaError
from softrdma.verbs import srq as ibsrq
from softrdma.verbs.enums import IbSrqAttrMask, IbSrqType

__all__ = ["SRQ", "OpsWr", "SrqAttr", "SrqInitAttr", "SrqInitAttrEx"]

OpsWr = unsupported_class("OpsWr", "Tag matching", __name__)


class SrqAttr(PyverbsObject):
    """``struct ibv_srq_attr``."""

    def __init__(self, max_wr: int = 100, max_sge: int = 1, srq_limit: int = 0) -> None:
        super().__init__()
        self.max_wr = max_wr
        self.max_sge = max_sge
        self.srq_limit = srq_limit


class SrqInitAttr(PyverbsObject):
    """``struct ibv_srq_init_attr`` (for ``SRQ(pd, ...)``)."""

    def __init__(self, attr: SrqAttr | None = None) -> None:
        super().__init__()
        attr = attr if attr is not None else SrqAttr(0, 0, 0)
        self.attr = SrqAttr(attr.max_wr, attr.max_sge, attr.srq_limit)

    @property
    def max_wr(self) -> int:
        return self.attr.max_wr

    @property
    def max_sge(self) -> int:
        return self.attr.max_sge

    @property
    def srq_limit(self) -> int:
        return self.attr.srq_limit


class SrqInitAttrEx(SrqInitAttr):
    """``struct ibv_srq_init_attr_ex`` (for ``SRQ(context, ...)``):
    ``comp_mask`` says which of ``srq_type``, ``pd``, ``cq``, ``xrcd`` count."""

    def __init__(self, max_wr: int = 100, max_sge: int = 1, srq_limit: int = 0) -> None:
        super().__init__(SrqAttr(max_wr, max_sge, srq_limit))
        self.comp_mask = 0
        self.srq_type = e.IBV_SRQT_BASIC
        self.pd: PD | None = None
        self.cq: CQ | None = None
        self.xrcd: XRCD | None = None


class SRQ(PyverbsCM):
    """``struct ibv_srq``: ``SRQ(pd, SrqInitAttr)`` (``ibv_create_srq``) or
    ``SRQ(context, SrqInitAttrEx)`` (``ibv_create_srq_ex``)."""

    def __init__(self, creator: PD | Context, attr: SrqInitAttr) -> None:
        super().__init__()
        what = "Failed to create SRQ"
        xrcd: XRCD | None = None
        cq: CQ | None = None
        if isinstance(creator, PD):
            pd = creator
        elif isinstance(creator, Context):
            if not isinstance(attr, SrqInitAttrEx):
                raise PyverbsUserError("An SRQ created on a Context needs a SrqInitAttrEx")
            mask = attr.comp_mask
            srq_type = attr.srq_type if mask & e.IBV_SRQ_INIT_ATTR_TYPE else e.IBV_SRQT_BASIC
            if srq_type == e.IBV_SRQT_XRC:
                # ibv_create_srq_ex: an XRC SRQ needs its XRCD and CQ
                if not mask & e.IBV_SRQ_INIT_ATTR_XRCD or not isinstance(attr.xrcd, XRCD):
                    raise PyverbsRDMAError(f"{what}: an XRC SRQ needs an XRCD", errno.EINVAL)
                if not mask & e.IBV_SRQ_INIT_ATTR_CQ or not isinstance(attr.cq, CQ):
                    raise PyverbsRDMAError(f"{what}: an XRC SRQ needs a CQ", errno.EINVAL)
                xrcd, cq = attr.xrcd, attr.cq
            elif srq_type != e.IBV_SRQT_BASIC or mask & (
                e.IBV_SRQ_INIT_ATTR_XRCD | e.IBV_SRQ_INIT_ATTR_TM
            ):
                raise PyverbsRDMAError(f"{what}: SRQ type {srq_type}", errno.EOPNOTSUPP)
            if not mask & e.IBV_SRQ_INIT_ATTR_PD or attr.pd is None:
                raise PyverbsRDMAError(f"{what}: no PD", errno.EINVAL)
            pd = attr.pd
            if pd.ctx is not creator:
                raise PyverbsRDMAError(f"{what}: PD of another context", errno.EINVAL)
        else:
            raise PyverbsUserError("An SRQ is created on a PD or a Context")
        ibpd = pd.alive(what)
        a = attr.attr
        init = ibsrq.SrqInitAttr(ibsrq.SrqAttr(a.max_wr, a.max_sge, a.srq_limit))
        if xrcd is not None and cq is not None:
            init.srq_type = IbSrqType.XRC
            init.xrcd = xrcd.alive(what)
            if cq.closed:
                raise PyverbsRDMAError(f"{what}: the CQ is closed", errno.EINVAL)
            init.cq = cq.cq
        try:
            self.srq: ibsrq.SharedReceiveQueue = ibpd.device.create_srq(ibpd, init)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        sim.process().owners[self.srq] = pd.ctx  # its limit event goes there
        self.pd = pd
        self.xrcd = xrcd
        self.cq = cq
        pd.add_ref(self)
        if xrcd is not None and cq is not None:
            xrcd.add_ref(self)  # closed before its XRCD and its CQ
            cq.add_ref(self)

    def __str__(self) -> str:
        return f"SRQ {self.srq.srq_num:#x}"

    def _alive(self, what: str) -> ibsrq.SharedReceiveQueue:
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the SRQ is destroyed", errno.EINVAL)
        return self.srq

    def _release(self) -> None:
        try:
            self.srq.destroy()
        except SoftRdmaError as ex:
            raise sim.rdma_error("Failed to destroy SRQ", ex) from None

    def get_srq_num(self) -> int:
        """``ibv_get_srq_num``: the number XRC requests name the SRQ by
        (their XRCETH); any SRQ has one here."""
        return self._alive("Failed to retrieve SRQ number").srq_num

    def post_recv(self, wr: RecvWR, bad_wr: RecvWR | None = None) -> None:
        """``ibv_post_srq_recv`` of a WR chain: the WRs before a bad one are
        posted; ``bad_wr`` gets the bad one's ``wr_id``."""
        what = "Failed to post receive to SRQ"
        post_recv_chain(self._alive(what).post_recv, wr, bad_wr, what)

    def modify(self, attr: SrqAttr, comp_mask: int) -> None:
        """``ibv_modify_srq`` with ``IBV_SRQ_MAX_WR`` / ``IBV_SRQ_LIMIT``."""
        what = "Failed to modify SRQ"
        srq = self._alive(what)
        try:
            srq.modify(
                ibsrq.SrqAttr(attr.max_wr, attr.max_sge, attr.srq_limit), IbSrqAttrMask(comp_mask)
            )
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None

    def query(self) -> SrqAttr:
        """``ibv_query_srq``: ``max_wr``, ``max_sge``, the armed limit."""
        what = "Failed to query SRQ"
        try:
            a = self._alive(what).query()
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        return SrqAttr(a.max_wr, a.max_sge, a.srq_limit)
