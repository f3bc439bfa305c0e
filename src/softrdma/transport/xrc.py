"""XRC (eXtended Reliable Connected) queue pairs, sans-IO.

IBTA vol. 1 §9.8 / annex A14 and rdma-core's ``IBV_QPT_XRC_SEND`` /
``IBV_QPT_XRC_RECV`` (the kernel's ``IB_QPT_XRC_INI`` / ``IB_QPT_XRC_TGT``):

* an **INI** QP is an RC requester and completer with no receive queue;
  every request packet carries an XRCETH naming the XRC SRQ of the target
  that the work request is for (``ibv_wr_set_xrc_srqn`` /
  ``send_wr.qp_type.xrc.remote_srqn``);
* a **TGT** QP is an RC responder with no send queue and no receive queue
  of its own: each request's XRCETH names the XRC SRQ whose receive WQE a
  SEND consumes and whose CQ gets the completion (with the TGT's QPN), and
  whose PD scopes the R_Keys of RDMA WRITE / READ / atomics (the TGT QP has
  no PD of its own in verbs; mlx5 checks against the SRQ's). The SRQ must
  belong to the TGT QP's XRC domain.

Both are the RC engines (:class:`~softrdma.transport.rc.RcQp`,
``requester`` / ``completer`` / ``responder``) with the XRC wire format
applied where packets cross the QP's boundary: an XRC opcode is its RC twin
plus ``0xA0`` and a request carries the XRCETH right after the BTH
(:func:`xrc_packet` / :func:`rc_packet`). So every RC rule — PSNs, ACK
coalescing, retries, RNR, NAKs, READ / atomic resources — holds unchanged.
XRC packets always go frame by frame (no segmentation offload runs).

A request whose XRCETH names no XRC SRQ, or one of another XRC domain, is an
XRCETH error: when it is the expected PSN the TGT answers NAK remote access
error and enters ERR with ``IB_EVENT_QP_ACCESS_ERR`` (what qedr reports for
its ``INVALID_XRCETH`` / ``XRC_DOMAIN`` errors), so the INI's work request
completes with ``IB_WC_REM_ACCESS_ERR``; a duplicate or out-of-sequence one
gets the RC treatment of its PSN. rxe's proposed XRC series drops such
packets silently instead, which leaves the INI retrying until
``IB_WC_RETRY_EXC_ERR``.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from typing import NamedTuple

from softrdma.transport import responder
from softrdma.transport.burst import SegRun
from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.headers import Aeth, NakCode, XrcEth
from softrdma.transport.memory_port import MemoryPort
from softrdma.transport.opcodes import OPCODE_TABLE, Opcode, Transport
from softrdma.transport.packet import Packet
from softrdma.transport.psn import psn_in_range
from softrdma.transport.rc import RcQp
from softrdma.transport.srq import SharedRq
from softrdma.transport.wqe import (
    WR_OPCODE_INFO,
    Completion,
    CqSide,
    OutPacket,
    Output,
    SendWqe,
)
from softrdma.verbs.enums import IbEventType, IbQpState, IbWcStatus, IbWrOpcode
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import RecvWR

__all__ = [
    "SrqCompletion",
    "XrcIniQp",
    "XrcSrq",
    "XrcTgtQp",
    "rc_packet",
    "xrc_packet",
    "xrc_supports",
]

_XRC = Transport.XRC
_RC_MASK = 0x1F
_RECV = CqSide.RECV
_RESPONDER_STATES = frozenset({IbQpState.RTR, IbQpState.RTS, IbQpState.SQD})


def rc_packet(pkt: Packet) -> Packet:
    """The RC twin of an XRC packet: opcode less ``0xA0``, no XRCETH, every
    other header and the payload (no copy) as they are."""
    bth = pkt.bth._replace(opcode=pkt.bth.opcode & _RC_MASK)
    return Packet(bth, pkt.payload, pkt.reth, pkt.aeth, pkt.atmeth, pkt.atmack, pkt.immdt, pkt.ieth)


def xrc_packet(pkt: Packet, srqn: int | None = None) -> Packet:
    """The XRC twin of an RC packet: opcode plus ``0xA0``; a request gets an
    XRCETH with ``srqn`` (a response none)."""
    bth = pkt.bth._replace(opcode=pkt.bth.opcode | _XRC)
    return Packet(
        bth,
        pkt.payload,
        pkt.reth,
        pkt.aeth,
        pkt.atmeth,
        pkt.atmack,
        pkt.immdt,
        pkt.ieth,
        xrceth=None if srqn is None else XrcEth(srqn),
    )


class XrcSrq(SharedRq):
    """An XRC SRQ as the transport sees it (``struct ib_srq`` with
    ``srq_type`` ``IB_SRQT_XRC``): a shared receive queue that belongs to an
    XRC domain (``xrcd``, any object compared by identity) and whose PD's
    keys its :class:`~softrdma.transport.memory_port.MemoryPort` ``mem``
    checks, for the requests that name it (a driver may instead give each
    TGT QP its own port per SRQ: :class:`XrcTgtQp`'s ``srq_mem``)."""

    __slots__ = ("mem", "xrcd")

    def __init__(
        self,
        srqn: int,
        max_wr: int,
        max_sge: int,
        limit: int = 0,
        *,
        xrcd: object,
        mem: MemoryPort | None = None,
    ) -> None:
        super().__init__(srqn, max_wr, max_sge, limit)
        self.xrcd = xrcd
        self.mem = mem


class SrqCompletion(NamedTuple):
    """A receive completion of an XRC TGT QP and the XRC SRQ whose CQ it
    goes to (``ib_srq.ext.cq``)."""

    srq: XrcSrq
    completion: Completion


SrqLookup = Callable[[int], "XrcSrq | None"]
"""The device's XRC SRQ of a number, or None (rxe ``rxe_pool_get_index``)."""


def xrc_supports(opcode: IbWrOpcode) -> bool:
    """Whether an XRC INI QP can post ``opcode``: its RC wire opcodes all
    have XRC twins (local operations have none to need). FLUSH and ATOMIC
    WRITE (IBTA annex A19) are RC-only."""
    info = WR_OPCODE_INFO.get(opcode)
    return info is not None and all(
        op < 0 or OPCODE_TABLE[op | _XRC] is not None for op in info.rc_ops
    )


class XrcIniQp(RcQp):
    """An XRC initiator QP (``IB_QPT_XRC_INI``): an RC requester whose
    request packets carry the XRCETH of their work request's
    ``xrc_remote_srqn``; no receive queue, no responder."""

    transport = "XRC"

    def post_send(self, wqe: SendWqe) -> None:
        """Queue a send WQE (as RC); its WR must name a 24-bit remote SRQ
        and be an operation XRC has (:func:`xrc_supports`)."""
        srqn = wqe.wr.xrc_remote_srqn
        if not isinstance(srqn, int) or not 0 <= srqn < 1 << 24:
            raise LocalProtocolError(
                f"XRC INI QP {self.qpn:#x}: remote SRQN {srqn!r} is not 24 bits"
            )
        if not xrc_supports(wqe.opcode):
            raise LocalProtocolError(f"XRC INI QP {self.qpn:#x}: XRC has no {wqe.opcode.name}")
        super().post_send(wqe)

    def post_recv(self, wr: RecvWR) -> None:
        """An XRC INI QP has no receive queue (``ibv_post_recv`` fails)."""
        raise LocalProtocolError(f"XRC INI QP {self.qpn:#x} has no receive queue")

    def receive(self, pkt: Packet, now: float) -> None:
        """Take one packet: XRC responses (ACK, READ response, atomic ACK) go
        to the completer; anything else is dropped, as for a wrong transport."""
        info = OPCODE_TABLE[pkt.bth.opcode]
        if info is None or info.qp_type is not _XRC or not info.is_response:
            return
        super().receive(rc_packet(pkt), now)

    def receive_run(self, run: SegRun, i: int) -> int:
        """XRC packets are taken one by one."""
        return 0

    def poll(self, now: float) -> Output:
        """Run the RC engines and turn their request packets into XRC ones."""
        out = super().poll(now)
        packets = out.packets
        if packets:
            for k, op in enumerate(packets):
                packets[k] = OutPacket(xrc_packet(op.pkt, self._srqn_of(op.pkt.bth.psn)))
        return out

    def _srqn_of(self, psn: int) -> int:
        """The remote SRQN of the WQE that owns ``psn`` (the newest first:
        most packets belong to the WQE just started)."""
        sq = self.sq
        for i in range(len(sq) - 1, -1, -1):
            wqe = sq[i]
            if wqe.started and psn_in_range(psn, wqe.first_psn, wqe.last_psn):
                return int(wqe.wr.xrc_remote_srqn)
        raise AssertionError(f"XRC INI QP {self.qpn:#x}: PSN {psn:#x} of no send WQE")


class XrcTgtQp(RcQp):
    """An XRC target QP (``IB_QPT_XRC_TGT``) of the XRC domain ``xrcd``:
    the RC responder, taking receive WQEs, keys and the completion CQ from
    the XRC SRQ each request names (``srq_lookup``; ``srq_mem`` gives the
    memory port of an SRQ's PD, else the SRQ's own ``mem``). Receive
    completions come out in :attr:`out` as for RC, and :meth:`srq_of` says
    whose CQ each goes to."""

    transport = "XRC"

    def __init__(
        self,
        qpn: int,
        mem: MemoryPort,
        *,
        xrcd: object,
        srq_lookup: SrqLookup,
        srq_mem: Callable[[XrcSrq], MemoryPort] | None = None,
        counters: Counter[str] | None = None,
    ) -> None:
        super().__init__(qpn, mem, counters=counters)
        self.xrcd = xrcd
        self.srq_lookup = srq_lookup
        self.srq_mem = srq_mem
        self._srq_of: dict[int, SrqCompletion] = {}
        """id() of a receive completion not yet handed over -> it and its SRQ."""
        self._pending: deque[Packet] = deque()
        """Requests behind an unfinished READ reply (rxe's ``req_pkts``),
        still XRC: their SRQ is chosen when their turn comes."""
        self._reply_mem: MemoryPort | None = None

    def _mem_of(self, srq: XrcSrq) -> MemoryPort:
        """The memory port that checks keys against ``srq``'s PD."""
        if self.srq_mem is not None:
            return self.srq_mem(srq)
        if srq.mem is None:
            raise LocalProtocolError(f"XRC SRQ {srq.srqn:#x} has no memory port")
        return srq.mem

    def post_send(self, wqe: SendWqe) -> None:
        """An XRC TGT QP has no send queue."""
        raise LocalProtocolError(f"XRC TGT QP {self.qpn:#x} has no send queue")

    def post_recv(self, wr: RecvWR) -> None:
        """Receive WQEs are posted to the XRC SRQ, never to the TGT QP."""
        raise LocalProtocolError(f"XRC TGT QP {self.qpn:#x} receives from XRC SRQs")

    def receive_run(self, run: SegRun, i: int) -> int:
        """XRC packets are taken one by one."""
        return 0

    def srq_of(self, completion: Completion) -> XrcSrq | None:
        """The XRC SRQ whose CQ gets ``completion``, a receive completion
        this QP handed out (once: the tag is dropped as it is asked for)."""
        got = self._srq_of.pop(id(completion), None)
        return None if got is None or got.completion is not completion else got.srq

    def receive(self, pkt: Packet, now: float) -> None:
        """Take one packet: XRC requests go to the responder (after any READ
        reply in progress); anything else is dropped."""
        info = OPCODE_TABLE[pkt.bth.opcode]
        if info is None or info.qp_type is not _XRC or not info.is_request:
            return
        if self.state not in _RESPONDER_STATES:
            return
        if self.resp.cur is not None or self._pending:
            self._pending.append(pkt)
            return
        self._deliver(pkt, now)

    def _deliver(self, pkt: Packet, now: float) -> None:
        """rxe's XRC ``check_xrcd`` then ``rxe_responder``: select the SRQ
        the XRCETH names and run the RC responder with its queue and keys."""
        xrceth = pkt.xrceth
        assert xrceth is not None  # every XRC request opcode carries one
        srq = self.srq_lookup(xrceth.srqn)
        resp = self.resp
        if srq is None or srq.xrcd is not self.xrcd:
            self.out.counters["rcv_xrceth_err"] += 1
            if pkt.bth.psn == resp.psn:
                self._xrceth_error(pkt, xrceth.srqn, srq is None)
                return
            # A duplicate or out-of-sequence request: its PSN decides (a
            # duplicate SEND / WRITE is re-ACKed, never re-executed).
        else:
            if resp.wqe is None:
                # A new message takes its WQE from this SRQ; the packets of
                # a message in progress keep filling the one it took.
                self.srq = srq
            self.mem = self._mem_of(srq)
        super().receive(rc_packet(pkt), now)
        if resp.cur is not None:
            self._reply_mem = self.mem
        self._route_completions()

    def _xrceth_error(self, pkt: Packet, srqn: int, unknown: bool) -> None:
        """NAK remote access error for the request, then ERR (class C)."""
        nak = Packet.build(
            Opcode.XRC_ACKNOWLEDGE,
            dest_qp=self.attr.dest_qp_num,
            psn=pkt.bth.psn,
            pkey=self.pkey,
            aeth=Aeth.nak(self.resp.msn, NakCode.REMOTE_ACCESS_ERR),
        )
        self.out.packets.append(OutPacket(nak))
        why = "names no XRC SRQ" if unknown else "names an XRC SRQ of another XRC domain"
        self.fatal(
            IbWcStatus.REM_ACCESS_ERR,
            f"responder: XRCETH SRQN {srqn:#x} {why}",
            IbEventType.QP_ACCESS_ERR,
        )
        self._route_completions()

    def _route_completions(self) -> None:
        """Tag the new receive completions with the SRQ that supplied their
        WQE (the one selected for the message)."""
        srq = self.srq
        if not isinstance(srq, XrcSrq):
            return
        tags = self._srq_of
        for c in self.out.completions:
            if c.side is CqSide.RECV and id(c) not in tags:
                tags[id(c)] = SrqCompletion(srq, c)

    def modify(self, attr: QpAttr, mask: int) -> None:
        """``ib_modify_qp`` as RC; leaving for ERR or RESET drops the
        requests waiting behind a READ reply."""
        super().modify(attr, mask)
        if self.state in (IbQpState.ERR, IbQpState.RESET):
            self._pending.clear()
            self._reply_mem = None
        if self.state is IbQpState.RESET:
            self._srq_of.clear()  # RESET drops the output untaken
        self._route_completions()

    def poll(self, now: float) -> Output:
        """Continue a READ reply, then the requests waiting behind it; hand
        back the responses as XRC packets."""
        self.now = now
        resp = self.resp
        if resp.cur is not None and now >= self.reply_hold:
            if self._reply_mem is not None:
                self.mem = self._reply_mem
            responder.run(self)
        pending = self._pending
        while pending and self.resp.cur is None and self.state in _RESPONDER_STATES:
            self._deliver(pending.popleft(), now)
        if self.state not in _RESPONDER_STATES:
            pending.clear()
        self._route_completions()
        out = self.out.take()
        packets = out.packets
        for k, op in enumerate(packets):
            if op.pkt.bth.opcode < _XRC:
                packets[k] = OutPacket(xrc_packet(op.pkt))
        return out

    def poll_idle(self, now: float) -> bool:
        """As RC; requests waiting behind a READ reply are work, and so are
        receive completions: the device cannot tell whether their SRQ's CQ
        may wait for them."""
        if self._pending or any(c.side is _RECV for c in self.out.completions):
            return False
        return super().poll_idle(now)

    def reply_pending(self) -> bool:
        """A READ reply is unfinished, or requests wait behind it."""
        return self.resp.cur is not None or bool(self._pending)
