"""One UD queue pair's transport, sans-IO.

Kernel counterpart: the UD paths of ``drivers/infiniband/sw/rxe`` —
``rxe_req.c`` (``next_opcode`` for ``IB_QPT_UD`` / ``IB_QPT_GSI``,
``init_req_packet`` filling the DETH), ``rxe_recv.c`` (``check_keys``: the
Q_Key check) and ``rxe_resp.c`` (``execute`` putting the 40-byte GRH / IP
header in front of the payload, ``do_complete`` with ``IB_WC_GRH`` and
``src_qp``).

UD is unreliable and unconnected: every message is one SEND_ONLY (or
SEND_ONLY_WITH_IMMEDIATE) packet with a DETH, there are no ACKs, no PSN
checks and no retries. A send completes as soon as its packet is handed to
the device. On the receive side a wrong Q_Key, a missing receive WQE or a
receive buffer too small for GRH + payload drops the packet silently (IBTA
class D; rxe does the same).

The same facade as :class:`~softrdma.transport.rc.RcTransport`, with the
receive also taking the packet's source and destination GIDs (for the GRH)::

    ud = UdTransport(qpn, memport)
    ud.modify(params, IbQpState.RTS)
    ud.post_send(SendWqe.from_wr(UdWR(...)))
    out = ud.poll(now)                 # packets carry a UdDest (AH, QPN, Q_Key)
    ud.receive(pkt, now, sgid=..., dgid=...)

Deviation from rxe / IBTA C10-93.1.1: a message longer than the path MTU
completes with ``IB_WC_LOC_LEN_ERR`` (rxe silently pretends to send it, as
the spec allows) — a silent loss is the harder bug to find.
"""

from __future__ import annotations

import struct
from collections import Counter, deque

from softrdma.transport.headers import GSI_QKEY, Deth, ImmDt
from softrdma.transport.memory_port import LocalAccessError, MemoryPort
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.params import QpParams
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.wqe import (
    WR_IMM,
    Completion,
    CqSide,
    OutPacket,
    Output,
    QpFatal,
    SendWqe,
    SqDrained,
    UdDest,
)
from softrdma.verbs.enums import (
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.wr import RecvWR, UdWR, WorkCompletion

__all__ = ["GRH_SIZE", "UdTransport", "make_grh"]

GRH_SIZE = 40
"""Bytes of GRH (or zero padding + IPv4 header) in front of every UD receive
(``sizeof(union rdma_network_hdr)``)."""

_V4_PREFIX = bytes(10) + b"\xff\xff"
_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_IPV6 = struct.Struct(">IHBB16s16s")
_UDP_ICRC = 8 + 4  # UDP header + ICRC around the IB transport bytes
_RECV_STATES = (IbQpState.RTR, IbQpState.RTS, IbQpState.SQD, IbQpState.SQE)


def _csum(hdr: bytes) -> int:
    s: int = sum(struct.unpack(f">{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def make_grh(sgid: bytes, dgid: bytes, ib_len: int, hop_limit: int = 64) -> bytes:
    """The 40 bytes a UD receive gets in front of the payload, as rxe writes
    them (rxe_resp.c ``execute``; ``union rdma_network_hdr``): for IPv4-mapped
    GIDs 20 zero bytes then the IPv4 header, otherwise the IPv6 header.
    ``ib_len`` is the IB transport length (BTH .. pad) of the packet; the
    headers are those of a RoCEv2 packet from ``sgid`` to ``dgid``."""
    if len(sgid) != 16 or len(dgid) != 16:
        raise ValueError("GIDs are 16 bytes")
    udp_len = ib_len + _UDP_ICRC
    if sgid.startswith(_V4_PREFIX) and dgid.startswith(_V4_PREFIX):
        fields = [0x45, 0, 20 + udp_len, 0, 0x4000, hop_limit, 17, 0, sgid[12:], dgid[12:]]
        fields[7] = _csum(_IPV4.pack(*fields))
        return bytes(20) + _IPV4.pack(*fields)
    return _IPV6.pack(6 << 28, udp_len, 17, hop_limit, sgid, dgid)


class UdTransport:
    """The transport of one UD (or GSI) QP."""

    def __init__(self, qpn: int, mem: MemoryPort, counters: Counter[str] | None = None) -> None:
        self.qpn = qpn
        self.mem = mem
        self.params = QpParams(qpn, IbQpType.UD)
        self.qp_state = IbQpState.RESET
        self.sq: deque[SendWqe] = deque()
        self.rq: deque[RecvWR] = deque()
        self.psn = 0
        self._out = Output(counters=Counter() if counters is None else counters)
        self._drain_pending = False

    @property
    def state(self) -> IbQpState:
        """The verbs QP state last set with :meth:`modify`."""
        return self.qp_state

    @property
    def sq_outstanding(self) -> int:
        """Send WQEs posted and not yet completed."""
        return len(self.sq)

    @property
    def rq_outstanding(self) -> int:
        """Receive WQEs posted and not yet completed."""
        return len(self.rq)

    def modify(self, params: QpParams, new_state: IbQpState) -> None:
        """Apply ``ib_modify_qp`` (rxe_qp.c ``rxe_qp_from_attr``). RTS starts
        sending at ``sq_psn``; SQD reports ``SqDrained`` at the next poll
        (UD has nothing outstanding)."""
        if params.qpn != self.qpn or params.qp_type is IbQpType.RC:
            raise ValueError(f"UD QP {self.qpn:#x} got parameters for {params!r}")
        old = self.qp_state
        self.params = params
        if new_state is IbQpState.RESET:
            self.sq.clear()
            self.rq.clear()
        elif new_state is IbQpState.RTS and old not in (IbQpState.RTS, IbQpState.SQD):
            self.psn = params.sq_psn
        elif new_state is IbQpState.SQD and old is not IbQpState.SQD:
            self._drain_pending = True
        self.qp_state = new_state

    def post_send(self, wqe: SendWqe) -> None:
        """Queue a send WQE; in ERR it completes at once with WR_FLUSH_ERR."""
        if self.qp_state is IbQpState.RESET:
            raise ValueError(f"QP {self.qpn:#x}: post_send in RESET")
        if self.qp_state is IbQpState.ERR:
            self._complete_send(wqe, IbWcStatus.WR_FLUSH_ERR)
            return
        self.sq.append(wqe)

    def post_recv(self, wr: RecvWR) -> None:
        """Queue a receive WQE; in ERR it completes at once with WR_FLUSH_ERR."""
        if self.qp_state is IbQpState.RESET:
            raise ValueError(f"QP {self.qpn:#x}: post_recv in RESET")
        if self.qp_state is IbQpState.ERR:
            wc = WorkCompletion(wr.wr_id, IbWcStatus.WR_FLUSH_ERR, IbWcOpcode.RECV, self.qpn)
            self._out.completions.append(Completion(CqSide.RECV, wc))
            return
        self.rq.append(wr)

    def _complete_send(self, wqe: SendWqe, status: IbWcStatus) -> None:
        """rxe_comp.c ``do_complete`` for a UD WQE (signaled or failed)."""
        ok = status is IbWcStatus.SUCCESS
        if ok and not (wqe.signaled or self.params.sq_sig_all):
            return
        wc = WorkCompletion(
            wqe.wr.wr_id,
            status,
            IbWcOpcode.SEND,
            self.qpn,
            wqe.length if ok else 0,
            IbWcFlags.WITH_IMM if ok and wqe.mask & WR_IMM else IbWcFlags(0),
        )
        self._out.completions.append(Completion(CqSide.SEND, wc))

    def _send_one(self, wqe: SendWqe) -> None:
        """rxe_req.c ``rxe_requester`` for a UD QP: one SEND_ONLY packet."""
        wr = wqe.wr
        p = self.params
        if not isinstance(wr, UdWR) or wqe.opcode not in (
            IbWrOpcode.SEND,
            IbWrOpcode.SEND_WITH_IMM,
        ):
            self._complete_send(wqe, IbWcStatus.LOC_QP_OP_ERR)
            return
        n = wqe.length
        if n > p.path_mtu:
            self._complete_send(wqe, IbWcStatus.LOC_LEN_ERR)
            return
        if wqe.inline_data is not None:
            payload: bytes | bytearray | memoryview = wqe.inline_data
        elif n:
            try:
                payload = self.mem.gather(wr.sg_list, 0, n)
            except LocalAccessError as e:
                self._complete_send(wqe, e.status)
                return
        else:
            payload = b""
        # IBTA: a Q_Key with the high bit set means "use the QP's own";
        # the GSI QP always sends the well-known QP1 Q_Key.
        if self.qpn == 1:
            qkey = GSI_QKEY
        elif wr.remote_qkey & 0x80000000:
            qkey = p.qkey
        else:
            qkey = wr.remote_qkey
        imm = wqe.opcode is IbWrOpcode.SEND_WITH_IMM
        pkt = Packet.build(
            Opcode.UD_SEND_ONLY_WITH_IMMEDIATE if imm else Opcode.UD_SEND_ONLY,
            dest_qp=wr.remote_qpn,
            psn=self.psn,
            payload=payload,
            pkey=p.pkey,
            se=bool(wr.send_flags & IbSendFlags.SOLICITED),
            deth=Deth(qkey, self.qpn),
            immdt=ImmDt(wr.imm_data) if imm else None,
        )
        self.psn = (self.psn + 1) & PSN_MASK
        self._out.packets.append(OutPacket(pkt, UdDest(wr, wr.remote_qpn, qkey)))
        self._complete_send(wqe, IbWcStatus.SUCCESS)

    def receive(
        self,
        pkt: Packet,
        now: float,
        sgid: bytes = bytes(16),
        dgid: bytes = bytes(16),
        network_hdr: bytes | None = None,
    ) -> None:
        """Take one packet addressed to this QP. ``sgid`` / ``dgid`` are the
        packet's source and destination GIDs (IP addresses as GIDs) for the
        GRH; ``network_hdr`` the exact 40 bytes to use instead, if the device
        has them. Non-UD opcodes, a wrong Q_Key (rxe_recv.c ``check_keys``),
        no posted receive, or a receive buffer too small drop the packet."""
        if self.qp_state not in _RECV_STATES:
            return
        op = pkt.bth.opcode
        if op != Opcode.UD_SEND_ONLY and op != Opcode.UD_SEND_ONLY_WITH_IMMEDIATE:
            return
        deth = pkt.deth
        if deth is None:
            return
        expected = GSI_QKEY if self.qpn == 1 else self.params.qkey
        if deth.qkey != expected or not self.rq:
            return
        wr = self.rq[0]
        payload = pkt.payload
        total = GRH_SIZE + len(payload)
        if wr.length < total:
            return  # class D: too long for the receive buffer, dropped
        if network_hdr is not None:
            if len(network_hdr) != GRH_SIZE:
                raise ValueError("network_hdr must be 40 bytes")
            grh = network_hdr
        else:
            grh = make_grh(sgid, dgid, len(pkt))
        self.rq.popleft()
        try:
            self.mem.scatter(wr.sg_list, 0, grh)
            if payload:
                self.mem.scatter(wr.sg_list, GRH_SIZE, payload)
        except LocalAccessError as e:
            # Class A: the receive WQE itself is bad; the QP goes to ERR.
            wc = WorkCompletion(wr.wr_id, e.status, IbWcOpcode.RECV, self.qpn)
            self._out.completions.append(Completion(CqSide.RECV, wc))
            self._out.events.append(QpFatal(e.status, "UD receive WQE fault"))
            self.qp_state = IbQpState.ERR
            return
        flags = IbWcFlags.GRH
        imm = 0
        if pkt.immdt is not None:
            flags |= IbWcFlags.WITH_IMM
            imm = pkt.immdt.imm
        wc = WorkCompletion(
            wr.wr_id,
            IbWcStatus.SUCCESS,
            IbWcOpcode.RECV,
            self.qpn,
            total,
            flags,
            imm,
            src_qp=deth.src_qp,
        )
        self._out.completions.append(Completion(CqSide.RECV, wc, pkt.bth.se))

    def poll(self, now: float) -> Output:
        """Send what is queued (in RTS) and hand back the output."""
        if self.qp_state is IbQpState.RTS:
            sq = self.sq
            while sq:
                self._send_one(sq.popleft())
        if self._drain_pending and self.qp_state is IbQpState.SQD:
            self._drain_pending = False
            self._out.events.append(SqDrained())
        return self._out.take()

    def next_deadline(self) -> float | None:
        """UD has no timers."""
        return None

    def flush(self) -> list[Completion]:
        """Complete every queued send and receive with ``IB_WC_WR_FLUSH_ERR``
        (unpolled completions first)."""
        out = self._out
        result = out.completions
        out.completions = []
        for wqe in self.sq:
            wc = WorkCompletion(wqe.wr.wr_id, IbWcStatus.WR_FLUSH_ERR, IbWcOpcode.SEND, self.qpn)
            result.append(Completion(CqSide.SEND, wc))
        self.sq.clear()
        for wr in self.rq:
            wc = WorkCompletion(wr.wr_id, IbWcStatus.WR_FLUSH_ERR, IbWcOpcode.RECV, self.qpn)
            result.append(Completion(CqSide.RECV, wc))
        self.rq.clear()
        return result
