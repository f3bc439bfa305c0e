"""One RC queue pair, sans-IO: its state, and the three engines that run it.

Kernel counterpart: ``struct rxe_qp`` (``drivers/infiniband/sw/rxe/rxe_verbs.h``)
with its ``req`` / ``comp`` / ``resp`` parts, ``rxe_qp.c``
(``rxe_qp_from_attr``, ``rxe_qp_error``, ``rxe_qp_reset``), the per-QP
timers, and ``rxe_recv.c``'s dispatch (``rxe_rcv_pkt``: requests to the
responder, responses to the completer). The engines are one module each:
``requester.py`` (``rxe_req.c``), ``completer.py`` (``rxe_comp.c``),
``responder.py`` (``rxe_resp.c``); they work on an :class:`RcQp` and keep
no state of their own.

A driver holds one :class:`RcQp` per RC QP::

    qp = RcQp(qpn, memory_port, sq_sig_all=False)
    qp.modify(attr, mask)           # validated ib_modify_qp attributes
    qp.post_recv(recv_wr); qp.post_send(SendWqe.from_wr(wr))
    qp.receive(packet, now)         # every packet addressed to the QP
    out = qp.poll(now)              # after any input, and at next_deadline()
    out.packets / out.completions / out.events
    qp.next_deadline()              # when to poll() again with no input

One source of truth: :attr:`RcQp.state` is the QP state (``qp->attr.qp_state``;
the verbs layer asks it) and :attr:`RcQp.attr` the attributes as the verbs
layer validated them. The engines read both and keep their progress in
:attr:`RcQp.req`, :attr:`RcQp.comp` and :attr:`RcQp.resp`.

Which engines run in which state::

    IbQpState   requester / completer        responder
    RESET       -                            -
    INIT        -                            -
    RTR         -                            runs (expects rq_psn)
    RTS         runs (sends from sq_psn)     runs
    SQD         started WQEs only; then      runs
                SqDrained, once
    ERR         -                            -

Errors are sticky (h11's model): a fatal error in any engine moves the QP to
ERR itself — every outstanding work request completes with
``IB_WC_WR_FLUSH_ERR`` after the one that failed, and a :class:`QpFatal`
event says why; the layers above only observe it. Posting in ERR completes
at once with ``IB_WC_WR_FLUSH_ERR``; only a modify to RESET leaves ERR.

Nothing here sleeps, reads a clock or touches memory other than through the
:class:`~softrdma.transport.memory_port.MemoryPort`: the same inputs give the
same outputs.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from softrdma.transport import completer, requester, responder
from softrdma.transport.burst import SegRun
from softrdma.transport.completer import RETIRABLE
from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.memory_port import LocalSgl, RemoteMr
from softrdma.transport.opcodes import OPCODE_TABLE, OpcodeInfo, Transport
from softrdma.transport.packet import Packet
from softrdma.transport.qp_base import QpBase
from softrdma.transport.wqe import Output, QpFatal, SendWqe, SqDrained
from softrdma.verbs.enums import (
    IbEventType,
    IbQpAttrMask,
    IbQpState,
    IbWcStatus,
)
from softrdma.verbs.qp import QpAttr, apply_qp_attr
from softrdma.verbs.wr import RecvWR

__all__ = ["CompInfo", "RcQp", "ReqInfo", "RespInfo", "RespRes", "local_ack_timeout"]

_RC = Transport.RC
_REQUESTER_STATES = frozenset({IbQpState.RTS, IbQpState.SQD})
REQUESTER_STATES = _REQUESTER_STATES
"""The states the requester and completer run in (for the driver's timer)."""
_RESPONDER_STATES = frozenset({IbQpState.RTR, IbQpState.RTS, IbQpState.SQD})
_FLUSH = IbWcStatus.WR_FLUSH_ERR


def local_ack_timeout(timeout: int) -> float | None:
    """The local ACK timeout in seconds: 4.096 µs × 2**timeout, ``None`` for
    ``timeout`` 0 (infinite). Kernel: rxe_qp.c ``rxe_qp_from_attr``
    (``qp_timeout_jiffies = nsecs_to_jiffies(4096ULL << timeout)``)."""
    return 4.096e-6 * (1 << timeout) if timeout else None


@dataclass(slots=True)
class ReqInfo:
    """The requester's progress (rxe ``struct rxe_req_info``).

    ``wqe_index`` — the next send WQE to work on; ``psn`` — the next PSN to
    send (rewound by a retry); ``sent_psn`` — one past the highest PSN ever
    sent (a response beyond it acknowledges nothing); ``noack_pkts`` — packets since the last AckReq; ``rd_atomic`` —
    free READ / atomic credits (``max_rd_atomic`` of them); ``need_retry`` —
    the completer asked for go-back-N; ``wait_for_rnr_timer`` — an RNR NAK's
    wait is on; ``retrans_deadline`` / ``rnr_deadline`` — the two timers
    (absolute time, or None)."""

    wqe_index: int = 0
    psn: int = 0
    sent_psn: int = 0
    noack_pkts: int = 0
    rd_atomic: int = 0
    need_retry: bool = False
    wait_for_rnr_timer: bool = False
    retrans_deadline: float | None = None
    rnr_deadline: float | None = None


@dataclass(slots=True)
class CompInfo:
    """The completer's progress (rxe ``struct rxe_comp_info``): ``psn`` —
    the oldest PSN not yet acknowledged; ``opcode`` — the last opcode of a
    multi-packet READ response in progress (-1 between messages);
    ``retry_cnt`` / ``rnr_retry`` — retries left; ``started_retry`` — a
    go-back-N is under way; ``timeout`` — the retransmit timer fired."""

    psn: int = 0
    opcode: int = -1
    retry_cnt: int = 0
    rnr_retry: int = 0
    started_retry: bool = False
    timeout: bool = False


class RespRes:
    """A responder resource (rxe ``struct resp_res``): what a READ or atomic
    needs to be answered again when its request is repeated. There are
    ``max_dest_rd_atomic`` of them, reused round robin. A READ's ``mr`` is
    the checked R_Key range its reply reads from (rxe hands ``qp->resp.mr``
    over to the reply), checked again before a replay."""

    __slots__ = (
        "cur_psn",
        "first_psn",
        "is_read",
        "last_psn",
        "length",
        "mr",
        "opcode",
        "orig",
        "replay",
        "resid",
        "rkey",
        "started",
        "va",
        "va_org",
        "valid",
    )

    def __init__(self) -> None:
        self.valid = False
        self.is_read = False
        self.first_psn = self.last_psn = self.cur_psn = 0
        self.va = self.va_org = self.length = self.resid = self.rkey = 0
        self.orig = 0
        self.opcode = 0  # the request it answers (rxe res->type, finer)
        self.replay = False
        self.started = False
        self.mr: RemoteMr | None = None


@dataclass(slots=True)
class RespInfo:
    """The responder's progress (rxe ``struct rxe_resp_info``).

    ``psn`` — the next expected PSN; ``ack_psn`` — one past the last request
    executed; ``msn`` — completed messages, carried in every AETH;
    ``opcode`` — the last request opcode executed (-1 between messages);
    ``sent_psn_nak`` — a sequence NAK is out; ``wqe`` / ``recv_offset`` —
    the receive WQE being filled, ``sgl`` its SGE list as translated by the
    first packet; ``va`` / ``rkey`` / ``resid`` / ``length`` — the RETH /
    AtomicETH of the message in progress, ``mr`` the range ``check_rkey``
    checked for it (rxe ``qp->resp.mr``), kept for the message's packets;
    ``resources`` /
    ``res_head`` / ``res`` — the READ / atomic resources; ``cur`` — a READ
    whose reply is unfinished, ``queue`` — requests waiting behind it.
    Per packet: ``aeth_syndrome``, ``status``, ``local_status``, ``nak``."""

    psn: int = 0
    ack_psn: int = 0
    msn: int = 0
    opcode: int = -1
    sent_psn_nak: bool = False
    wqe: RecvWR | None = None
    sgl: LocalSgl | None = None
    recv_offset: int = 0
    mr: RemoteMr | None = None
    va: int = 0
    rkey: int = 0
    resid: int = 0
    length: int = 0
    aeth_syndrome: int = 0
    status: IbWcStatus = IbWcStatus.SUCCESS
    local_status: IbWcStatus | None = None
    nak: int = 0
    resources: list[RespRes] = field(default_factory=list)
    res_head: int = 0
    res: RespRes | None = None
    cur: tuple[Packet, OpcodeInfo] | None = None
    queue: deque[tuple[Packet, OpcodeInfo]] = field(default_factory=deque)


class RcQp(QpBase):
    """One RC QP (rxe ``struct rxe_qp`` for ``IB_QPT_RC``): see the module
    docstring and :class:`~softrdma.transport.qp_base.QpBase`."""

    transport = "RC"

    def _init_transport(self) -> None:
        self.mtu = self.attr.path_mtu.size
        self.ack_timeout = local_ack_timeout(self.attr.timeout)
        self.access = int(self.attr.qp_access_flags)
        self.sq: list[SendWqe] = []
        self.sq_head = 0
        self.req = ReqInfo()
        self.comp = CompInfo()
        self.resp = RespInfo()
        self.drained_sent = False
        self.now = 0.0  # time of the last poll
        self.reply_hold = 0.0
        """An unfinished READ reply continues no earlier than this: when the
        link has carried the last burst (set by the driver, like ``now``)."""
        self.offload: Callable[[], bool] | None = None
        """Segmentation offload: when set and true, the requester hands on
        two or more consecutive packets of a message as one
        :class:`~softrdma.transport.burst.SegRun` (set by a driver whose
        link carries runs; asked once per requester pass)."""

    @property
    def sq_outstanding(self) -> int:
        """Send WQEs posted and not yet completed."""
        return len(self.sq) - self.sq_head

    # -- ib_modify_qp -----------------------------------------------------------------

    def modify(self, attr: QpAttr, mask: int) -> None:
        """Apply ``ib_modify_qp`` (rxe_qp.c ``rxe_qp_from_attr``): the
        attributes ``mask`` selects, and the state ``attr.qp_state`` when the
        mask has ``IB_QP_STATE`` — both already validated by the verbs layer.
        Entering RTR starts the responder at ``rq_psn``, RTS from RTR the
        requester at ``sq_psn``; SQD stops starting WQEs; ERR flushes."""
        old = self.state
        outstanding = self.attr.max_rd_atomic - self.req.rd_atomic
        apply_qp_attr(self.attr, attr, mask)
        a = self.attr
        self.mtu = a.path_mtu.size
        self.ack_timeout = local_ack_timeout(a.timeout)
        self.access = int(a.qp_access_flags)
        # New max_rd_atomic: the outstanding READs / atomics keep their credits.
        self.req.rd_atomic = max(0, a.max_rd_atomic - outstanding)
        new = a.qp_state if mask & IbQpAttrMask.STATE else old
        if new is IbQpState.RESET:
            self._reset()
        elif new is IbQpState.ERR:
            if old is not IbQpState.ERR:
                self._enter_error()
        elif new is IbQpState.RTR and old is IbQpState.INIT:
            self.state = new
            responder.start(self)
        elif new is IbQpState.RTS and old is IbQpState.RTR:
            self.state = new
            requester.start(self)
        elif new is IbQpState.SQD and old is IbQpState.RTS:
            self.state = new
            self.drained_sent = False
        else:
            if new is not old and (old, new) not in _OTHER_TRANSITIONS:
                raise LocalProtocolError(
                    f"RC QP {self.qpn:#x}: no transition {old.name} -> {new.name}"
                )
            self.state = new

    def _reset(self) -> None:
        """rxe_qp.c ``rxe_qp_reset``: drop both queues without completions."""
        self._clear()
        self.sq_head = 0
        self.req = ReqInfo()
        self.comp = CompInfo()
        self.resp = RespInfo()

    # -- errors ---------------------------------------------------------------------

    def fatal(self, status: IbWcStatus, reason: str, event: IbEventType) -> None:
        """A fatal error (rxe_qp.c ``rxe_qp_error``): tell the layers above
        with a :class:`QpFatal` event, then enter ERR and flush. Sticky: in
        ERR already, nothing happens."""
        if self.state is IbQpState.ERR:
            return
        self.out.events.append(QpFatal(status, reason, event))
        self._enter_error()

    def _enter_error(self) -> None:
        """ERR: stop the engines and flush (:meth:`QpBase._enter_error`)."""
        super()._enter_error()
        self.resp = RespInfo()
        req = self.req
        req.retrans_deadline = req.rnr_deadline = None

    def _recv_in_progress(self) -> list[RecvWR]:
        wqe = self.resp.wqe
        return [wqe] if wqe is not None and self.srq is not None else []

    def _flush_send_queue(self) -> list[SendWqe]:
        pending = self.sq[self.sq_head :]
        self.sq.clear()
        self.sq_head = self.req.wqe_index = 0
        return pending

    # -- packets and time ---------------------------------------------------------------

    def receive(self, pkt: Packet, now: float) -> None:
        """Take one packet addressed to this QP (rxe_recv.c ``rxe_rcv_pkt``):
        requests go to the responder, ACKs and responses to the completer.
        Opcodes of another transport, and packets the QP's state does not
        accept, are dropped silently (``check_type_state``)."""
        info = OPCODE_TABLE[pkt.bth.opcode]
        if info is None or info.qp_type is not _RC:
            return
        state = self.state
        if info.is_request:
            if state in _RESPONDER_STATES:
                responder.receive(self, pkt, info)
        elif info.is_response and state in _REQUESTER_STATES:
            completer.receive(self, pkt, info, now)

    def receive_run(self, run: SegRun, i: int) -> int:
        """Take packets ``i``.. of a :class:`~softrdma.transport.burst.SegRun`
        addressed to this QP at once, as far as that is exactly what they
        would do one by one (:func:`responder.receive_run
        <softrdma.transport.responder.receive_run>`); returns how many were
        taken, 0 when packet ``i`` must come on its own (:meth:`receive`).
        The caller has polled since the packet before ``i``."""
        if self.state not in _RESPONDER_STATES:
            return 0
        return responder.receive_run(self, run, i)

    def poll(self, now: float) -> Output:
        """Run the engines at time ``now`` and hand back what they produced
        since the last poll (rxe ``rxe_sender``: requester, then completer;
        the timers fire here)."""
        self.now = now
        if (self.resp.cur is not None or self.resp.queue) and now >= self.reply_hold:
            responder.run(self)
        if self.state in _REQUESTER_STATES:
            req = self.req
            if req.rnr_deadline is not None and now >= req.rnr_deadline:
                # rxe_req.c rnr_nak_timer(): go back N now.
                req.rnr_deadline = None
                req.wait_for_rnr_timer = False
                req.need_retry = True
            timeout = req.retrans_deadline is not None and now >= req.retrans_deadline
            if timeout:
                req.retrans_deadline = None
            # Both engines return at once when they have nothing to do; that
            # is most polls (one per packet), so their checks are made here
            # and the calls saved: the completer runs without a packet only
            # for a fired timer or a head WQE that is done or failed, the
            # requester only for a retry or a WQE it has not finished.
            sq = self.sq
            if timeout or (self.sq_head < len(sq) and sq[self.sq_head].state in RETIRABLE):
                completer.run(self, now, timeout)
            while self.state in _REQUESTER_STATES and (req.need_retry or req.wqe_index < len(sq)):
                head = self.sq_head
                requester.run(self, now)
                if self.sq_head < len(sq) and sq[self.sq_head].state in RETIRABLE:
                    completer.run(self, now, False)
                # Loop only while completions unblock fenced WQEs.
                if self.sq_head == head or req.wqe_index >= len(sq):
                    break
            if self.state is IbQpState.SQD and not self.drained_sent and requester.drained(self):
                self.drained_sent = True
                self.out.events.append(SqDrained())
        return self.out.take()

    def poll_idle(self, now: float) -> bool:
        """:meth:`poll` at ``now`` would only hand back what the engines
        gathered so far: no READ reply to go on with, no timer due, no
        completion to retire, nothing for the requester to start or retry,
        no SQD event. A driver receiving several packets at one instant may
        then poll once after the next one instead (the same outputs, in the
        same order)."""
        resp = self.resp
        if resp.cur is not None or resp.queue:
            return False
        state = self.state
        if state not in _REQUESTER_STATES:
            return True
        req = self.req
        a, b = req.retrans_deadline, req.rnr_deadline
        if (a is not None and now >= a) or (b is not None and now >= b):
            return False
        sq = self.sq
        head = self.sq_head
        if req.need_retry or req.wqe_index < len(sq):
            return False
        if head < len(sq) and sq[head].state in RETIRABLE:
            return False
        return not (state is IbQpState.SQD and not self.drained_sent and requester.drained(self))

    def reply_pending(self) -> bool:
        """A READ reply is unfinished (or requests wait behind it): the driver
        sets :attr:`reply_hold` to when the link has carried what the last
        poll produced, and polls again then."""
        return self.resp.cur is not None or bool(self.resp.queue)

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`poll` has timer work to do, or ``None``."""
        if self.state not in _REQUESTER_STATES:
            return None
        a, b = self.req.retrans_deadline, self.req.rnr_deadline
        if a is None:
            return b
        if b is None:
            return a
        return min(a, b)


# Transitions that only change attributes or the state name (the verbs layer
# has validated them against ib_modify_qp_is_ok).
_OTHER_TRANSITIONS = frozenset(
    {
        (IbQpState.RESET, IbQpState.INIT),
        (IbQpState.INIT, IbQpState.INIT),
        (IbQpState.RTS, IbQpState.RTS),
        (IbQpState.SQD, IbQpState.SQD),
        (IbQpState.SQD, IbQpState.RTS),
    }
)
