"""What every transport QP has, whatever its type: the state, the
attributes, the receive queue, the output, and the rules for posting and
flushing that IBTA gives all of them.

Kernel counterpart: the type-independent part of ``struct rxe_qp``
(``drivers/infiniband/sw/rxe/rxe_verbs.h``) and of ``rxe_post_send`` /
``rxe_post_recv`` / ``rxe_qp_error``. :class:`~softrdma.transport.rc.RcQp`
builds on it; :class:`~softrdma.transport.ud.UdQp` and
:class:`~softrdma.transport.uc.UcQp` on :class:`NoAckQp`, the send side of
the types no ACK ever answers.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import ClassVar

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.memory_port import MemoryPort
from softrdma.transport.srq import SharedRq
from softrdma.transport.wqe import (
    WR_IMM,
    Completion,
    CqSide,
    LastWqeReached,
    Output,
    SendWqe,
    SqDrained,
)
from softrdma.verbs.enums import IbQpState, IbWcFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import RecvWR, WorkCompletion

__all__ = ["NoAckQp", "QpBase", "flush_wc", "send_wc"]

_FLUSH = IbWcStatus.WR_FLUSH_ERR
_SUCCESS = IbWcStatus.SUCCESS
_NO_WC_FLAGS = IbWcFlags(0)


def flush_wc(wqe: SendWqe, qpn: int) -> WorkCompletion:
    """A send completion with ``IB_WC_WR_FLUSH_ERR`` for ``wqe``."""
    return WorkCompletion(wqe.wr.wr_id, _FLUSH, wqe.wc_opcode, qpn)


def send_wc(wqe: SendWqe, status: IbWcStatus, qpn: int, sq_sig_all: bool) -> WorkCompletion | None:
    """rxe_comp.c ``do_complete`` / ``make_send_cqe``: the completion of a
    send WQE, or ``None`` for a successful one that is not signaled
    (unsignaled WQEs still complete when they fail, IBTA 10.7.3.1)."""
    ok = status is _SUCCESS
    if ok and not (wqe.signaled or sq_sig_all):
        return None
    flags = IbWcFlags.WITH_IMM if ok and wqe.mask & WR_IMM else _NO_WC_FLAGS
    return WorkCompletion(wqe.wr.wr_id, status, wqe.wc_opcode, qpn, wqe.length if ok else 0, flags)


class QpBase:
    """The part of a QP every transport shares. ``counters`` is the device's
    ``hw_counters`` (shared by its QPs); ``sq_sig_all`` is
    ``IB_SIGNAL_ALL_WR``. A subclass owns its send queue ``sq`` (anything
    with ``append``) and says how to leave it in :meth:`_flush_send_queue`."""

    transport: ClassVar[str]
    """"RC", "UC" or "UD", for messages."""

    sq: list[SendWqe] | deque[SendWqe]

    def __init__(
        self,
        qpn: int,
        mem: MemoryPort,
        *,
        sq_sig_all: bool = False,
        counters: Counter[str] | None = None,
        srq: SharedRq | None = None,
    ) -> None:
        self.qpn = qpn
        self.srq = srq
        """The shared receive queue this QP takes its receive WQEs from
        (``qp->srq``); then it has no receive queue of its own."""
        self.mem = mem
        self.sq_sig_all = sq_sig_all
        self.state = IbQpState.RESET
        self.attr = QpAttr()
        self.pkey = 0xFFFF  # pkey_index 0: the default P_Key
        self.rq: deque[RecvWR] = deque()
        self.out = Output(counters=Counter() if counters is None else counters)
        self._init_transport()

    def _init_transport(self) -> None:
        """rxe_qp.c ``rxe_qp_init_req`` / ``rxe_qp_init_resp``: set up the
        state of the QP's own type, once the common part is (the attributes
        at their RESET values)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.qpn:#x}, {self.state.name})"

    @property
    def rq_outstanding(self) -> int:
        """Receive WQEs posted and not yet completed (on the QP's own receive
        queue: those of an SRQ are the SRQ's)."""
        return len(self.rq)

    # -- work requests ----------------------------------------------------------------

    def post_send(self, wqe: SendWqe) -> None:
        """Queue a send WQE (rxe_verbs.c ``rxe_post_send``); in ERR it
        completes at once with ``IB_WC_WR_FLUSH_ERR``."""
        if self.state is IbQpState.RESET:
            raise LocalProtocolError(f"{self.transport} QP {self.qpn:#x}: post_send in RESET")
        if self.state is IbQpState.ERR:
            self.out.completions.append(Completion(CqSide.SEND, flush_wc(wqe, self.qpn)))
            return
        self.sq.append(wqe)

    def post_recv(self, wr: RecvWR) -> None:
        """Queue a receive WQE (rxe_verbs.c ``rxe_post_recv``); in ERR it
        completes at once with ``IB_WC_WR_FLUSH_ERR``."""
        if self.state is IbQpState.RESET:
            raise LocalProtocolError(f"{self.transport} QP {self.qpn:#x}: post_recv in RESET")
        if self.srq is not None:
            raise LocalProtocolError(f"QP {self.qpn:#x} receives from SRQ {self.srq.srqn:#x}")
        if self.state is IbQpState.ERR:
            self.out.completions.append(Completion(CqSide.RECV, self._recv_flush_wc(wr)))
            return
        self.rq.append(wr)

    # -- reset and error --------------------------------------------------------------

    def _clear(self) -> None:
        """RESET (rxe_qp.c ``rxe_qp_reset``): drop the queues and whatever
        output was not taken, without completions."""
        self.state = IbQpState.RESET
        self.sq.clear()
        self.rq.clear()
        self.out.packets.clear()
        self.out.completions.clear()
        self.out.events.clear()

    def _enter_error(self) -> None:
        """ERR: every send WQE not yet completed, then every posted receive,
        completes with ``IB_WC_WR_FLUSH_ERR`` after what completed already
        (rxe_comp.c ``flush_send_queue``, rxe_resp.c ``flush_recv_queue``)."""
        self.state = IbQpState.ERR
        completions = self.out.completions
        for wqe in self._flush_send_queue():
            completions.append(Completion(CqSide.SEND, flush_wc(wqe, self.qpn)))
        for wr in self._recv_in_progress():
            completions.append(Completion(CqSide.RECV, self._recv_flush_wc(wr)))
        for wr in self.rq:
            completions.append(Completion(CqSide.RECV, self._recv_flush_wc(wr)))
        self.rq.clear()
        if self.srq is not None:
            # The SRQ's WQEs stay for its other QPs; this one says it will
            # take no more (rxe_resp.c flush_recv_queue).
            self.out.events.append(LastWqeReached())

    def _recv_in_progress(self) -> list[RecvWR]:
        """A receive WQE taken off the SRQ for a message not yet complete:
        it is no longer on any queue, so leaving ERR-bound it completes
        with ``IB_WC_WR_FLUSH_ERR`` here."""
        return []

    def _flush_send_queue(self) -> list[SendWqe]:
        """Empty the send queue; return the WQEs not yet completed."""
        raise NotImplementedError

    def _recv_flush_wc(self, wr: RecvWR) -> WorkCompletion:
        return WorkCompletion(wr.wr_id, _FLUSH, IbWcOpcode.RECV, self.qpn)


class NoAckQp(QpBase):
    """A QP whose send WQEs complete as soon as they are sent (UD and UC:
    no ACK answers them, nothing is retransmitted): its send queue is a
    FIFO they leave from the front, and it never holds back output or
    arms a timer. A subclass sends one WQE in :meth:`_send_one`."""

    sq: deque[SendWqe]

    def _init_transport(self) -> None:
        self.sq = deque()
        self.psn = 0
        self._drain_pending = False

    @property
    def sq_outstanding(self) -> int:
        """Send WQEs posted and not yet completed."""
        return len(self.sq)

    def _flush_send_queue(self) -> list[SendWqe]:
        pending = list(self.sq)
        self.sq.clear()
        return pending

    def _send_one(self, wqe: SendWqe) -> None:
        """rxe_req.c ``rxe_requester`` for one WQE of the QP's type."""
        raise NotImplementedError

    def poll(self, now: float) -> Output:
        """Send what is queued (in RTS: a failed WQE that moves the QP to
        ERR stops the rest, which flushes) and hand back the output; in SQD
        report the send queue drained (nothing waits for an ACK)."""
        sq = self.sq
        while sq and self.state is IbQpState.RTS:
            self._send_one(sq.popleft())
        if self._drain_pending and self.state is IbQpState.SQD:
            self._drain_pending = False
            self.out.events.append(SqDrained())
        return self.out.take()

    reply_hold = 0.0
    """Output is never held back (see :attr:`RcQp.reply_hold
    <softrdma.transport.rc.RcQp.reply_hold>`)."""

    def reply_pending(self) -> bool:
        """Output is never held back."""
        return False

    def next_deadline(self) -> float | None:
        """No timers: nothing is retransmitted."""
        return None
