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

The same facade as :class:`~softrdma.transport.rc.RcQp`, with the receive
also taking the packet's source and destination GIDs (for the GRH)::

    ud = UdQp(qpn, memory_port)
    ud.modify(attr, mask)
    ud.post_send(SendWqe.from_wr(UdWR(...)))
    out = ud.poll(now)                 # packets carry a UdDest (AH, QPN, Q_Key)
    ud.receive(pkt, now, sgid=..., dgid=...)

Deviation from rxe / IBTA C10-93.1.1: a message longer than the path MTU
completes with ``IB_WC_LOC_LEN_ERR`` (rxe silently pretends to send it, as
the spec allows) — a silent loss is the harder bug to find.
"""

from __future__ import annotations

import struct

from softrdma.transport.errors import HeaderFieldError, LocalProtocolError
from softrdma.transport.headers import GSI_QKEY, Deth, ImmDt
from softrdma.transport.memory_port import LocalAccessError
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_MASK
from softrdma.transport.qp_base import NoAckQp, send_wc
from softrdma.transport.wqe import (
    Completion,
    CqSide,
    OutPacket,
    QpFatal,
    SendWqe,
    UdDest,
)
from softrdma.verbs.enums import (
    IbQpAttrMask,
    IbQpState,
    IbSendFlags,
    IbWcFlags,
    IbWcOpcode,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.qp import QpAttr, apply_qp_attr
from softrdma.verbs.wr import UdWR, WorkCompletion

__all__ = ["GRH_SIZE", "UdQp", "make_grh"]

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
        raise HeaderFieldError("GIDs are 16 bytes")
    udp_len = ib_len + _UDP_ICRC
    if sgid.startswith(_V4_PREFIX) and dgid.startswith(_V4_PREFIX):
        fields = [0x45, 0, 20 + udp_len, 0, 0x4000, hop_limit, 17, 0, sgid[12:], dgid[12:]]
        fields[7] = _csum(_IPV4.pack(*fields))
        return bytes(20) + _IPV4.pack(*fields)
    return _IPV6.pack(6 << 28, udp_len, 17, hop_limit, sgid, dgid)


class UdQp(NoAckQp):
    """One UD (or GSI) QP: its state and attributes (the one copy the verbs
    layer asks), its queues, and the UD engine; see
    :class:`~softrdma.transport.qp_base.NoAckQp`."""

    transport = "UD"
    mtu = 256
    """The largest message a send may carry: the port's active MTU, set by
    the driver (rxe's ``get_mtu``: UD and GSI QPs use ``port.mtu_cap``, not a
    path MTU, which UD's modify does not take). 256, IBTA's smallest, until
    the driver says."""

    def modify(self, attr: QpAttr, mask: int) -> None:
        """Apply ``ib_modify_qp`` (rxe_qp.c ``rxe_qp_from_attr``), validated
        by the verbs layer. RTS starts sending at ``sq_psn``; SQD reports
        ``SqDrained`` at the next poll (UD has nothing outstanding); ERR
        flushes; RESET empties the queues."""
        old = self.state
        apply_qp_attr(self.attr, attr, mask)
        new = self.attr.qp_state if mask & IbQpAttrMask.STATE else old
        if new is IbQpState.RESET:
            self._clear()
        elif new is IbQpState.ERR:
            if old is not IbQpState.ERR:
                self._enter_error()
            return
        elif new is IbQpState.RTS and old not in (IbQpState.RTS, IbQpState.SQD):
            self.psn = self.attr.sq_psn
        elif new is IbQpState.SQD and old is not IbQpState.SQD:
            self._drain_pending = True
        self.state = new

    def _complete_send(self, wqe: SendWqe, status: IbWcStatus) -> None:
        """rxe_comp.c ``do_complete`` for a UD WQE (signaled or failed)."""
        wc = send_wc(wqe, status, self.qpn, self.sq_sig_all)
        if wc is not None:
            self.out.completions.append(Completion(CqSide.SEND, wc))

    def _send_one(self, wqe: SendWqe) -> None:
        """rxe_req.c ``rxe_requester`` for a UD QP: one SEND_ONLY packet."""
        wr = wqe.wr
        if not isinstance(wr, UdWR) or wqe.opcode not in (
            IbWrOpcode.SEND,
            IbWrOpcode.SEND_WITH_IMM,
        ):
            self._complete_send(wqe, IbWcStatus.LOC_QP_OP_ERR)
            return
        n = wqe.length
        if n > self.mtu:
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
            qkey = self.attr.qkey
        else:
            qkey = wr.remote_qkey
        imm = wqe.opcode is IbWrOpcode.SEND_WITH_IMM
        pkt = Packet.build(
            Opcode.UD_SEND_ONLY_WITH_IMMEDIATE if imm else Opcode.UD_SEND_ONLY,
            dest_qp=wr.remote_qpn,
            psn=self.psn,
            payload=payload,
            pkey=self.pkey,
            se=bool(wr.send_flags & IbSendFlags.SOLICITED),
            # rxe_req.c init_req_packet: AckReq on a message's last packet,
            # UD's too (the captures' MADs have it); the receiver ignores it.
            ack_req=True,
            deth=Deth(qkey, self.qpn),
            immdt=ImmDt(wr.imm_data) if imm else None,
        )
        self.psn = (self.psn + 1) & PSN_MASK
        self.out.packets.append(OutPacket(pkt, UdDest(wr, wr.remote_qpn, qkey)))
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
        if self.state not in _RECV_STATES:
            return
        op = pkt.bth.opcode
        if op != Opcode.UD_SEND_ONLY and op != Opcode.UD_SEND_ONLY_WITH_IMMEDIATE:
            return
        deth = pkt.deth
        if deth is None:
            return
        expected = GSI_QKEY if self.qpn == 1 else self.attr.qkey
        if deth.qkey != expected:
            return
        srq = self.srq
        wr = (self.rq[0] if self.rq else None) if srq is None else srq.peek()
        if wr is None:
            return  # UD has no RNR NAK: no receive WQE, dropped
        payload = pkt.payload
        total = GRH_SIZE + len(payload)
        if wr.length < total:
            return  # class D: too long for the receive buffer, dropped
        if network_hdr is not None:
            if len(network_hdr) != GRH_SIZE:
                raise LocalProtocolError("network_hdr must be 40 bytes")
            grh = network_hdr
        else:
            grh = make_grh(sgid, dgid, len(pkt))
        if srq is None:
            self.rq.popleft()
        else:
            srq.take(self.out.events)
        try:
            self.mem.scatter(wr.sg_list, 0, grh)
            if payload:
                self.mem.scatter(wr.sg_list, GRH_SIZE, payload)
        except LocalAccessError as e:
            # Class A: the receive WQE itself is bad; the QP enters ERR.
            wc = WorkCompletion(wr.wr_id, e.status, IbWcOpcode.RECV, self.qpn)
            self.out.completions.append(Completion(CqSide.RECV, wc))
            self.out.events.append(QpFatal(e.status, "UD receive WQE fault"))
            self._enter_error()
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
        self.out.completions.append(Completion(CqSide.RECV, wc, pkt.bth.se))
