"""One UC (unreliable connected) queue pair's transport, sans-IO.

Kernel counterpart: the ``IB_QPT_UC`` paths of ``drivers/infiniband/sw/rxe``
— ``rxe_req.c`` (``next_opcode_uc``: SEND and RDMA WRITE, with and without
immediate, segmented at the path MTU; the WQE is done once its last packet
is out), ``rxe_resp.c`` (``check_psn`` / ``check_op_seq`` for UC and the
class D / D1 / E errors: ``drop_msg``, ``do_class_d1e_error``).

UC is connected like RC (one peer QP, PSNs, SEND / WRITE segmentation, the
same BTH / RETH / ImmDt headers with the UC opcodes 0x20..0x2B) but has no
ACKs, no retransmission, no READ and no atomics. On the receive side:

* a PSN gap drops the rest of the message being received; the next FIRST
  or ONLY packet, at whatever PSN, starts over (IBTA 9.8.3.2, rxe
  ``check_psn``'s ``drop_msg``);
* a MIDDLE / LAST without a FIRST is dropped with the rest of its message;
* a new FIRST / ONLY while a message is open aborts the open one (class
  D1): its receive WQE is used again from the start — or, taken off an
  SRQ, completes with ``IB_WC_REM_INV_REQ_ERR`` (class E) — and the new
  packet starts the next message (rxe drops that packet too; IBTA allows
  it to start a message, which is what a UC sender expects);
* no receive WQE, an R_Key violation, a bad length: the message is dropped
  silently (class D), the QP stays in RTS;
* a fault on the receive WQE's own memory is class A: the WQE completes in
  error and the QP enters ERR, as for RC.

The facade is :class:`~softrdma.transport.ud.UdQp`'s: ``modify``,
``post_send`` / ``post_recv``, ``poll(now)``, ``receive(pkt, now)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from softrdma.transport.headers import ImmDt, Reth
from softrdma.transport.memory_port import (
    LocalAccessError,
    LocalSgl,
    RemoteAccessError,
    RemoteMr,
)
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode, OpcodeInfo, Transport
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.qp_base import NoAckQp, send_wc
from softrdma.transport.recv_wqe import recv_scatter, take_recv_wqe
from softrdma.transport.requester import MAX_PKT_PER_ACK
from softrdma.transport.wqe import (
    WR_IMM,
    WR_LOCAL,
    WR_WRITE,
    Completion,
    CqSide,
    OutPacket,
    QpFatal,
    SendWqe,
)
from softrdma.verbs.enums import (
    IbAccess,
    IbQpAttrMask,
    IbQpState,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
)
from softrdma.verbs.qp import QpAttr, apply_qp_attr
from softrdma.verbs.wr import BindMwWR, RdmaWR, RecvWR, RegWR, WorkCompletion

__all__ = ["UcQp", "UcRespInfo"]

_UC = Transport.UC
_UC_OFFSET: Final = Opcode.UC_SEND_FIRST - Opcode.RC_SEND_FIRST
"""A UC SEND / WRITE opcode is its RC opcode plus this (IBTA table 38)."""
_RECV_STATES = frozenset({IbQpState.RTR, IbQpState.RTS, IbQpState.SQD, IbQpState.SQE})
_SEND_OPEN = frozenset({Opcode.UC_SEND_FIRST, Opcode.UC_SEND_MIDDLE})
_WRITE_OPEN = frozenset({Opcode.UC_RDMA_WRITE_FIRST, Opcode.UC_RDMA_WRITE_MIDDLE})
_SEND_CONT = frozenset(
    {Opcode.UC_SEND_MIDDLE, Opcode.UC_SEND_LAST, Opcode.UC_SEND_LAST_WITH_IMMEDIATE}
)
_WRITE_CONT = frozenset(
    {
        Opcode.UC_RDMA_WRITE_MIDDLE,
        Opcode.UC_RDMA_WRITE_LAST,
        Opcode.UC_RDMA_WRITE_LAST_WITH_IMMEDIATE,
    }
)
_REMOTE_WRITE = int(IbAccess.REMOTE_WRITE)
_SOLICITED = int(IbSendFlags.SOLICITED)
_MAX_DMA_LEN = 1 << 31
_NO_OPCODE = -1


@dataclass(slots=True)
class UcRespInfo:
    """The UC responder's state (the UC part of rxe's ``struct
    rxe_resp_info``): the PSN expected, the opcode of the last packet taken
    (``-1``: no message open), ``drop_msg``, the receive WQE being filled
    and the WRITE being executed."""

    psn: int = 0
    opcode: int = _NO_OPCODE
    drop_msg: bool = False
    wqe: RecvWR | None = None
    sgl: LocalSgl | None = None
    recv_offset: int = 0
    mr: RemoteMr | None = None
    va: int = 0
    resid: int = 0
    length: int = 0


class UcQp(NoAckQp):
    """One UC QP (rxe ``struct rxe_qp`` for ``IB_QPT_UC``): see the module
    docstring and :class:`~softrdma.transport.qp_base.NoAckQp`."""

    transport = "UC"

    def _init_transport(self) -> None:
        super()._init_transport()
        self.noack_pkts = 0
        self.mtu = self.attr.path_mtu.size
        self.access = int(self.attr.qp_access_flags)
        self.resp = UcRespInfo()

    # -- ib_modify_qp -----------------------------------------------------------------

    def modify(self, attr: QpAttr, mask: int) -> None:
        """Apply ``ib_modify_qp`` (rxe_qp.c ``rxe_qp_from_attr``), validated
        by the verbs layer: RTR expects ``rq_psn``, RTS sends from
        ``sq_psn``; SQD reports drained at the next poll (nothing waits for
        an ACK); ERR flushes; RESET empties the queues."""
        old = self.state
        apply_qp_attr(self.attr, attr, mask)
        a = self.attr
        self.mtu = a.path_mtu.size
        self.access = int(a.qp_access_flags)
        new = a.qp_state if mask & IbQpAttrMask.STATE else old
        if new is IbQpState.RESET:
            self._clear()
            self.resp = UcRespInfo()
            return
        if new is IbQpState.ERR:
            if old is not IbQpState.ERR:
                self._enter_error()
            return
        if new is IbQpState.RTR and old is IbQpState.INIT:
            self.resp = UcRespInfo(psn=a.rq_psn)
        elif new is IbQpState.RTS and old is IbQpState.RTR:
            self.psn = a.sq_psn
            self.noack_pkts = 0
        elif new is IbQpState.SQD and old is not IbQpState.SQD:
            self._drain_pending = True
        self.state = new

    def _enter_error(self) -> None:
        super()._enter_error()
        self.resp = UcRespInfo()

    def _recv_in_progress(self) -> list[RecvWR]:
        wqe = self.resp.wqe
        return [wqe] if wqe is not None and self.srq is not None else []

    def _fatal(self, status: IbWcStatus, reason: str) -> None:
        """rxe_qp.c ``rxe_qp_error`` after a class A error."""
        self.out.events.append(QpFatal(status, reason))
        self._enter_error()

    # -- requester (rxe_req.c for IB_QPT_UC) -----------------------------------------

    def _complete_send(self, wqe: SendWqe, status: IbWcStatus) -> None:
        """rxe_comp.c ``do_complete`` for a UC WQE: done when its last packet
        is out, or failed (then the QP enters ERR, the rest flushes)."""
        wc = send_wc(wqe, status, self.qpn, self.sq_sig_all)
        if wc is not None:
            self.out.completions.append(Completion(CqSide.SEND, wc))
        if status is not IbWcStatus.SUCCESS:
            self._fatal(status, f"UC send WQE failed: {status.name}")

    def _send_one(self, wqe: SendWqe) -> None:
        """rxe_req.c ``rxe_requester`` for a UC WQE: its packets, segmented
        at the path MTU, all at once (no window, no ACK)."""
        wr = wqe.wr
        mask = wqe.mask
        if mask & WR_LOCAL:
            try:
                if isinstance(wr, RegWR):
                    self.mem.reg_mr(wr)
                elif isinstance(wr, BindMwWR):
                    self.mem.bind_mw(wr)
                else:
                    self.mem.local_invalidate(wr.invalidate_rkey)
            except LocalAccessError as e:
                self._complete_send(wqe, e.status)
                return
            self._complete_send(wqe, IbWcStatus.SUCCESS)
            return
        first_op, middle_op, last_op, only_op = (op + _UC_OFFSET for op in wqe.ops)
        n = wqe.length
        mtu = self.mtu
        inline = wqe.inline_data
        view = memoryview(inline) if inline is not None else None
        is_write = bool(mask & WR_WRITE)
        imm = ImmDt(wr.imm_data) if mask & WR_IMM else None
        se = bool(wqe.send_flags & _SOLICITED)
        dest = self.attr.dest_qp_num
        out = self.out.packets
        offset = 0
        while True:
            k = min(mtu, n - offset)
            first = offset == 0
            last = offset + k >= n
            if view is not None:
                payload: bytes | bytearray | memoryview = view[offset : offset + k]
            elif k:
                try:
                    payload = self.mem.gather(wr.sg_list, offset, k)
                except LocalAccessError as e:
                    # What was sent stays sent: the peer drops the message
                    # when the next one starts (class D1).
                    self._complete_send(wqe, e.status)
                    return
            else:
                payload = b""
            op = (only_op if last else first_op) if first else (last_op if last else middle_op)
            self.noack_pkts += 1
            ack_req = last or self.noack_pkts > MAX_PKT_PER_ACK
            if ack_req:
                self.noack_pkts = 0
            reth = None
            if first and is_write:
                assert isinstance(wr, RdmaWR)
                reth = Reth(wr.remote_addr, wr.rkey, n)
            pkt = Packet.build(
                op,
                dest_qp=dest,
                psn=self.psn,
                payload=payload,
                pkey=self.pkey,
                se=se and last,
                ack_req=ack_req,
                reth=reth,
                immdt=imm if last else None,
            )
            self.psn = (self.psn + 1) & PSN_MASK
            out.append(OutPacket(pkt))
            offset += k
            if last:
                break
        self._complete_send(wqe, IbWcStatus.SUCCESS)

    # -- responder (rxe_resp.c for IB_QPT_UC) ----------------------------------------

    def receive(self, pkt: Packet, now: float) -> None:
        """Take one packet addressed to this QP (rxe ``rxe_rcv`` →
        ``rxe_responder``). Opcodes of another transport and packets the
        state does not accept are dropped (``check_type_state``)."""
        info = OPCODE_TABLE[pkt.bth.opcode]
        if info is None or info.qp_type is not _UC or self.state not in _RECV_STATES:
            return
        resp = self.resp
        op = pkt.bth.opcode
        start = info.is_first or info.is_only
        # check_psn: a gap drops the rest of the message; a start resyncs.
        if resp.drop_msg or pkt.bth.psn != resp.psn:
            if not start:
                resp.drop_msg = True
                return
            resp.drop_msg = False
        # check_op_seq
        if resp.opcode in _SEND_OPEN or resp.opcode in _WRITE_OPEN:
            cont = _SEND_CONT if resp.opcode in _SEND_OPEN else _WRITE_CONT
            if op not in cont:
                self._abort_message()  # class D1 / E
                if not start:
                    resp.drop_msg = True
                    return
        elif not start:
            resp.drop_msg = True  # MIDDLE / LAST without a FIRST
            return
        # check_op_valid
        if info.is_write and not self.access & _REMOTE_WRITE:
            self._drop_message()
            return
        # check_resource
        if info.consumes_recv_wqe and not take_recv_wqe(
            self.resp, self.rq, self.srq, self.out.events
        ):
            self._drop_message()  # class D: no receive WQE (no RNR on UC)
            return
        if not self._check_length(pkt, info):
            self._drop_message()
            return
        if info.is_write and not self._check_rkey(pkt):
            self._drop_message()
            return
        self._execute(pkt, info)

    def _check_length(self, pkt: Packet, info: OpcodeInfo) -> bool:
        """rxe ``rxe_resp_check_length``; a WRITE packet must carry exactly
        its share of what the RETH announced."""
        n = len(pkt.payload)
        mtu = self.mtu
        if info.is_only:
            ok = n <= mtu
        elif info.is_first or info.is_middle:
            ok = n == mtu
        else:
            ok = 0 < n <= mtu
        reth = pkt.reth
        if reth is not None and reth.dma_len > _MAX_DMA_LEN:
            return False
        if ok and info.is_write:
            resid = reth.dma_len if reth is not None else self.resp.resid
            ok = n == min(mtu, resid) if not (info.is_last or info.is_only) else n == resid
        return ok

    def _check_rkey(self, pkt: Packet) -> bool:
        resp = self.resp
        reth = pkt.reth
        if reth is None:
            return resp.mr is not None or resp.resid == 0
        resp.va = reth.va
        resp.resid = resp.length = reth.dma_len
        if reth.dma_len == 0:
            resp.mr = None  # C9-88: no R_Key check for a zero-length WRITE
            return True
        try:
            resp.mr = self.mem.check_rkey(reth.rkey, reth.va, reth.dma_len, _REMOTE_WRITE)
        except RemoteAccessError:
            resp.mr = None
            return False
        return True

    def _execute(self, pkt: Packet, info: OpcodeInfo) -> None:
        resp = self.resp
        payload = pkt.payload
        n = len(payload)
        if info.is_send:
            if n:
                try:
                    recv_scatter(resp, self.mem, payload)
                except LocalAccessError as e:
                    if e.status is IbWcStatus.LOC_LEN_ERR:
                        self._drop_message()  # too long for the buffer: class D
                        return
                    self._complete_recv(e.status, pkt, info)  # class A
                    self._fatal(e.status, "UC receive WQE fault")
                    return
        elif n:
            mr = resp.mr
            assert mr is not None  # _check_rkey() kept it
            try:
                mr.write(resp.va, payload)
            except RemoteAccessError:
                self._drop_message()
                return
            resp.va += n
            resp.resid -= n
        resp.psn = (pkt.bth.psn + 1) & PSN_MASK
        resp.opcode = pkt.bth.opcode
        if info.is_last or info.is_only:
            resp.mr = None
            resp.opcode = _NO_OPCODE
            if info.completes:
                self._complete_recv(IbWcStatus.SUCCESS, pkt, info)

    def _complete_recv(self, status: IbWcStatus, pkt: Packet, info: OpcodeInfo) -> None:
        """rxe_resp.c ``do_complete``."""
        resp = self.resp
        wqe = resp.wqe
        if wqe is None:
            return
        if status is not IbWcStatus.SUCCESS:
            wc = WorkCompletion(wqe.wr_id, status, IbWcOpcode.RECV, self.qpn)
        elif info.is_write:
            imm = pkt.immdt.imm if pkt.immdt is not None else 0
            wc = WorkCompletion(
                wqe.wr_id, status, IbWcOpcode.RECV_RDMA_WITH_IMM, self.qpn, resp.length,
                IbWcFlags.WITH_IMM, imm,
            )  # fmt: skip
        else:
            flags = IbWcFlags(0)
            imm = 0
            if pkt.immdt is not None:
                flags = IbWcFlags.WITH_IMM
                imm = pkt.immdt.imm
            wc = WorkCompletion(
                wqe.wr_id, status, IbWcOpcode.RECV, self.qpn, resp.recv_offset, flags, imm
            )
        self.out.completions.append(Completion(CqSide.RECV, wc, pkt.bth.se))
        if self.srq is None:
            self.rq.popleft()
        resp.wqe = None
        resp.sgl = None
        resp.recv_offset = 0

    def _abort_message(self) -> None:
        """rxe_resp.c ``do_class_d1e_error``: the open message is lost. Its
        receive WQE starts over for the next message (class D1) — or, taken
        off an SRQ, completes with ``IB_WC_REM_INV_REQ_ERR`` (class E)."""
        resp = self.resp
        wqe = resp.wqe
        if wqe is not None:
            if self.srq is not None:
                wc = WorkCompletion(
                    wqe.wr_id, IbWcStatus.REM_INV_REQ_ERR, IbWcOpcode.RECV, self.qpn
                )
                self.out.completions.append(Completion(CqSide.RECV, wc))
                resp.wqe = None
            resp.sgl = None
            resp.recv_offset = 0
        resp.mr = None
        resp.opcode = _NO_OPCODE

    def _drop_message(self) -> None:
        """Class D: drop this packet and the rest of its message (counted as
        ``uc_msg_dropped``: UC tells neither side)."""
        self._abort_message()
        self.resp.drop_msg = True
        self.out.counters["uc_msg_dropped"] += 1
