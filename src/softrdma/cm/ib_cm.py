"""The IB CM state machine of one connection, sans-IO.

Kernel counterpart: ``drivers/infiniband/core/cm.c`` — ``struct
cm_id_private`` and its handlers (``ib_send_cm_req`` / ``cm_req_handler``,
``ib_send_cm_rep`` / ``cm_rep_handler``, ``ib_send_cm_rtu`` /
``cm_rtu_handler``, ``ib_send_cm_rej`` / ``cm_rej_handler``,
``ib_send_cm_mra`` / ``cm_mra_handler``, ``ib_send_cm_dreq`` /
``cm_dreq_handler``, ``ib_send_cm_drep`` / ``cm_drep_handler``,
``cm_process_send_error``, ``cm_enter_timewait``, ``cm_destroy_id``).

A :class:`CmConnection` is fed the consumer's calls (``send_*``), the CM
messages the port demultiplexed to it (``recv_*``), the end of a send that
was waiting for an answer (:meth:`CmConnection.send_failed`) and the end of
its time-wait (:meth:`CmConnection.timewait_expired`). It changes state only
along :data:`TRANSITIONS` and answers with actions in :attr:`CmConnection.out`
for its binding (:mod:`softrdma.cm.cm_port`) to carry out:

- :class:`Send` — post a CM message; with ``timeout_ms`` it is retransmitted
  by the MAD layer ``retries`` times until :class:`Cancel` (an answer came)
  or until it fails (``send_failed``);
- :class:`Cancel`, :class:`ExtendTimeout` (an MRA arrived);
- :class:`StartTimewait` — call ``timewait_expired`` after ``delay_ms``;
- :class:`CmEvent` — tell the consumer (``ib_cm_handler``).

States (``enum ib_cm_state``):

- IDLE — no connection (new, rejected, failed, or after time-wait).
- REQ_SENT / MRA_REQ_RCVD — active: the REQ is out; the peer asked for
  more time (MRA).
- REQ_RCVD / MRA_REQ_SENT — passive: the REQ is with the consumer; we asked
  the peer for more time.
- REP_SENT / MRA_REP_RCVD — passive: the REP is out, waiting for the RTU.
- REP_RCVD / MRA_REP_SENT — active: the REP is with the consumer.
- ESTABLISHED — connected.
- DREQ_SENT / DREQ_RCVD — disconnecting, from this side or the peer's.
- TIMEWAIT — disconnected; the QPN and the comm IDs may not be reused yet.

Duplicates are answered as cm.c does: a repeated REP in ESTABLISHED gets the
RTU again, a repeated DREQ in TIMEWAIT the DREP again, a repeated REQ in
MRA_REQ_SENT the MRA again; other repeats are dropped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace

from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmMra,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
)
from softrdma.errors import SoftRdmaError

__all__ = [
    "TRANSITIONS",
    "Cancel",
    "CmAction",
    "CmConnection",
    "CmEvent",
    "CmEventType",
    "CmState",
    "CmStateError",
    "ExtendTimeout",
    "Send",
    "StartTimewait",
    "cm_convert_to_ms",
]


class CmState(enum.IntEnum):
    """``enum ib_cm_state``."""

    IDLE = 0
    LISTEN = 1
    REQ_SENT = 2
    REQ_RCVD = 3
    MRA_REQ_SENT = 4
    MRA_REQ_RCVD = 5
    REP_SENT = 6
    REP_RCVD = 7
    MRA_REP_SENT = 8
    MRA_REP_RCVD = 9
    ESTABLISHED = 10
    DREQ_SENT = 11
    DREQ_RCVD = 12
    TIMEWAIT = 13


class CmEventType(enum.IntEnum):
    """``enum ib_cm_event_type``."""

    REQ_ERROR = 0
    REQ_RECEIVED = 1
    REP_ERROR = 2
    REP_RECEIVED = 3
    RTU_RECEIVED = 4
    USER_ESTABLISHED = 5
    DREQ_ERROR = 6
    DREQ_RECEIVED = 7
    DREP_RECEIVED = 8
    TIMEWAIT_EXIT = 9
    MRA_RECEIVED = 10
    REJ_RECEIVED = 11


S = CmState
TRANSITIONS: dict[CmState, frozenset[CmState]] = {
    S.IDLE: frozenset({S.REQ_SENT, S.REQ_RCVD}),
    S.REQ_SENT: frozenset({S.MRA_REQ_RCVD, S.REP_RCVD, S.IDLE, S.TIMEWAIT}),
    S.MRA_REQ_RCVD: frozenset({S.REP_RCVD, S.IDLE, S.TIMEWAIT}),
    S.REQ_RCVD: frozenset({S.MRA_REQ_SENT, S.REP_SENT, S.IDLE}),
    S.MRA_REQ_SENT: frozenset({S.REP_SENT, S.IDLE}),
    S.REP_SENT: frozenset({S.MRA_REP_RCVD, S.ESTABLISHED, S.DREQ_RCVD, S.IDLE, S.TIMEWAIT}),
    S.MRA_REP_RCVD: frozenset({S.ESTABLISHED, S.DREQ_RCVD, S.IDLE, S.TIMEWAIT}),
    S.REP_RCVD: frozenset({S.MRA_REP_SENT, S.ESTABLISHED, S.IDLE, S.TIMEWAIT}),
    S.MRA_REP_SENT: frozenset({S.ESTABLISHED, S.IDLE, S.TIMEWAIT}),
    S.ESTABLISHED: frozenset({S.DREQ_SENT, S.DREQ_RCVD, S.TIMEWAIT}),
    S.DREQ_SENT: frozenset({S.DREQ_RCVD, S.TIMEWAIT}),
    S.DREQ_RCVD: frozenset({S.TIMEWAIT}),
    S.TIMEWAIT: frozenset({S.IDLE}),
    S.LISTEN: frozenset(),
}
"""Every state change a connection may make (h11's explicit table); any
other raises :class:`CmStateError`, an engine bug."""
del S


def cm_convert_to_ms(iba_time: int) -> int:
    """cm.c ``cm_convert_to_ms``: an IBA time exponent (4.096 µs × 2**t) in
    milliseconds, rounded up to a power of two."""
    return 1 << max(iba_time - 8, 0)


class CmStateError(SoftRdmaError, RuntimeError):
    """The consumer asked for something the connection's state does not
    allow (``-EINVAL`` from ``ib_send_cm_*``), e.g. an RTU before a REP."""


@dataclass(frozen=True, slots=True)
class Send:
    """Post ``msg``; with ``timeout_ms`` it waits for an answer and is
    retransmitted ``retries`` times before :meth:`CmConnection.send_failed`."""

    msg: CmMessage
    timeout_ms: int = 0
    retries: int = 0


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop retransmitting the message that waits for an answer (``ib_cancel_mad``)."""


@dataclass(frozen=True, slots=True)
class ExtendTimeout:
    """The peer sent an MRA: wait ``timeout_ms`` more (``ib_modify_mad``)."""

    timeout_ms: int


@dataclass(frozen=True, slots=True)
class StartTimewait:
    """Call :meth:`CmConnection.timewait_expired` in ``delay_ms``."""

    delay_ms: int


@dataclass(frozen=True, slots=True)
class CmEvent:
    """``struct ib_cm_event``: what happened, the message that carried it,
    and for errors and rejects a status (the REJ reason, or ``ETIMEDOUT``)."""

    type: CmEventType
    msg: CmMessage | None = None
    status: int = 0


CmAction = Send | Cancel | ExtendTimeout | StartTimewait | CmEvent


@dataclass
class CmConnection:
    """``struct cm_id_private``: one connection's CM state. ``local_id`` is
    our comm ID, ``tid`` the transaction ID every message of the connection
    carries (the active side's, ``cm_form_tid``)."""

    local_id: int
    tid: int
    local_ca_guid: int
    state: CmState = CmState.IDLE
    remote_id: int = 0
    remote_ca_guid: int = 0
    remote_qpn: int = 0
    local_qpn: int = 0
    service_id: int = 0
    timeout_ms: int = 0
    """How long a message that waits for an answer waits each time."""
    max_cm_retries: int = 0
    timewait_ms: int = 0
    req: CmReq | None = None
    """The REQ, sent or received: the connection's parameters."""
    rep: CmRep | None = None
    out: list[CmAction] = field(default_factory=list)
    _last: CmMessage | None = None  # the last message sent, for duplicates

    def __repr__(self) -> str:
        return f"CmConnection({self.local_id:#x}, {self.state.name}, remote={self.remote_id:#x})"

    def take(self) -> list[CmAction]:
        """The actions produced since the last call."""
        out, self.out = self.out, []
        return out

    # -- the table -----------------------------------------------------------------

    def _to(self, state: CmState) -> None:
        if state is not self.state and state not in TRANSITIONS[self.state]:
            raise AssertionError(f"CM: {self.state.name} -> {state.name} is not in the table")
        self.state = state

    def _require(self, what: str, *states: CmState) -> None:
        if self.state not in states:
            raise CmStateError(f"{what} in CM state {self.state.name} ({self!r})")

    def _send(self, msg: CmMessage, wait: bool = False) -> None:
        self._last = msg
        if wait:
            self.out.append(Send(msg, self.timeout_ms, self.max_cm_retries))
        else:
            self.out.append(Send(msg))

    def _enter_timewait(self) -> None:
        """cm.c ``cm_enter_timewait``: the QPN stays reserved a while."""
        self._to(CmState.TIMEWAIT)
        self.out.append(StartTimewait(self.timewait_ms))

    # -- active side ------------------------------------------------------------

    def send_req(self, req: CmReq, timewait_ms: int) -> None:
        """``ib_send_cm_req``: ``req`` with our comm ID and CA GUID filled in
        is sent and retransmitted every ``cm_convert_to_ms`` of its remote CM
        response timeout (plus twice the packet life time) up to its
        ``max_cm_retries``."""
        self._require("send REQ", CmState.IDLE)
        req = replace(req, local_comm_id=self.local_id, local_ca_guid=self.local_ca_guid)
        self.req = req
        self.service_id = req.service_id
        self.local_qpn = req.local_qpn
        # Twice the packet life time (one less than the ACK timeout the REQ
        # carries) plus the time the peer's CM may take to answer.
        life = max(req.primary_local_ack_timeout - 1, 0)
        self.timeout_ms = 2 * cm_convert_to_ms(life) + cm_convert_to_ms(
            req.remote_cm_response_timeout
        )
        self.max_cm_retries = req.max_cm_retries
        self.timewait_ms = timewait_ms
        self._to(CmState.REQ_SENT)
        self._send(req, wait=True)

    def recv_rep(self, rep: CmRep) -> None:
        """``cm_rep_handler``: the answer to our REQ — to the consumer, who
        readies its QP and sends the RTU (or rejects)."""
        if self.state in (CmState.REQ_SENT, CmState.MRA_REQ_RCVD):
            self.rep = rep
            self.remote_id = rep.local_comm_id
            self.remote_ca_guid = rep.local_ca_guid
            self.remote_qpn = rep.local_qpn
            self.out.append(Cancel())
            self._to(CmState.REP_RCVD)
            self.out.append(CmEvent(CmEventType.REP_RECEIVED, rep))
        elif (
            self.state is CmState.ESTABLISHED
            and rep.local_comm_id == self.remote_id
            and isinstance(self._last, CmRtu)
        ):
            # cm_dup_rep_handler: our RTU was lost; send it again.
            self.out.append(Send(self._last))
        # Any other state: a stale or duplicate REP, dropped.

    def send_rtu(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_rtu``: the connection is up on our side."""
        self._require("send RTU", CmState.REP_RCVD, CmState.MRA_REP_SENT)
        self._to(CmState.ESTABLISHED)
        self._send(
            CmRtu(
                local_comm_id=self.local_id,
                remote_comm_id=self.remote_id,
                private_data=private_data,
            )
        )

    def recv_mra(self, mra: CmMra) -> None:
        """``cm_mra_handler``: the peer needs more time for our REQ or REP."""
        wait = cm_convert_to_ms(mra.service_timeout) + self.timeout_ms
        if self.state is CmState.REQ_SENT and mra.message_mraed == 0:
            self._to(CmState.MRA_REQ_RCVD)
        elif self.state is CmState.REP_SENT and mra.message_mraed == 1:
            self._to(CmState.MRA_REP_RCVD)
        elif self.state not in (CmState.MRA_REQ_RCVD, CmState.MRA_REP_RCVD):
            return
        self.out.append(ExtendTimeout(wait))
        self.out.append(CmEvent(CmEventType.MRA_RECEIVED, mra))

    # -- passive side ----------------------------------------------------------------

    def recv_req(self, req: CmReq, timewait_ms: int) -> None:
        """``cm_req_handler``: a new connection request, to the consumer."""
        self._require("receive REQ", CmState.IDLE)
        self.req = req
        self.remote_id = req.local_comm_id
        self.remote_ca_guid = req.local_ca_guid
        self.remote_qpn = req.local_qpn
        self.service_id = req.service_id
        self.timeout_ms = cm_convert_to_ms(req.local_cm_response_timeout)
        self.max_cm_retries = req.max_cm_retries
        self.timewait_ms = timewait_ms
        self._to(CmState.REQ_RCVD)
        self.out.append(CmEvent(CmEventType.REQ_RECEIVED, req))

    def recv_dup_req(self) -> None:
        """``cm_dup_req_handler``: the peer sent its REQ again."""
        if self.state is CmState.MRA_REQ_SENT and isinstance(self._last, CmMra):
            self.out.append(Send(self._last))
        elif self.state is CmState.TIMEWAIT:
            self.out.append(Send(self._rej(CmRejReason.STALE_CONN, 0)))

    def send_mra(self, service_timeout: int, private_data: bytes = b"") -> None:
        """``ib_send_cm_mra``: ask the peer to wait 4.096 µs × 2**``service_timeout`` more."""
        if self.state is CmState.REQ_RCVD:
            mraed, state = 0, CmState.MRA_REQ_SENT
        elif self.state is CmState.REP_RCVD:
            mraed, state = 1, CmState.MRA_REP_SENT
        else:
            raise CmStateError(f"send MRA in CM state {self.state.name}")
        self._to(state)
        self._send(
            CmMra(
                local_comm_id=self.local_id,
                remote_comm_id=self.remote_id,
                message_mraed=mraed,
                service_timeout=service_timeout,
                private_data=private_data,
            )
        )

    def send_rep(self, rep: CmRep) -> None:
        """``ib_send_cm_rep``: accept; the REP waits for the RTU."""
        self._require("send REP", CmState.REQ_RCVD, CmState.MRA_REQ_SENT)
        rep = replace(
            rep,
            local_comm_id=self.local_id,
            remote_comm_id=self.remote_id,
            local_ca_guid=self.local_ca_guid,
        )
        self.rep = rep
        self.local_qpn = rep.local_qpn
        self._to(CmState.REP_SENT)
        self._send(rep, wait=True)

    def recv_rtu(self, rtu: CmRtu) -> None:
        """``cm_rtu_handler``: the active side is up too."""
        if self.state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
            self.out.append(Cancel())
            self._to(CmState.ESTABLISHED)
            self.out.append(CmEvent(CmEventType.RTU_RECEIVED, rtu))

    def established(self) -> None:
        """``ib_cm_notify(IB_EVENT_COMM_EST)``: traffic arrived on the QP
        before the RTU (it was lost): the connection is up."""
        if self.state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
            self.out.append(Cancel())
            self._to(CmState.ESTABLISHED)
            self.out.append(CmEvent(CmEventType.USER_ESTABLISHED))

    # -- rejecting ------------------------------------------------------------------

    def _rej(self, reason: int, mrej: int, private_data: bytes = b"", ari: bytes = b"") -> CmRej:
        return CmRej(
            local_comm_id=self.local_id,
            remote_comm_id=self.remote_id,
            message_rejected=mrej,
            reject_info_length=len(ari),
            reason=reason,
            ari=ari,
            private_data=private_data,
        )

    def send_rej(
        self, reason: int = CmRejReason.CONSUMER_DEFINED, private_data: bytes = b""
    ) -> None:
        """``ib_send_cm_rej``: refuse the REQ or the REP we were given."""
        if self.state in (CmState.REQ_RCVD, CmState.MRA_REQ_SENT):
            mrej = 0
        elif self.state in (CmState.REP_RCVD, CmState.MRA_REP_SENT):
            mrej = 1
        else:
            raise CmStateError(f"send REJ in CM state {self.state.name}")
        self._send(self._rej(reason, mrej, private_data))
        if mrej == 0:
            self._to(CmState.IDLE)
        else:
            self._enter_timewait()

    def recv_rej(self, rej: CmRej) -> None:
        """``cm_rej_handler``: the peer refused our REQ or REP, or (STALE_CONN)
        says the connection it knew is gone."""
        state = self.state
        if state in (CmState.REQ_SENT, CmState.MRA_REQ_RCVD):
            self.out.append(Cancel())
            if rej.reason in (CmRejReason.TIMEOUT, CmRejReason.STALE_CONN):
                self._enter_timewait()
            else:
                self._to(CmState.IDLE)
        elif state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
            self.out.append(Cancel())
            self._enter_timewait()
        elif state in (CmState.REQ_RCVD, CmState.MRA_REQ_SENT):
            self._to(CmState.IDLE)  # the active side gave up
        elif state in (CmState.REP_RCVD, CmState.MRA_REP_SENT) or (
            state is CmState.ESTABLISHED and rej.reason == CmRejReason.STALE_CONN
        ):
            self._enter_timewait()
        else:
            return
        self.out.append(CmEvent(CmEventType.REJ_RECEIVED, rej, rej.reason))

    # -- disconnecting ------------------------------------------------------------------

    def send_dreq(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_dreq``: start disconnecting; the DREQ waits for the DREP."""
        self._require("send DREQ", CmState.ESTABLISHED)
        self._to(CmState.DREQ_SENT)
        dreq = CmDreq(
            local_comm_id=self.local_id,
            remote_comm_id=self.remote_id,
            remote_qpn=self.remote_qpn,
            private_data=private_data,
        )
        self._send(dreq, wait=True)

    def recv_dreq(self, dreq: CmDreq) -> None:
        """``cm_dreq_handler``: the peer disconnects (an established
        connection, or one whose RTU we never got)."""
        state = self.state
        if state in (CmState.ESTABLISHED, CmState.REP_SENT, CmState.MRA_REP_RCVD):
            if state is not CmState.ESTABLISHED:
                self.out.append(Cancel())
            self._to(CmState.DREQ_RCVD)
            self.out.append(CmEvent(CmEventType.DREQ_RECEIVED, dreq))
        elif state is CmState.DREQ_SENT:
            # Both sides disconnect at once: answer, and keep waiting for ours.
            self.out.append(Send(self._drep()))
        elif state is CmState.TIMEWAIT and isinstance(self._last, CmDrep):
            self.out.append(Send(self._last))  # our DREP was lost

    def _drep(self, private_data: bytes = b"") -> CmDrep:
        return CmDrep(
            local_comm_id=self.local_id, remote_comm_id=self.remote_id, private_data=private_data
        )

    def send_drep(self, private_data: bytes = b"") -> None:
        """``ib_send_cm_drep``: answer the peer's DREQ; then time-wait."""
        self._require("send DREP", CmState.DREQ_RCVD)
        self._send(self._drep(private_data))
        self._enter_timewait()

    def recv_drep(self, drep: CmDrep) -> None:
        """``cm_drep_handler``: our DREQ is answered."""
        if self.state is CmState.DREQ_SENT:
            self.out.append(Cancel())
            self._enter_timewait()
            self.out.append(CmEvent(CmEventType.DREP_RECEIVED, drep))

    # -- time ------------------------------------------------------------------------

    def send_failed(self, status: int) -> None:
        """``cm_process_send_error``: the message that waited for an answer
        got none after every retry (``status`` is the errno to report)."""
        state = self.state
        if state in (CmState.REQ_SENT, CmState.MRA_REQ_RCVD):
            self._to(CmState.IDLE)
            self.out.append(CmEvent(CmEventType.REQ_ERROR, status=status))
        elif state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
            self._to(CmState.IDLE)
            self.out.append(CmEvent(CmEventType.REP_ERROR, status=status))
        elif state is CmState.DREQ_SENT:
            self._enter_timewait()
            self.out.append(CmEvent(CmEventType.DREQ_ERROR, status=status))

    def timewait_expired(self) -> None:
        """``cm_work_handler`` for the time-wait timer."""
        if self.state is CmState.TIMEWAIT:
            self._to(CmState.IDLE)
            self.out.append(CmEvent(CmEventType.TIMEWAIT_EXIT))

    def destroy(self) -> None:
        """``cm_destroy_id``: leave the peer knowing it — reject a REQ or REP
        in hand, disconnect an established connection (one DREQ, no
        waiting), answer a DREQ. A connection that had a QP ends in
        TIMEWAIT, where its port keeps answering stale messages."""
        state = self.state
        if state in (CmState.REQ_SENT, CmState.MRA_REQ_RCVD):
            self.out.append(Cancel())
            self._send(self._rej(CmRejReason.TIMEOUT, 0))
            self._to(CmState.IDLE)
        elif state in (CmState.REQ_RCVD, CmState.MRA_REQ_SENT, CmState.REP_RCVD,
                       CmState.MRA_REP_SENT):  # fmt: skip
            self.send_rej(CmRejReason.CONSUMER_DEFINED)
        elif state in (CmState.REP_SENT, CmState.MRA_REP_RCVD):
            self.out.append(Cancel())
            self._send(self._rej(CmRejReason.CONSUMER_DEFINED, 1))
            self._enter_timewait()
        elif state is CmState.ESTABLISHED:
            self._send(
                CmDreq(
                    local_comm_id=self.local_id,
                    remote_comm_id=self.remote_id,
                    remote_qpn=self.remote_qpn,
                )
            )
            self._enter_timewait()
        elif state is CmState.DREQ_SENT:
            self.out.append(Cancel())
            self._enter_timewait()
        elif state is CmState.DREQ_RCVD:
            self.send_drep()
