"""One RC queue pair's transport: requester, completer and responder, sans-IO.

Kernel counterpart: the RC half of ``drivers/infiniband/sw/rxe`` — the QP's
three tasks (``rxe_requester`` in ``rxe_req.c``, ``rxe_completer`` in
``rxe_comp.c``, ``rxe_responder`` in ``rxe_resp.c``), the per-QP timers
(``retrans_timer``, ``rnr_nak_timer``), the state changes of ``rxe_qp.c``
(``rxe_qp_from_attr``, ``rxe_qp_error``) and the dispatch of
``rxe_recv.c`` (``rxe_rcv_pkt``: requests to the responder, responses to
the completer).

A device drives one :class:`RcTransport` per RC QP::

    rc = RcTransport(qpn, memport)
    rc.modify(params, IbQpState.INIT); ...; rc.modify(params, IbQpState.RTS)
    rc.post_recv(recv_wr); rc.post_send(SendWqe.from_wr(wr))
    rc.receive(packet, now)            # every packet addressed to the QP
    out = rc.poll(now)                 # after any input, and at next_deadline()
    out.packets / out.completions / out.events
    rc.next_deadline()                 # when to poll() again with no input
    rc.flush()                         # on ERR: everything left, WR_FLUSH_ERR

Nothing here sleeps, reads a clock or touches memory other than through
the :class:`~softrdma.transport.memory_port.MemoryPort`: the same inputs give
the same outputs.

How verbs QP states map to the engines' states::

    IbQpState   requester (ReqState)   responder (RespQpState)
    RESET       RESET                  RESET
    INIT        INIT                   INIT
    RTR         INIT                   READY   (expects rq_psn)
    RTS         READY  (sends sq_psn)  READY
    SQD         DRAIN -> DRAINED       READY
    ERR         ERROR                  ERROR
"""

from __future__ import annotations

from collections import Counter

from softrdma.transport.completer import Completer, send_wc
from softrdma.transport.memory_port import MemoryPort
from softrdma.transport.opcodes import OPCODE_TABLE, Transport
from softrdma.transport.packet import Packet
from softrdma.transport.params import QpParams
from softrdma.transport.requester import ReqState, Requester
from softrdma.transport.responder import Responder, RespQpState
from softrdma.transport.wqe import Completion, CqSide, Output, QpFatal, SendWqe, SqDrained
from softrdma.verbs.enums import IbEventType, IbQpState, IbQpType, IbWcOpcode, IbWcStatus
from softrdma.verbs.wr import RecvWR, WorkCompletion

__all__ = ["RcTransport"]

_ACTIVE = (ReqState.READY, ReqState.DRAIN, ReqState.DRAINED)
_RC = Transport.RC


class RcTransport:
    """The transport of one RC QP (rxe ``struct rxe_qp`` for ``IB_QPT_RC``)."""

    def __init__(self, qpn: int, mem: MemoryPort, counters: Counter[str] | None = None) -> None:
        self.qpn = qpn
        self.mem = mem
        self.params = QpParams(qpn)
        self.qp_state = IbQpState.RESET
        self._now = 0.0  # time of the last poll
        self._out = Output(counters=Counter() if counters is None else counters)
        self.req = Requester(qpn, mem, self._out)
        self.comp = Completer(self.req, self._req_fatal)
        self.req.comp = self.comp
        self.resp = Responder(qpn, mem, self._out, self._fatal)

    # -- control --------------------------------------------------------------

    @property
    def state(self) -> IbQpState:
        """The verbs QP state last set with :meth:`modify`."""
        return self.qp_state

    @property
    def sq_outstanding(self) -> int:
        """Send WQEs posted and not yet completed (the send queue depth in use)."""
        return len(self.req.sq) - self.req.sq_head

    @property
    def rq_outstanding(self) -> int:
        """Receive WQEs posted and not yet completed."""
        return len(self.resp.rq)

    def modify(self, params: QpParams, new_state: IbQpState) -> None:
        """Apply ``ib_modify_qp`` (rxe_qp.c ``rxe_qp_from_attr``): new attributes
        and the state the verbs layer has already validated. Entering RTR
        starts the responder at ``rq_psn``, entering RTS from RTR starts the
        requester at ``sq_psn``; SQD stops starting WQEs (``SqDrained`` once
        the started ones complete); ERR stops both (then :meth:`flush`)."""
        if params.qpn != self.qpn or params.qp_type is not IbQpType.RC:
            raise ValueError(f"RC QP {self.qpn:#x} got parameters for {params!r}")
        self.params = params
        self.req.set_params(params)
        self.resp.set_params(params)
        req, resp = self.req, self.resp
        if new_state is IbQpState.RESET:
            req.reset()
            resp.reset()
            req.state = ReqState.RESET
            resp.state = RespQpState.RESET
        elif new_state is IbQpState.INIT:
            req.set_state(ReqState.INIT)
            resp.set_state(RespQpState.INIT)
        elif new_state is IbQpState.RTR:
            if resp.state is not RespQpState.READY:
                resp.set_state(RespQpState.READY)
                resp.start()
        elif new_state is IbQpState.RTS:
            if resp.state is not RespQpState.READY:
                resp.set_state(RespQpState.READY)
                resp.start()
            if req.state is ReqState.INIT:
                req.set_state(ReqState.READY)
                req.start()
            elif req.state is not ReqState.READY:
                req.set_state(ReqState.READY)  # SQD -> RTS resumes
        elif new_state is IbQpState.SQD:
            if req.state is ReqState.READY:
                req.set_state(ReqState.DRAIN)
        elif new_state is IbQpState.ERR:
            req.set_state(ReqState.ERROR)
            resp.set_state(RespQpState.ERROR)
        else:
            raise ValueError(f"RC QP cannot enter {new_state.name}")
        self.qp_state = new_state

    def _fatal(
        self, status: IbWcStatus, reason: str, event: IbEventType = IbEventType.QP_FATAL
    ) -> None:
        """rxe_qp.c ``rxe_qp_error``: the whole QP stops; the device is told
        with a :class:`QpFatal` and moves the QP to ERR."""
        if self.req.state is ReqState.ERROR and self.resp.state is RespQpState.ERROR:
            return
        self._out.events.append(QpFatal(status, reason, event))
        self.req.state = ReqState.ERROR
        self.resp.state = RespQpState.ERROR

    def _req_fatal(self, status: IbWcStatus, reason: str) -> None:
        self._fatal(status, reason, IbEventType.QP_FATAL)

    # -- work requests --------------------------------------------------------

    def post_send(self, wqe: SendWqe) -> None:
        """Queue a send WQE (rxe_verbs.c ``rxe_post_send``). In ERR it
        completes at once with ``IB_WC_WR_FLUSH_ERR``."""
        if self.qp_state is IbQpState.RESET:
            raise ValueError(f"QP {self.qpn:#x}: post_send in RESET")
        if self.req.state is ReqState.ERROR:
            wc = send_wc(wqe, self.qpn, IbWcStatus.WR_FLUSH_ERR)
            self._out.completions.append(Completion(CqSide.SEND, wc))
            return
        self.req.post(wqe)

    def post_recv(self, wr: RecvWR) -> None:
        """Queue a receive WQE (rxe_verbs.c ``rxe_post_recv``). In ERR it
        completes at once with ``IB_WC_WR_FLUSH_ERR``."""
        if self.qp_state is IbQpState.RESET:
            raise ValueError(f"QP {self.qpn:#x}: post_recv in RESET")
        if self.resp.state is RespQpState.ERROR:
            wc = WorkCompletion(wr.wr_id, IbWcStatus.WR_FLUSH_ERR, IbWcOpcode.RECV, self.qpn)
            self._out.completions.append(Completion(CqSide.RECV, wc))
            return
        self.resp.rq.append(wr)

    # -- packets and time -----------------------------------------------------

    def receive(self, pkt: Packet, now: float) -> None:
        """Take one packet addressed to this QP (rxe_recv.c ``rxe_rcv_pkt``):
        requests go to the responder, ACKs and responses to the completer.
        Opcodes of another transport, and packets the QP's state does not
        accept, are dropped silently (``check_type_state``)."""
        info = OPCODE_TABLE[pkt.bth.opcode]
        if info is None or info.qp_type is not _RC:
            return
        if info.is_request:
            self.resp.receive(pkt, info)
        elif info.is_response and self.req.state in _ACTIVE:
            self.comp.receive(pkt, info, now)

    def poll(self, now: float) -> Output:
        """Run the engines at time ``now`` and hand back what they produced
        since the last poll (rxe ``rxe_sender``: requester, then completer;
        the timers fire here)."""
        self._now = now
        if self.resp.pending():
            self.resp.run()
        req = self.req
        if req.state in _ACTIVE:
            comp = self.comp
            if req.rnr_deadline is not None and now >= req.rnr_deadline:
                # rxe_req.c rnr_nak_timer(): go back N now.
                req.rnr_deadline = None
                req.wait_for_rnr_timer = False
                req.need_retry = True
            timeout = req.retrans_deadline is not None and now >= req.retrans_deadline
            if timeout:
                req.retrans_deadline = None
            comp.run(now, timeout)
            while req.state in _ACTIVE:
                head = req.sq_head
                req.run(now)
                comp.run(now)
                # Loop only while completions unblock fenced WQEs.
                if req.sq_head == head or req.wqe_index >= len(req.sq):
                    break
            if req.state is ReqState.DRAIN and req.drained():
                req.set_state(ReqState.DRAINED)
                self._out.events.append(SqDrained())
        return self._out.take()

    def next_deadline(self) -> float | None:
        """The earliest time :meth:`poll` has timer work to do, or ``None``."""
        if self.resp.pending():
            return self._now  # an unfinished READ reply: poll again at once
        req = self.req
        if req.state not in _ACTIVE:
            return None
        a, b = req.retrans_deadline, req.rnr_deadline
        if a is None:
            return b
        if b is None:
            return a
        return min(a, b)

    def flush(self) -> list[Completion]:
        """Complete everything left with ``IB_WC_WR_FLUSH_ERR``, in order: send
        WQEs not yet completed, then posted receives (rxe_comp.c
        ``rxe_drain_resp_pkts`` / rxe_resp.c ``RESPST_ERROR`` path). Completions
        not yet polled come first. Both engines end in ERROR."""
        out = self._out
        result = out.completions
        out.completions = []
        req, resp = self.req, self.resp
        flush = IbWcStatus.WR_FLUSH_ERR
        qpn = self.qpn
        for wqe in req.sq[req.sq_head :]:
            result.append(Completion(CqSide.SEND, send_wc(wqe, qpn, flush)))
        req.sq.clear()
        req.sq_head = req.wqe_index = 0
        for wr in resp.rq:
            wc = WorkCompletion(wr.wr_id, flush, IbWcOpcode.RECV, qpn)
            result.append(Completion(CqSide.RECV, wc))
        resp.rq.clear()
        resp.cur = None
        resp.queue.clear()
        resp.wqe = None
        resp.recv_offset = 0
        req.state = ReqState.ERROR
        resp.state = RespQpState.ERROR
        req.retrans_deadline = req.rnr_deadline = None
        return result
