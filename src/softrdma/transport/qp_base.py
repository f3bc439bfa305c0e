"""What every transport QP has, whatever its type: the state, the
attributes, the receive queue, the output, and the rules for posting and
flushing that IBTA gives all of them.

Kernel counterpart: the type-independent part of ``struct rxe_qp``
(``drivers/infiniband/sw/rxe/rxe_verbs.h``) and of ``rxe_post_send`` /
``rxe_post_recv`` / ``rxe_qp_error``. :class:`~softrdma.transport.rc.RcQp`
and :class:`~softrdma.transport.ud.UdQp` build on it.
"""

from __future__ import annotations

from collections import Counter, deque
from typing import ClassVar

from softrdma.transport.errors import LocalProtocolError
from softrdma.transport.memory_port import MemoryPort
from softrdma.transport.srq import SharedRq
from softrdma.transport.wqe import WR_IMM, Completion, CqSide, LastWqeReached, Output, SendWqe
from softrdma.verbs.enums import IbQpState, IbWcFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.qp import QpAttr
from softrdma.verbs.wr import RecvWR, WorkCompletion

__all__ = ["QpBase", "flush_wc", "send_wc"]

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
    """"RC" or "UD", for messages."""

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
