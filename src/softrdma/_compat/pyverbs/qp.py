"""``pyverbs.qp``: queue pairs (``ibv_create_qp``, ``ibv_create_qp_ex``,
``ibv_modify_qp``, ``ibv_query_qp``, ``ibv_post_send``, ``ibv_post_recv``,
``ibv_destroy_qp``) and their attribute objects.

A QP is a softrdma :class:`~softrdma.verbs.qp.QueuePair` (RC, UC or UD;
the transport is softrdma's), optionally receiving from a
:class:`pyverbs.srq.SRQ`. ``QP(pd, init_attr, qp_attr)`` moves an RC or
UC QP to INIT and a UD QP to RTS, and ``to_init`` / ``to_rtr`` /
``to_rts`` use the attribute masks pyverbs uses, so the kernel's
transition table (``ib_modify_qp_is_ok``) judges exactly what
rdma-core's would. :class:`QPEx` adds the extended post-send API
(``ibv_wr_*``). XRC QPs: ``IBV_QPT_XRC_SEND`` (INI) on a PD, sending with
the remote SRQ number of ``SendWR.set_qp_type_xrc`` / ``wr_set_xrc_srqn``,
and ``IBV_QPT_XRC_RECV`` (TGT) on a Context with an XRCD
(``IBV_QP_INIT_ATTR_XRCD``), no PD, no CQ. Raw packet QPs are not
supported: creating them raises ``EOPNOTSUPP``.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import itertools
import socket
from typing import Any, overload

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs._post import ib_sge, post_error, post_recv_chain
from pyverbs.addr import AH, AHAttr
from pyverbs.base import PyverbsCM, PyverbsObject, inc_rkey
from pyverbs.cq import CQ
from pyverbs.device import Context
from pyverbs.mr import MW, MWBind, MWBindInfo, ibv_access_to_ib
from pyverbs.pd import PD
from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
from pyverbs.srq import SRQ
from pyverbs.wr import SGE, RecvWR, SendWR
from softrdma.errors import SoftRdmaError
from softrdma.verbs import qp as ibqp
from softrdma.verbs import wr as ibwr
from softrdma.verbs.enums import (
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWrOpcode,
)

__all__ = ["QP", "QPAttr", "QPCap", "QPEx", "QPInitAttr", "QPInitAttrEx"]

_QP_TYPES: dict[int, IbQpType] = {
    e.IBV_QPT_RC: IbQpType.RC,
    e.IBV_QPT_UD: IbQpType.UD,
    e.IBV_QPT_UC: IbQpType.UC,
    e.IBV_QPT_XRC_SEND: IbQpType.XRC_INI,
    e.IBV_QPT_XRC_RECV: IbQpType.XRC_TGT,
}

#: pyverbs' ``_get_comp_mask``: the attributes each helper passes.
_MASKS: dict[int, dict[str, int]] = {
    e.IBV_QPT_RC: {
        "INIT": e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS,
        "RTR": e.IBV_QP_AV
        | e.IBV_QP_PATH_MTU
        | e.IBV_QP_DEST_QPN
        | e.IBV_QP_RQ_PSN
        | e.IBV_QP_MAX_DEST_RD_ATOMIC
        | e.IBV_QP_MIN_RNR_TIMER,
        "RTS": e.IBV_QP_TIMEOUT
        | e.IBV_QP_RETRY_CNT
        | e.IBV_QP_RNR_RETRY
        | e.IBV_QP_SQ_PSN
        | e.IBV_QP_MAX_QP_RD_ATOMIC,
    },
    e.IBV_QPT_UC: {
        "INIT": e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_ACCESS_FLAGS,
        "RTR": e.IBV_QP_AV | e.IBV_QP_PATH_MTU | e.IBV_QP_DEST_QPN | e.IBV_QP_RQ_PSN,
        "RTS": e.IBV_QP_SQ_PSN,
    },
    e.IBV_QPT_UD: {
        "INIT": e.IBV_QP_PKEY_INDEX | e.IBV_QP_PORT | e.IBV_QP_QKEY,
        "RTR": 0,
        "RTS": e.IBV_QP_SQ_PSN,
    },
}

# pyverbs gives XRC QPs the attributes of RC ones.
_MASKS[e.IBV_QPT_XRC_SEND] = _MASKS[e.IBV_QPT_XRC_RECV] = _MASKS[e.IBV_QPT_RC]

#: ``ibv_wr_opcode`` -> the softrdma opcode and WR class.
_SEND_OPCODES: dict[int, IbWrOpcode] = {
    e.IBV_WR_SEND: IbWrOpcode.SEND,
    e.IBV_WR_SEND_WITH_IMM: IbWrOpcode.SEND_WITH_IMM,
    e.IBV_WR_SEND_WITH_INV: IbWrOpcode.SEND_WITH_INV,
    e.IBV_WR_LOCAL_INV: IbWrOpcode.LOCAL_INV,
    e.IBV_WR_BIND_MW: IbWrOpcode.BIND_MW,
    e.IBV_WR_RDMA_WRITE: IbWrOpcode.RDMA_WRITE,
    e.IBV_WR_RDMA_WRITE_WITH_IMM: IbWrOpcode.RDMA_WRITE_WITH_IMM,
    e.IBV_WR_RDMA_READ: IbWrOpcode.RDMA_READ,
    e.IBV_WR_ATOMIC_CMP_AND_SWP: IbWrOpcode.ATOMIC_CMP_AND_SWP,
    e.IBV_WR_ATOMIC_FETCH_AND_ADD: IbWrOpcode.ATOMIC_FETCH_AND_ADD,
}
_SEND_FLAGS = e.IBV_SEND_FENCE | e.IBV_SEND_SIGNALED | e.IBV_SEND_SOLICITED | e.IBV_SEND_INLINE


class QPCap(PyverbsObject):
    """``struct ibv_qp_cap``."""

    def __init__(
        self,
        max_send_wr: int = 1,
        max_recv_wr: int = 10,
        max_send_sge: int = 1,
        max_recv_sge: int = 1,
        max_inline_data: int = 0,
    ) -> None:
        super().__init__()
        self.max_send_wr = max_send_wr
        self.max_recv_wr = max_recv_wr
        self.max_send_sge = max_send_sge
        self.max_recv_sge = max_recv_sge
        self.max_inline_data = max_inline_data

    def to_ib(self) -> ibqp.QpCap:
        return ibqp.QpCap(
            self.max_send_wr,
            self.max_recv_wr,
            self.max_send_sge,
            self.max_recv_sge,
            self.max_inline_data,
        )


class _CapField:
    """A ``struct ibv_qp_cap`` field of :class:`QPInitAttr`'s ``cap`` that
    pyverbs also exposes on the init attr (``QPInitAttr.max_send_wr`` ...)."""

    name: str

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    @overload
    def __get__(self, obj: None, objtype: type | None = None) -> _CapField: ...
    @overload
    def __get__(self, obj: QPInitAttr, objtype: type | None = None) -> int: ...
    def __get__(self, obj: QPInitAttr | None, objtype: type | None = None) -> int | _CapField:
        if obj is None:
            return self
        value: int = getattr(obj.cap, self.name)
        return value

    def __set__(self, obj: QPInitAttr, val: int) -> None:
        setattr(obj.cap, self.name, val)


class QPInitAttr(PyverbsObject):
    """``struct ibv_qp_init_attr``."""

    def __init__(
        self,
        qp_type: int = e.IBV_QPT_UD,
        qp_context: object = None,
        scq: CQ | None = None,
        rcq: CQ | None = None,
        srq: object = None,
        cap: QPCap | None = None,
        sq_sig_all: int = 1,
    ) -> None:
        super().__init__()
        self.qp_type = qp_type
        self.qp_context = qp_context
        self.send_cq = scq
        self.recv_cq = rcq
        self.srq = srq
        self.cap = cap if cap is not None else QPCap()
        self.sq_sig_all = sq_sig_all

    # pyverbs lets the caps be read and set on the init attr itself.
    max_send_wr = _CapField()
    max_recv_wr = _CapField()
    max_send_sge = _CapField()
    max_recv_sge = _CapField()
    max_inline_data = _CapField()


class QPInitAttrEx(QPInitAttr):
    """``struct ibv_qp_init_attr_ex`` (``ibv_create_qp_ex`` on a Context)."""

    def __init__(
        self,
        qp_type: int = e.IBV_QPT_UD,
        qp_context: object = None,
        scq: CQ | None = None,
        rcq: CQ | None = None,
        srq: object = None,
        cap: QPCap | None = None,
        sq_sig_all: int = 0,
        comp_mask: int = 0,
        pd: PD | None = None,
        xrcd: object = None,
        create_flags: int = 0,
        max_tso_header: int = 0,
        source_qpn: int = 0,
        hash_conf: object = None,
        ind_table: object = None,
        send_ops_flags: int = 0,
    ) -> None:
        super().__init__(qp_type, qp_context, scq, rcq, srq, cap, sq_sig_all)
        self.comp_mask = comp_mask
        self.pd = pd
        self.xrcd = xrcd
        self.create_flags = create_flags
        self.max_tso_header = max_tso_header
        self.source_qpn = source_qpn
        self.hash_conf = hash_conf
        self.ind_table = ind_table
        self.send_ops_flags = send_ops_flags


class QPAttr(PyverbsObject):
    """``struct ibv_qp_attr``: zero except the RESET → INIT defaults
    (``qp_state`` INIT, ``port_num`` 1, ``path_mtu`` 1024)."""

    def __init__(
        self,
        qp_state: int = e.IBV_QPS_INIT,
        cur_qp_state: int = e.IBV_QPS_RESET,
        port_num: int = 1,
        path_mtu: int = e.IBV_MTU_1024,
    ) -> None:
        super().__init__()
        self.qp_state = qp_state
        self.cur_qp_state = cur_qp_state
        self.port_num = port_num
        self.path_mtu = path_mtu
        self.path_mig_state = 0
        self.qkey = 0
        self.rq_psn = 0
        self.sq_psn = 0
        self.dest_qp_num = 0
        self.qp_access_flags = 0
        self.cap = QPCap(0, 0, 0, 0, 0)
        self.ah_attr = AHAttr()
        self.alt_ah_attr = AHAttr()
        self.pkey_index = 0
        self.alt_pkey_index = 0
        self.en_sqd_async_notify = 0
        self.sq_draining = 0
        self.max_rd_atomic = 0
        self.max_dest_rd_atomic = 0
        self.min_rnr_timer = 0
        self.timeout = 0
        self.retry_cnt = 0
        self.rnr_retry = 0
        self.alt_port_num = 0
        self.alt_timeout = 0
        self.rate_limit = 0

    def to_ib(self, mask: int) -> ibqp.QpAttr:
        """The softrdma ``ib_qp_attr`` of the fields ``mask`` selects."""
        what = "Failed to modify QP"
        try:
            attr = ibqp.QpAttr(
                qp_state=IbQpState(self.qp_state),
                cur_qp_state=IbQpState(self.cur_qp_state),
                qkey=self.qkey,
                rq_psn=self.rq_psn,
                sq_psn=self.sq_psn,
                dest_qp_num=self.dest_qp_num,
                pkey_index=self.pkey_index,
                port_num=self.port_num,
                max_rd_atomic=self.max_rd_atomic,
                max_dest_rd_atomic=self.max_dest_rd_atomic,
                min_rnr_timer=self.min_rnr_timer,
                timeout=self.timeout,
                retry_cnt=self.retry_cnt,
                rnr_retry=self.rnr_retry,
                en_sqd_async_notify=bool(self.en_sqd_async_notify),
            )
            if mask & e.IBV_QP_PATH_MTU:
                attr.path_mtu = IbMtu(self.path_mtu)
        except ValueError as ex:
            raise PyverbsRDMAError(f"{what}: {ex}", errno.EINVAL) from None
        if mask & e.IBV_QP_ACCESS_FLAGS:
            attr.qp_access_flags = ibv_access_to_ib(self.qp_access_flags, what)
        if mask & e.IBV_QP_AV:
            attr.ah_attr = self.ah_attr.to_softrdma(what)
        return attr

    @classmethod
    def from_ib(cls, attr: ibqp.QpAttr, cap: ibqp.QpCap) -> QPAttr:
        """The ``ibv_qp_attr`` that ``ibv_query_qp`` fills."""
        from pyverbs.addr import GID, GlobalRoute

        out = cls(int(attr.qp_state), int(attr.cur_qp_state), attr.port_num, int(attr.path_mtu))
        for name in (
            "qkey",
            "rq_psn",
            "sq_psn",
            "dest_qp_num",
            "pkey_index",
            "max_rd_atomic",
            "max_dest_rd_atomic",
            "min_rnr_timer",
            "timeout",
            "retry_cnt",
            "rnr_retry",
        ):
            setattr(out, name, int(getattr(attr, name)))
        out.qp_access_flags = int(attr.qp_access_flags)
        out.en_sqd_async_notify = int(attr.en_sqd_async_notify)
        out.cap = QPCap(
            cap.max_send_wr,
            cap.max_recv_wr,
            cap.max_send_sge,
            cap.max_recv_sge,
            cap.max_inline_data,
        )
        if attr.ah_attr is not None:
            a = attr.ah_attr
            gr = GlobalRoute(GID.from_raw(a.dgid), a.flow_label, 0, a.hop_limit, a.traffic_class)
            out.ah_attr = AHAttr(is_global=1, port_num=a.port_num, gr=gr)
        return out


class QP(PyverbsCM):
    """``struct ibv_qp``: ``QP(pd, QPInitAttr, qp_attr=None)`` or
    ``QP(context, QPInitAttrEx, qp_attr=None)``; with ``qp_attr`` an RC QP
    ends in INIT and a UD QP in RTS."""

    pd: PD | None
    """None for an XRC RECV (TGT) QP, which has no PD."""
    scq: CQ | None
    rcq: CQ | None

    def __init__(
        self, creator: PD | Context, init_attr: QPInitAttr, qp_attr: QPAttr | None = None
    ) -> None:
        super().__init__()
        what = "Failed to create QP"
        if isinstance(creator, Context):
            if not isinstance(init_attr, QPInitAttrEx):
                raise PyverbsUserError("A QP created on a Context needs a QPInitAttrEx")
            # blocking multicast loopback holds trivially: there is no multicast
            flags = init_attr.create_flags
            if init_attr.comp_mask & e.IBV_QP_INIT_ATTR_CREATE_FLAGS and init_attr.qp_type == (
                e.IBV_QPT_UD
            ):
                flags &= ~e.IBV_QP_CREATE_BLOCK_SELF_MCAST_LB
            if flags or init_attr.ind_table is not None:
                raise PyverbsRDMAError(f"{what}: create flags / RSS", errno.EOPNOTSUPP)
            if init_attr.comp_mask & e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS:
                _check_send_ops(init_attr.qp_type, init_attr.send_ops_flags, what)
            if init_attr.qp_type == e.IBV_QPT_XRC_RECV:
                self._init_xrc_tgt(creator, init_attr, qp_attr, what)
                return
            if not init_attr.comp_mask & e.IBV_QP_INIT_ATTR_PD or init_attr.pd is None:
                raise PyverbsRDMAError(f"{what}: no PD", errno.EINVAL)
            pd = init_attr.pd
        elif isinstance(creator, PD):
            pd = creator
        else:
            raise PyverbsUserError("A QP is created on a PD or a Context")
        qp_type = _QP_TYPES.get(init_attr.qp_type)
        if qp_type is None:
            raise PyverbsRDMAError(f"{what}: QP type {init_attr.qp_type}", errno.EOPNOTSUPP)
        srq = init_attr.srq
        ibsrq = None
        if srq is not None:
            if not isinstance(srq, SRQ):
                raise PyverbsUserError("srq must be a pyverbs.srq.SRQ")
            ibsrq = srq._alive(what)
        scq, rcq = init_attr.send_cq, init_attr.recv_cq
        if init_attr.qp_type == e.IBV_QPT_XRC_SEND and rcq is None:
            rcq = scq  # an XRC INI QP receives nothing: its recv CQ is moot
        if scq is None or rcq is None or scq.closed or rcq.closed:
            raise PyverbsRDMAError(f"{what}: send and receive CQs are needed", errno.EINVAL)
        ibpd = pd.alive(what)
        ib_init = ibqp.QpInitAttr(
            qp_type,
            scq.cq,
            rcq.cq,
            init_attr.cap.to_ib(),
            ibqp.IbSigType.ALL_WR if init_attr.sq_sig_all else ibqp.IbSigType.REQ_WR,
            srq=ibsrq,
        )
        try:
            self.qp: ibqp.QueuePair = ibpd.device.create_qp(ibpd, ib_init)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        sim.process().owners[self.qp] = pd.ctx  # its async events go there
        self.pd = pd
        self.init_attr = init_attr
        self.scq, self.rcq = scq, rcq
        self._ibv_qp_type = init_attr.qp_type
        pd.add_ref(self)
        scq.attach_qp(self)
        if rcq is not scq:
            rcq.attach_qp(self)
        if qp_attr is not None:
            if self._ibv_qp_type == e.IBV_QPT_UD:
                self.to_rts(qp_attr)
            else:
                self.to_init(qp_attr)

    def _init_xrc_tgt(
        self, ctx: Context, init_attr: QPInitAttrEx, qp_attr: QPAttr | None, what: str
    ) -> None:
        """``ibv_create_qp_ex`` of an ``IBV_QPT_XRC_RECV`` QP: on the XRCD
        of ``init_attr``, no PD, no CQs, no queues."""
        from pyverbs.xrcd import XRCD

        xrcd = init_attr.xrcd
        if not init_attr.comp_mask & e.IBV_QP_INIT_ATTR_XRCD or not isinstance(xrcd, XRCD):
            raise PyverbsRDMAError(f"{what}: an XRC RECV QP needs an XRCD", errno.EINVAL)
        ibxrcd = xrcd.alive(what)
        if ibxrcd.device is not ctx._alive():
            raise PyverbsRDMAError(f"{what}: XRCD of another device", errno.EINVAL)
        try:
            self.qp = ibxrcd.create_tgt_qp()
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        sim.process().owners[self.qp] = ctx
        self.pd = None
        self.init_attr = init_attr
        self.scq = self.rcq = None
        self._ibv_qp_type = init_attr.qp_type
        xrcd.add_ref(self)
        if qp_attr is not None:
            self.to_init(qp_attr)

    def __str__(self) -> str:
        return f"QP {self.qp_num:#x}, type {self.qp_type}, state {self.qp_state}"

    @property
    def qp_num(self) -> int:
        return self.qp.qp_num

    @property
    def qp_type(self) -> int:
        return self._ibv_qp_type

    @property
    def qp_state(self) -> int:
        return int(self.qp.state)

    def _alive(self, what: str) -> ibqp.QueuePair:
        if self.closed:
            raise PyverbsRDMAError(f"{what}: the QP is destroyed", errno.EINVAL)
        return self.qp

    # -- ibv_modify_qp --------------------------------------------------------

    def modify(self, qp_attr: QPAttr, comp_mask: int) -> None:
        """``ibv_modify_qp``."""
        self._modify(qp_attr, comp_mask, "Failed to modify QP")

    def _modify(self, qp_attr: QPAttr, mask: int, what: str) -> None:
        qp = self._alive(what)
        attr = qp_attr.to_ib(mask)
        try:
            qp.modify(attr, IbQpAttrMask(mask))
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        if mask & e.IBV_QP_STATE and qp_attr.qp_state == e.IBV_QPS_RESET:
            for cq in {id(c): c for c in (self.scq, self.rcq) if c is not None}.values():
                cq.clean_qp(qp.qp_num)

    def _mask(self, dst: str) -> int:
        return _MASKS[self._ibv_qp_type][dst] | e.IBV_QP_STATE

    def to_init(self, qp_attr: QPAttr) -> None:
        """RESET → INIT with the attributes of the QP type."""
        qp_attr.qp_state = e.IBV_QPS_INIT
        self._modify(qp_attr, self._mask("INIT"), "Failed to modify QP state to init")

    def to_rtr(self, qp_attr: QPAttr) -> None:
        """→ RTR (through INIT unless the QP is there)."""
        if self.qp_state != e.IBV_QPS_INIT:
            self.to_init(qp_attr)
        qp_attr.qp_state = e.IBV_QPS_RTR
        self._modify(qp_attr, self._mask("RTR"), "Failed to modify QP state to RTR")

    def to_rts(self, qp_attr: QPAttr) -> None:
        """→ RTS (through INIT and RTR unless the QP is in RTR)."""
        if self.qp_state != e.IBV_QPS_RTR:
            self.to_rtr(qp_attr)
        qp_attr.qp_state = e.IBV_QPS_RTS
        self._modify(qp_attr, self._mask("RTS"), "Failed to modify QP state to RTS")

    def query(self, attr_mask: int) -> tuple[QPAttr, QPInitAttr]:
        """``ibv_query_qp``: ``(QPAttr, QPInitAttr)``."""
        return _query_qp(self._alive("Failed to query QP"), self.init_attr)

    # -- posting ---------------------------------------------------------------------

    def post_recv(self, wr: RecvWR, bad_wr: RecvWR | None = None) -> None:
        """``ibv_post_recv`` of a WR chain."""
        what = "Failed to post recv"
        post_recv_chain(self._alive(what).post_recv, wr, bad_wr, what)

    def post_send(self, wr: SendWR, bad_wr: SendWR | None = None) -> None:
        """``ibv_post_send`` of a WR chain; the WRs before a bad one are
        posted, as in C."""
        what = "Failed to post send"
        if not isinstance(wr, SendWR):
            # Cython's typed argument: a TypeError, as pyverbs raises
            raise TypeError(
                f"Argument 'wr' has incorrect type (expected pyverbs.wr.SendWR, "
                f"got {type(wr).__name__})"
            )
        qp = self._alive(what)
        chain: list[SendWR] = []
        node: SendWR | None = wr
        while node is not None:
            chain.append(node)
            node = node.next_wr
        ibwrs: list[ibwr.SendWR] = []
        kbufs: list[int] = []
        host = qp.device.host
        try:
            for w in chain:
                try:
                    ibwrs.append(self._to_ib_send(w, kbufs))
                except PyverbsRDMAError:
                    if ibwrs:
                        qp.post_send(ibwrs)
                    if bad_wr is not None:
                        bad_wr.wr_id = w.wr_id
                    raise
            qp.post_send(ibwrs)
        except SoftRdmaError as ex:
            raise post_error(what, ex, chain, ibwrs, bad_wr) from None
        finally:
            for kva in kbufs:  # inline data was copied into the WQEs at post time
                host.kfree(kva)

    def _to_ib_send(self, w: SendWR, kbufs: list[int]) -> ibwr.SendWR:
        what = "Failed to post send"
        opcode = _SEND_OPCODES.get(w.opcode)
        if opcode is None:
            raise PyverbsRDMAError(f"{what}: opcode {w.opcode}", errno.EINVAL)
        if w.send_flags & ~_SEND_FLAGS:
            raise PyverbsRDMAError(f"{what}: send flags {w.send_flags:#x}", errno.EINVAL)
        flags = IbSendFlags(w.send_flags & _SEND_FLAGS)
        sgl = tuple(ib_sge(s) for s in w.sg_list)
        if flags & IbSendFlags.INLINE and sgl:
            # the provider copies inline data into the WQE: here, a kernel
            # buffer the driver reads at post time
            data = b"".join(sim.process().mm.read(s.addr, s.length) for s in w.sg_list)
            host = self.qp.device.host
            kva = host.kmalloc(max(1, len(data)))
            kbufs.append(kva)
            host.cpu_write(kva, data)
            sgl = (ibwr.Sge(kva, len(data), 0),)
        ib = self._to_ib_wr(w, opcode, sgl, flags, what)
        if self._ibv_qp_type == e.IBV_QPT_XRC_SEND:
            # the XRCETH's SRQ number (send_wr.qp_type.xrc.remote_srqn)
            return dataclasses.replace(ib, xrc_remote_srqn=w.remote_srqn & 0xFFFFFFFF)
        return ib

    def _to_ib_wr(
        self,
        w: SendWR,
        opcode: IbWrOpcode,
        sgl: tuple[ibwr.Sge, ...],
        flags: IbSendFlags,
        what: str,
    ) -> ibwr.SendWR:
        imm = socket.ntohl(w.imm_data & 0xFFFFFFFF)
        inv = w.imm_data & 0xFFFFFFFF
        if self._ibv_qp_type == e.IBV_QPT_UD:
            if w.ah is None or w.ah.closed:
                raise PyverbsRDMAError(f"{what}: a UD send needs an AH", errno.EINVAL)
            return ibwr.UdWR(
                w.wr_id,
                opcode,
                sgl,
                flags,
                imm_data=imm,
                ah=w.ah.ah,
                remote_qpn=w.remote_qpn,
                remote_qkey=w.remote_qkey,
            )
        if opcode in (IbWrOpcode.RDMA_WRITE, IbWrOpcode.RDMA_WRITE_WITH_IMM, IbWrOpcode.RDMA_READ):
            return ibwr.RdmaWR(
                w.wr_id, opcode, sgl, flags, imm_data=imm, remote_addr=w.remote_addr, rkey=w.rkey
            )
        if opcode in (IbWrOpcode.ATOMIC_CMP_AND_SWP, IbWrOpcode.ATOMIC_FETCH_AND_ADD):
            return ibwr.AtomicWR(
                w.wr_id,
                opcode,
                sgl,
                flags,
                remote_addr=w.remote_addr,
                compare_add=w.compare_add,
                swap=w.swap,
                rkey=w.rkey,
            )
        if opcode in (IbWrOpcode.SEND_WITH_INV, IbWrOpcode.LOCAL_INV):
            return ibwr.SendWR(w.wr_id, opcode, sgl, flags, invalidate_rkey=inv)
        if opcode is IbWrOpcode.BIND_MW:
            if w.bind is None:
                raise PyverbsRDMAError(f"{what}: BIND_MW without set_bind_wr", errno.EINVAL)
            mw, rkey, info = w.bind
            return _bind_wr(w.wr_id, flags, mw, rkey, info, what)
        return ibwr.SendWR(w.wr_id, opcode, sgl, flags, imm_data=imm)

    def bind_mw(self, mw: MW, mw_bind: MWBind) -> None:
        """``ibv_bind_mw`` of a type 1 window: a bind work request with the
        next key, ``inc_rkey(mw.rkey)``, which becomes the window's key once
        posted (rdma-core's rxe provider; an error completion leaves the
        caller to undo it). A type 2 window is ``EINVAL``."""
        what = "Failed to Bind MW"
        qp = self._alive(what)
        if not isinstance(mw, MW) or not isinstance(mw_bind, MWBind):
            raise PyverbsUserError("bind_mw takes an MW and an MWBind")
        if mw.mw_type != e.IBV_MW_TYPE_1 or mw.closed:
            raise PyverbsRDMAError(f"{what}: not a type 1 MW", errno.EINVAL)
        if mw_bind.send_flags & ~_SEND_FLAGS:
            raise PyverbsRDMAError(f"{what}: send flags {mw_bind.send_flags:#x}", errno.EINVAL)
        flags = IbSendFlags(mw_bind.send_flags & _SEND_FLAGS)
        rkey = inc_rkey(mw.rkey)
        wr = _bind_wr(mw_bind.wr_id, flags, mw, rkey, mw_bind.bind_info, what)
        try:
            qp.post_send(wr)
        except SoftRdmaError as ex:
            raise sim.rdma_error(what, ex) from None
        mw._rkey = rkey  # the provider's ibmw->rkey, at post time

    def query_ece(self) -> Any:
        """``ibv_query_ece``: no enhanced connection establishment."""
        raise PyverbsRDMAError("Failed to query ECE", errno.EOPNOTSUPP)

    def set_ece(self, ece: Any) -> None:
        """``ibv_set_ece``: no enhanced connection establishment."""
        raise PyverbsRDMAError("Failed to set ECE", errno.EOPNOTSUPP)

    def query_data_in_order(self, op: int, flags: int = 0) -> int:
        """``ibv_query_qp_data_in_order``: softrdma writes a message's data
        in order (1)."""
        return 1

    def _release(self) -> None:
        self.qp.destroy()


class QPEx(QP):
    """``struct ibv_qp_ex``: the extended post-send API (``ibv_wr_start``,
    ``ibv_wr_send`` / ``rdma_write`` / ``rdma_read`` / atomics / ...,
    ``ibv_wr_set_sge`` / ``set_ud_addr`` / ``set_inline_data``,
    ``ibv_wr_complete`` / ``ibv_wr_abort``). Create it on a Context with a
    ``QPInitAttrEx`` whose ``comp_mask`` has ``IBV_QP_INIT_ATTR_SEND_OPS_FLAGS``;
    only the operations of its ``send_ops_flags`` may be used. Work requests
    build up between ``wr_start`` and ``wr_complete``, which posts them all
    (the ones before a bad one are posted, as with ``post_send``)."""

    def __init__(
        self, creator: PD | Context, init_attr: QPInitAttr, qp_attr: QPAttr | None = None
    ) -> None:
        if not isinstance(init_attr, QPInitAttrEx) or not (
            init_attr.comp_mask & e.IBV_QP_INIT_ATTR_SEND_OPS_FLAGS
        ):
            raise PyverbsUserError("QPEx needs a QPInitAttrEx with send ops flags")
        super().__init__(creator, init_attr, qp_attr)
        self.send_ops_flags = init_attr.send_ops_flags
        self.ind_table = None  # RSS indirection tables are not supported
        self.wr_id = 0
        self.wr_flags = 0
        self._batch: list[SendWR] | None = None
        # FLUSH / ATOMIC WRITE arguments of the open batch's WRs, by id()
        self._a19: dict[int, bytes | tuple[int, int, int]] = {}

    def wr_start(self) -> None:
        """``ibv_wr_start``: begin a batch of work requests."""
        if self._batch is not None:
            raise PyverbsUserError("wr_start while a batch is open: wr_complete or wr_abort it")
        self._batch = []
        self._a19.clear()

    def _new(self, op_flag: int, opcode: int) -> SendWR:
        if self._batch is None:
            raise PyverbsUserError("No batch open: call wr_start first")
        if not self.send_ops_flags & op_flag:
            raise PyverbsUserError(f"The QP was not created with send op {op_flag:#x}")
        wr = SendWR(wr_id=self.wr_id, opcode=opcode, send_flags=self.wr_flags)
        self._batch.append(wr)
        return wr

    def _cur(self) -> SendWR:
        if not self._batch:
            raise PyverbsUserError("No work request to set: call an operation first")
        return self._batch[-1]

    def wr_send(self) -> None:
        self._new(e.IBV_QP_EX_WITH_SEND, e.IBV_WR_SEND)

    def wr_send_imm(self, imm_data: int) -> None:
        """SEND with immediate ``imm_data`` (host order, as ``ibv_wr_send_imm``
        takes a ``__be32`` the binding converts)."""
        wr = self._new(e.IBV_QP_EX_WITH_SEND_WITH_IMM, e.IBV_WR_SEND_WITH_IMM)
        wr.imm_data = socket.htonl(imm_data & 0xFFFFFFFF)

    def wr_send_inv(self, invalidate_rkey: int) -> None:
        wr = self._new(e.IBV_QP_EX_WITH_SEND_WITH_INV, e.IBV_WR_SEND_WITH_INV)
        wr.imm_data = invalidate_rkey

    def wr_local_inv(self, invalidate_rkey: int) -> None:
        wr = self._new(e.IBV_QP_EX_WITH_LOCAL_INV, e.IBV_WR_LOCAL_INV)
        wr.imm_data = invalidate_rkey

    def wr_rdma_write(self, rkey: int, remote_addr: int) -> None:
        self._new(e.IBV_QP_EX_WITH_RDMA_WRITE, e.IBV_WR_RDMA_WRITE).set_wr_rdma(rkey, remote_addr)

    def wr_rdma_write_imm(self, rkey: int, remote_addr: int, imm_data: int) -> None:
        wr = self._new(e.IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM, e.IBV_WR_RDMA_WRITE_WITH_IMM)
        wr.set_wr_rdma(rkey, remote_addr)
        wr.imm_data = socket.htonl(imm_data & 0xFFFFFFFF)

    def wr_rdma_read(self, rkey: int, remote_addr: int) -> None:
        self._new(e.IBV_QP_EX_WITH_RDMA_READ, e.IBV_WR_RDMA_READ).set_wr_rdma(rkey, remote_addr)

    def wr_atomic_cmp_swp(self, rkey: int, remote_addr: int, compare: int, swap: int) -> None:
        wr = self._new(e.IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP, e.IBV_WR_ATOMIC_CMP_AND_SWP)
        wr.set_wr_atomic(rkey, remote_addr, compare, swap)

    def wr_atomic_fetch_add(self, rkey: int, remote_addr: int, add: int) -> None:
        wr = self._new(e.IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD, e.IBV_WR_ATOMIC_FETCH_AND_ADD)
        wr.set_wr_atomic(rkey, remote_addr, add)

    def wr_bind_mw(self, mw: MW, rkey: int, bind_info: MWBindInfo) -> None:
        """``ibv_wr_bind_mw``: bind ``mw`` to the range of ``bind_info`` under
        the new key ``rkey`` (``inc_rkey`` of the window's: the key byte
        changes, the index stays). The window's ``rkey`` attribute is left
        as it is, as rdma-core's providers leave ``ibv_mw.rkey``; the bind
        takes effect, or fails with an error completion, in order with the
        other work requests."""
        if not isinstance(mw, MW) or not isinstance(bind_info, MWBindInfo):
            raise PyverbsUserError("wr_bind_mw takes an MW, a key and an MWBindInfo")
        wr = self._new(e.IBV_QP_EX_WITH_BIND_MW, e.IBV_WR_BIND_MW)
        wr.rkey = rkey & 0xFFFFFFFF
        wr.bind = (mw, wr.rkey, bind_info)

    def wr_atomic_write(self, rkey: int, remote_addr: int, atomic_wire_buf: bytes) -> None:
        """``ibv_wr_atomic_write``: store the 8 bytes of ``atomic_wire_buf``,
        as they are, at the 8-byte aligned ``remote_addr`` in one atomic write
        (RC ATOMIC WRITE; rxe's ``wr_atomic_write`` copies them into the WQE
        now). A misaligned target completes with ``IBV_WC_REM_INV_REQ_ERR``."""
        if not isinstance(atomic_wire_buf, bytes | bytearray | memoryview):
            raise PyverbsUserError("wr_atomic_write takes the 8 bytes to write")
        data = bytes(atomic_wire_buf)
        if len(data) != 8:
            raise PyverbsUserError(f"wr_atomic_write writes 8 bytes, got {len(data)}")
        wr = self._new(e.IBV_QP_EX_WITH_ATOMIC_WRITE, e.IBV_WR_ATOMIC_WRITE)
        wr.set_wr_rdma(rkey, remote_addr)
        self._a19[id(wr)] = data

    def wr_flush(self, rkey: int, remote_addr: int, length: int, ptype: int, level: int) -> None:
        """``ibv_wr_flush``: make ``length`` bytes at ``remote_addr``
        (``level`` ``IBV_FLUSH_RANGE``) or the whole MR of ``rkey``
        (``IBV_FLUSH_MR``) placed with ``ptype`` (``IBV_FLUSH_GLOBAL`` and /
        or ``IBV_FLUSH_PERSISTENT``) before it completes (RC FLUSH). The
        target MR and QP need the matching ``IBV_ACCESS_FLUSH_*`` flag, else
        it completes with ``IBV_WC_REM_ACCESS_ERR`` /
        ``IBV_WC_REM_INV_REQ_ERR``."""
        wr = self._new(e.IBV_QP_EX_WITH_FLUSH, e.IBV_WR_FLUSH)
        wr.set_wr_rdma(rkey, remote_addr)
        self._a19[id(wr)] = (length, ptype, level)

    def _to_ib_send(self, w: SendWR, kbufs: list[int]) -> ibwr.SendWR:
        """The FLUSH / ATOMIC WRITE work requests only ``QPEx`` builds
        (``ibv_send_wr`` has no fields for them); the rest as :class:`QP`."""
        a19 = self._a19.get(id(w)) if w.opcode in (e.IBV_WR_FLUSH, e.IBV_WR_ATOMIC_WRITE) else None
        if a19 is None:
            return super()._to_ib_send(w, kbufs)
        what = "Failed to post send"
        if w.send_flags & ~_SEND_FLAGS:
            raise PyverbsRDMAError(f"{what}: send flags {w.send_flags:#x}", errno.EINVAL)
        # no local data: an inline flag has nothing to copy
        flags = IbSendFlags(w.send_flags & _SEND_FLAGS & ~e.IBV_SEND_INLINE)
        if isinstance(a19, bytes):
            return ibwr.AtomicWriteWR(
                w.wr_id,
                IbWrOpcode.ATOMIC_WRITE,
                (),
                flags,
                remote_addr=w.remote_addr,
                rkey=w.rkey,
                atomic_wr=a19,
            )
        length, ptype, level = a19
        return ibwr.FlushWR(
            w.wr_id,
            IbWrOpcode.FLUSH,
            (),
            flags,
            remote_addr=w.remote_addr,
            rkey=w.rkey,
            flush_len=length,
            placement_type=ptype,
            level=level,
        )

    def wr_send_tso(self, hdr: bytes, hdr_sz: int, mss: int) -> None:
        raise PyverbsRDMAError("Failed to post TSO send", errno.EOPNOTSUPP)

    def wr_set_xrc_srqn(self, remote_srqn: int) -> None:
        """``ibv_wr_set_xrc_srqn``: the current WR's remote XRC SRQ."""
        self._cur().set_qp_type_xrc(remote_srqn)

    def wr_set_sge(self, sge: SGE) -> None:
        """``ibv_wr_set_sge``: the current WR's one SGE."""
        self._cur().sg_list = [sge]

    def wr_set_sge_list(self, sg_list: list[SGE]) -> None:
        """``ibv_wr_set_sge_list``."""
        self._cur().sg_list = list(sg_list)

    def wr_set_inline_data(self, addr: int, length: int) -> None:
        """``ibv_wr_set_inline_data``: ``length`` bytes at user address ``addr``."""
        wr = self._cur()
        wr.sg_list = [SGE(addr, length, 0)]
        wr.send_flags |= e.IBV_SEND_INLINE

    def wr_set_inline_data_list(self, buf_list: list[tuple[int, int]]) -> None:
        """``ibv_wr_set_inline_data_list`` of ``(addr, length)`` pairs."""
        wr = self._cur()
        wr.sg_list = [SGE(addr, length, 0) for addr, length in buf_list]
        wr.send_flags |= e.IBV_SEND_INLINE

    def wr_set_ud_addr(self, ah: AH, remote_qpn: int, remote_qkey: int) -> None:
        """``ibv_wr_set_ud_addr``."""
        self._cur().set_wr_ud(ah, remote_qpn, remote_qkey)

    def wr_complete(self) -> None:
        """``ibv_wr_complete``: post the batch."""
        batch, self._batch = self._batch, None
        if batch is None:
            raise PyverbsUserError("wr_complete without wr_start")
        if not batch:
            return
        for a, b in itertools.pairwise(batch):
            a.next_wr = b
        try:
            self.post_send(batch[0])
        except PyverbsRDMAError as ex:
            raise PyverbsRDMAError("Failed to complete the work requests", ex.error_code) from None
        finally:
            for wr in batch:
                wr.next_wr = None
            self._a19.clear()

    def wr_abort(self) -> None:
        """``ibv_wr_abort``: drop the batch."""
        self._batch = None
        self._a19.clear()


_SEND_OPS: dict[int, int] = {
    e.IBV_QPT_RC: e.IBV_QP_EX_WITH_RDMA_WRITE
    | e.IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM
    | e.IBV_QP_EX_WITH_SEND
    | e.IBV_QP_EX_WITH_SEND_WITH_IMM
    | e.IBV_QP_EX_WITH_RDMA_READ
    | e.IBV_QP_EX_WITH_ATOMIC_CMP_AND_SWP
    | e.IBV_QP_EX_WITH_ATOMIC_FETCH_AND_ADD
    | e.IBV_QP_EX_WITH_LOCAL_INV
    | e.IBV_QP_EX_WITH_BIND_MW
    | e.IBV_QP_EX_WITH_SEND_WITH_INV
    | e.IBV_QP_EX_WITH_FLUSH
    | e.IBV_QP_EX_WITH_ATOMIC_WRITE,
    e.IBV_QPT_UC: e.IBV_QP_EX_WITH_RDMA_WRITE
    | e.IBV_QP_EX_WITH_RDMA_WRITE_WITH_IMM
    | e.IBV_QP_EX_WITH_SEND
    | e.IBV_QP_EX_WITH_SEND_WITH_IMM
    | e.IBV_QP_EX_WITH_LOCAL_INV
    | e.IBV_QP_EX_WITH_BIND_MW
    | e.IBV_QP_EX_WITH_SEND_WITH_INV,
    e.IBV_QPT_UD: e.IBV_QP_EX_WITH_SEND | e.IBV_QP_EX_WITH_SEND_WITH_IMM,
}
# XRC has no FLUSH / ATOMIC WRITE opcodes (IBTA annex A19 defines them for RC).
_SEND_OPS[e.IBV_QPT_XRC_SEND] = _SEND_OPS[e.IBV_QPT_RC] & ~(
    e.IBV_QP_EX_WITH_FLUSH | e.IBV_QP_EX_WITH_ATOMIC_WRITE
)


def _check_send_ops(qp_type: int, flags: int, what: str) -> None:
    """The send operations a QP type supports here (as rxe's
    ``check_qp_init_attr_ex`` does for its own)."""
    unsupported = flags & ~_SEND_OPS.get(qp_type, 0)
    if unsupported:
        raise PyverbsRDMAError(f"{what}: send ops {unsupported:#x}", errno.EOPNOTSUPP)


def _bind_wr(
    wr_id: int, flags: IbSendFlags, mw: MW, rkey: int, info: MWBindInfo, what: str
) -> ibwr.BindMwWR:
    """The IB_WR_BIND_MW work request of ``ibv_bind_mw`` / ``bind_mw``."""
    if mw.closed or (info.length and (info.mr is None or info.mr.closed)):
        raise PyverbsRDMAError(f"{what}: the MW or MR is closed", errno.EINVAL)
    access = ibv_access_to_ib(info.mw_access_flags, what)
    return ibwr.BindMwWR(
        wr_id,
        IbWrOpcode.BIND_MW,
        (),
        flags,
        mw=mw.mw,
        mw_rkey=mw.mw.rkey,
        rkey=rkey,
        mr=info.mr.mr if info.length else None,
        addr=info.addr,
        bind_length=info.length,
        mw_access=access,
    )


def _query_qp(qp: ibqp.QueuePair, init_attr: QPInitAttr) -> tuple[QPAttr, QPInitAttr]:
    """``ibv_query_qp`` of ``qp``, created with ``init_attr``: its
    attributes and its init attributes with the capabilities it got (a QP's
    or a CM ID's, which ``rdma_create_qp`` made)."""
    attr, _ = qp.query()
    init = copy.copy(init_attr)
    init.cap = QPCap(
        qp.cap.max_send_wr,
        qp.cap.max_recv_wr,
        qp.cap.max_send_sge,
        qp.cap.max_recv_sge,
        qp.cap.max_inline_data,
    )
    return QPAttr.from_ib(attr, qp.cap), init
