"""The RC responder: executes request packets and answers them.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_resp.c`` (``rxe_responder``
and its states ``RESPST_*``: ``check_psn``, ``check_op_seq``,
``check_op_valid``, ``check_resource``, ``rxe_resp_check_length``,
``check_rkey``, ``execute``, ``send_data_in``, ``write_data_in``,
``read_reply``, ``atomic_reply``, ``do_complete``, ``acknowledge``,
``duplicate_request``, ``find_resource``, ``rxe_prepare_res``,
``do_class_ac_error``).

Every request packet runs through :class:`RespState`, the rxe state
machine::

    CHK_PSN        psn > expected: first time -> ERR_PSN_OUT_OF_SEQ (NAK,
                   class B), then silently dropped until the expected PSN
                   comes; psn < expected -> DUPLICATE_REQUEST; else ->
    CHK_OP_SEQ     MIDDLE/LAST must continue the message in progress, a new
                   message must not start while one is open -> ERR_MISSING_*
    CHK_OP_VALID   READ / WRITE / atomic need the QP's remote access flag ->
                   ERR_UNSUPPORTED_OPCODE
    CHK_RESOURCE   READ/atomic need max_dest_rd_atomic > 0 -> ERR_TOO_MANY_*;
                   SEND FIRST/ONLY and WRITE-with-immediate need a posted
                   receive -> ERR_RNR (RNR NAK, class B)
    CHK_LENGTH     FIRST/MIDDLE carry exactly one MTU, LAST 1..MTU, ONLY
                   0..MTU, RETH length <= 2**31 -> ERR_LENGTH
    CHK_RKEY       the whole RETH / AtomicETH range is checked on the first
                   packet, before any byte moves -> ERR_RKEY_VIOLATION;
                   WRITE packet lengths must match what is left -> ERR_LENGTH
    EXECUTE        SEND: scatter into the receive WQE; WRITE: write memory;
                   READ -> READ_REPLY; atomic -> ATOMIC_REPLY
    READ_REPLY     all response packets for the READ (FIRST/MIDDLE/LAST/ONLY,
                   AETH on FIRST/LAST/ONLY) -> CLEANUP
    ATOMIC_REPLY   execute once, save the original value -> ACKNOWLEDGE
    COMPLETE       receive completion (or its error) -> ACKNOWLEDGE
    ACKNOWLEDGE    a pending NAK, an ATOMIC ACKNOWLEDGE, or an ACK when the
                   request asked for one (AckReq) -> CLEANUP -> DONE
    DUPLICATE_REQUEST  SEND/WRITE: re-ACK, never re-execute; READ: read the
                   memory again from the saved resource; atomic: replay the
                   saved original value; no resource: drop (class D)
    ERR_*          class A/C: NAK, receive WQE completes in error, QP -> ERR
                   (``ERROR``)

QP-level state (:class:`RespQpState`, rxe ``qp->resp.state``)::

    RESET --INIT--> INIT --RTR--> READY (expected PSN := rq_psn) --ERR or a
    class A/C error--> ERROR; any --RESET--> RESET

Deviations from rxe, each for a reason given where it happens: a receive
buffer too small for a SEND completes with ``IB_WC_LOC_LEN_ERR`` (rxe:
``IB_WC_REM_INV_REQ_ERR``), any other fault on the receive buffer NAKs
remote operational error with the fault's own status; a failed
SEND_WITH_INVALIDATE NAKs invalid request (rxe ACKs, then errors the QP);
a WRITE with a zero RETH length must carry no payload; RC receive
completions carry no ``IB_WC_GRH`` flag (no GRH is placed for RC).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Final

from softrdma.transport.headers import (
    AETH_CREDIT_INVALID,
    Aeth,
    AethType,
    AtomicAckEth,
    NakCode,
    aeth_syndrome,
)
from softrdma.transport.memory_port import LocalAccessError, MemoryPort, RemoteAccessError
from softrdma.transport.opcodes import Opcode as _Op
from softrdma.transport.opcodes import OpcodeInfo
from softrdma.transport.packet import Packet
from softrdma.transport.params import QpParams
from softrdma.transport.psn import PSN_HALF, PSN_MASK
from softrdma.transport.wqe import Completion, CqSide, OutPacket, Output
from softrdma.verbs.enums import IbAccess, IbEventType, IbWcFlags, IbWcOpcode, IbWcStatus
from softrdma.verbs.wr import RecvWR, WorkCompletion

__all__ = ["READ_BURST", "RESP_TRANSITIONS", "RespQpState", "RespRes", "RespState", "Responder"]


class RespQpState(enum.IntEnum):
    """The responder's QP-level state (rxe ``qp->resp.state``)."""

    RESET = 0
    INIT = 1
    READY = 2
    ERROR = 3


RESP_TRANSITIONS: dict[RespQpState, frozenset[RespQpState]] = {
    RespQpState.RESET: frozenset({RespQpState.RESET, RespQpState.INIT, RespQpState.ERROR}),
    RespQpState.INIT: frozenset(
        {RespQpState.RESET, RespQpState.INIT, RespQpState.READY, RespQpState.ERROR}
    ),
    RespQpState.READY: frozenset({RespQpState.RESET, RespQpState.READY, RespQpState.ERROR}),
    RespQpState.ERROR: frozenset({RespQpState.RESET, RespQpState.ERROR}),
}
"""Allowed responder state changes."""


class RespState(enum.IntEnum):
    """rxe_resp.c ``enum resp_states`` (the subset RC needs; see the module
    docstring for the transitions)."""

    NONE = 0
    GET_REQ = 1
    CHK_PSN = 2
    CHK_OP_SEQ = 3
    CHK_OP_VALID = 4
    CHK_RESOURCE = 5
    CHK_LENGTH = 6
    CHK_RKEY = 7
    EXECUTE = 8
    READ_REPLY = 9
    ATOMIC_REPLY = 10
    COMPLETE = 11
    ACKNOWLEDGE = 12
    CLEANUP = 13
    DUPLICATE_REQUEST = 14
    ERR_MALFORMED_WQE = 15
    ERR_UNSUPPORTED_OPCODE = 16
    ERR_MISALIGNED_ATOMIC = 17
    ERR_PSN_OUT_OF_SEQ = 18
    ERR_MISSING_OPCODE_FIRST = 19
    ERR_MISSING_OPCODE_LAST_C = 20
    ERR_TOO_MANY_RDMA_ATM_REQ = 21
    ERR_RNR = 22
    ERR_RKEY_VIOLATION = 23
    ERR_INVALIDATE_RKEY = 24
    ERR_LENGTH = 25
    ERROR = 26
    DONE = 27


_S = RespState
_ACK_SYN: Final = aeth_syndrome(AethType.ACK, AETH_CREDIT_INVALID)
_NAK_SEQ: Final = aeth_syndrome(AethType.NAK, NakCode.PSN_SEQ_ERR)
_NAK_INV: Final = aeth_syndrome(AethType.NAK, NakCode.INVALID_REQUEST)
_NAK_ACC: Final = aeth_syndrome(AethType.NAK, NakCode.REMOTE_ACCESS_ERR)
_NAK_OP: Final = aeth_syndrome(AethType.NAK, NakCode.REMOTE_OP_ERR)
_NAK_SYN: dict[NakCode, int] = {
    NakCode.INVALID_REQUEST: _NAK_INV,
    NakCode.REMOTE_ACCESS_ERR: _NAK_ACC,
    NakCode.REMOTE_OP_ERR: _NAK_OP,
}
_SEND_CONT = frozenset(
    {
        _Op.RC_SEND_MIDDLE,
        _Op.RC_SEND_LAST,
        _Op.RC_SEND_LAST_WITH_IMMEDIATE,
        _Op.RC_SEND_LAST_WITH_INVALIDATE,
    }
)
_WRITE_CONT = frozenset(
    {_Op.RC_RDMA_WRITE_MIDDLE, _Op.RC_RDMA_WRITE_LAST, _Op.RC_RDMA_WRITE_LAST_WITH_IMMEDIATE}
)
_SEND_OPEN = frozenset({_Op.RC_SEND_FIRST, _Op.RC_SEND_MIDDLE})
_WRITE_OPEN = frozenset({_Op.RC_RDMA_WRITE_FIRST, _Op.RC_RDMA_WRITE_MIDDLE})
_RESP_READ = (
    _Op.RC_RDMA_READ_RESPONSE_FIRST,
    _Op.RC_RDMA_READ_RESPONSE_MIDDLE,
    _Op.RC_RDMA_READ_RESPONSE_LAST,
    _Op.RC_RDMA_READ_RESPONSE_ONLY,
)
_REMOTE_READ = int(IbAccess.REMOTE_READ)
_REMOTE_WRITE = int(IbAccess.REMOTE_WRITE)
_REMOTE_ATOMIC = int(IbAccess.REMOTE_ATOMIC)
_MAX_DMA_LEN = 1 << 31
READ_BURST = 64
"""READ response packets generated per pass (rxe bounds them with its
in-flight skb limit, ``RXE_INFLIGHT_SKBS_PER_QP_HIGH``)."""  # IBTA C9-94 (rxe_resp_check_length)
_SUCCESS = IbWcStatus.SUCCESS
_tuple_new = tuple.__new__


def _psn_diff(a: int, b: int) -> int:
    return ((a - b + PSN_HALF) & PSN_MASK) - PSN_HALF


class RespRes:
    """A responder resource (rxe ``struct resp_res``): what a READ or atomic
    needs to be answered again when its request is repeated. There are
    ``max_dest_rd_atomic`` of them, reused round robin."""

    __slots__ = (
        "cur_psn",
        "first_psn",
        "is_read",
        "last_psn",
        "length",
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
        self.replay = False
        self.started = False

    def covers(self, psn: int) -> bool:
        """``first_psn <= psn <= last_psn`` (rxe ``find_resource``)."""
        return _psn_diff(psn, self.first_psn) >= 0 and _psn_diff(psn, self.last_psn) <= 0


class Responder:
    """The receive side of one RC QP (rxe ``qp->resp`` and the receive queue).

    ``psn`` is the next expected PSN, ``ack_psn`` one past the last request
    executed, ``msn`` the 24-bit count of completed messages carried in every
    AETH, ``opcode`` the last request opcode executed (-1 between messages).
    ``wqe`` is the receive WQE being filled (the head of ``rq``). ``fatal``
    moves the QP to ERR.
    """

    def __init__(
        self,
        qpn: int,
        mem: MemoryPort,
        out: Output,
        fatal: Callable[[IbWcStatus, str, IbEventType], None],
    ) -> None:
        self.qpn = qpn
        self.mem = mem
        self.out = out
        self.fatal = fatal
        self.params = QpParams(qpn)
        self.access = 0  # int(params.qp_access_flags)
        self.state = RespQpState.RESET
        self.rq: deque[RecvWR] = deque()
        self.psn = 0
        self.ack_psn = 0
        self.msn = 0
        self.opcode = -1
        self.sent_psn_nak = False
        self.wqe: RecvWR | None = None
        self.recv_offset = 0
        # RETH / AtomicETH of the message in progress (rxe qp->resp.va ...).
        self.va = 0
        self.rkey = 0
        self.resid = 0
        self.length = 0
        # Per-packet outcome.
        self.aeth_syndrome = _ACK_SYN
        self.status = _SUCCESS
        self.local_status: IbWcStatus | None = None
        self.nak: NakCode = NakCode.REMOTE_ACCESS_ERR
        self.goto_error = False
        self.error_reason = ""
        self.resources: list[RespRes] = []
        self.res_head = 0
        self.res: RespRes | None = None
        # The READ whose reply is unfinished, and requests queued behind it.
        self.cur: tuple[Packet, OpcodeInfo] | None = None
        self.queue: deque[tuple[Packet, OpcodeInfo]] = deque()
        self._handlers: dict[RespState, Callable[[Packet, OpcodeInfo], RespState]] = {
            _S.CHK_PSN: self._check_psn,
            _S.CHK_OP_SEQ: self._check_op_seq,
            _S.CHK_OP_VALID: self._check_op_valid,
            _S.CHK_RESOURCE: self._check_resource,
            _S.CHK_LENGTH: self._check_length,
            _S.CHK_RKEY: self._check_rkey,
            _S.EXECUTE: self._execute,
            _S.READ_REPLY: self._read_reply,
            _S.ATOMIC_REPLY: self._atomic_reply,
            _S.COMPLETE: self._do_complete,
            _S.ACKNOWLEDGE: self._acknowledge,
            _S.DUPLICATE_REQUEST: self._duplicate_request,
        }

    # -- QP state -------------------------------------------------------------

    def set_state(self, new: RespQpState) -> None:
        """Change the QP-level state (checked against :data:`RESP_TRANSITIONS`)."""
        if new not in RESP_TRANSITIONS[self.state]:
            raise ValueError(f"responder: {self.state.name} -> {new.name} is not a transition")
        self.state = new

    def set_params(self, params: QpParams) -> None:
        """Adopt new QP attributes (rxe_qp.c ``rxe_qp_from_attr``)."""
        self.params = params
        self.access = int(params.qp_access_flags)

    def start(self) -> None:
        """Enter READY (modify to RTR): expect ``rq_psn``, allocate the
        ``max_dest_rd_atomic`` resources (rxe_qp.c ``rxe_qp_init_resp``)."""
        p = self.params
        self.psn = self.ack_psn = p.rq_psn
        self.msn = 0
        self.opcode = -1
        self.sent_psn_nak = False
        self.resources = [RespRes() for _ in range(p.max_dest_rd_atomic)]
        self.res_head = 0
        self.res = None

    def reset(self) -> None:
        """Back to RESET: drop the receive queue without completions."""
        self.rq.clear()
        self.cur = None
        self.queue.clear()
        self.wqe = None
        self.recv_offset = 0
        self.res = None

    # -- per packet -----------------------------------------------------------

    def receive(self, pkt: Packet, info: OpcodeInfo) -> None:
        """Take one request packet (rxe ``rxe_resp_queue_pkt``). It is
        processed at once unless a READ reply is still being generated; then
        it waits its turn, as in rxe's ``req_pkts`` queue."""
        if self.state is not RespQpState.READY:
            return  # rxe_recv.c check_type_state(): dropped
        if self.cur is not None or self.queue:
            self.queue.append((pkt, info))
            return
        self._responder(pkt, info, _S.CHK_PSN)

    def pending(self) -> bool:
        """A READ reply is unfinished or requests are waiting for it."""
        return self.cur is not None or bool(self.queue)

    def run(self) -> None:
        """Continue an unfinished READ reply by up to :data:`READ_BURST`
        packets, then process the requests that queued up behind it
        (rxe ``get_req``: ``qp->resp.res ? RESPST_READ_REPLY : RESPST_CHK_PSN``)."""
        if self.state is not RespQpState.READY:
            self.cur = None
            self.queue.clear()
            return
        if self.cur is not None:
            pkt, info = self.cur
            self._responder(pkt, info, _S.READ_REPLY)
        queue = self.queue
        while self.cur is None and queue and self.state is RespQpState.READY:
            pkt, info = queue.popleft()
            self._responder(pkt, info, _S.CHK_PSN)

    def _responder(self, pkt: Packet, info: OpcodeInfo, state: RespState) -> None:
        """rxe_resp.c ``rxe_responder``: run one packet through the states."""
        self.aeth_syndrome = _ACK_SYN
        self.status = _SUCCESS
        self.local_status = None
        handlers = self._handlers
        while True:
            h = handlers.get(state)
            if h is not None:
                state = h(pkt, info)
                continue
            if state is _S.CLEANUP or state is _S.DONE:
                break
            state = self._error_state(state, pkt)
        if self.cur is None:
            self.res = None  # rxe cleanup(): the resource is only kept for replays
        if self.goto_error:
            self.goto_error = False
            self.cur = None
            self.queue.clear()
            self.state = RespQpState.ERROR
            event = (
                IbEventType.QP_ACCESS_ERR
                if self.aeth_syndrome == _NAK_ACC
                else IbEventType.QP_REQ_ERR
                if self.aeth_syndrome == _NAK_INV
                else IbEventType.QP_FATAL
            )
            self.fatal(self.status, self.error_reason, event)

    def _error_state(self, state: RespState, pkt: Packet) -> RespState:
        """The ``RESPST_ERR_*`` cases of ``rxe_responder``."""
        if state is _S.ERR_PSN_OUT_OF_SEQ:
            # Class B: NAK with the PSN we expect; the packet is dropped.
            self._send_ack(_NAK_SEQ, self.psn)
            return _S.CLEANUP
        if state is _S.ERR_RNR:
            # Class B: RNR NAK with our minimum RNR timer, for this PSN.
            self.out.counters["send_rnr_err"] += 1
            self._send_ack(aeth_syndrome(AethType.RNR_NAK, self.params.min_rnr_timer), pkt.bth.psn)
            return _S.CLEANUP
        if state is _S.ERR_RKEY_VIOLATION:
            status = (
                IbWcStatus.REM_INV_REQ_ERR
                if self.nak is NakCode.INVALID_REQUEST
                else IbWcStatus.REM_OP_ERR
                if self.nak is NakCode.REMOTE_OP_ERR
                else IbWcStatus.REM_ACCESS_ERR
            )
            return self._class_ac(_NAK_SYN.get(self.nak, _NAK_ACC), status, "R_Key violation")
        if state is _S.ERR_LENGTH:
            return self._class_ac(
                _NAK_INV, self.local_status or IbWcStatus.REM_INV_REQ_ERR, "length error"
            )
        if state is _S.ERR_MALFORMED_WQE:
            # Class A: the receive WQE could not take the data.
            return self._class_ac(
                _NAK_OP, self.local_status or IbWcStatus.LOC_QP_OP_ERR, "receive WQE fault"
            )
        if state is _S.ERR_INVALIDATE_RKEY:
            return self._class_ac(_NAK_INV, IbWcStatus.REM_INV_REQ_ERR, "invalid IETH R_Key")
        # ERR_TOO_MANY_RDMA_ATM_REQ, ERR_MISSING_OPCODE_*, ERR_UNSUPPORTED_OPCODE,
        # ERR_MISALIGNED_ATOMIC: class C invalid request.
        return self._class_ac(_NAK_INV, IbWcStatus.REM_INV_REQ_ERR, state.name.lower())

    def _class_ac(self, syndrome: int, status: IbWcStatus, why: str) -> RespState:
        """rxe_resp.c ``do_class_ac_error``: NAK, complete the receive WQE in
        error, then the QP goes to ERR."""
        self.aeth_syndrome = syndrome
        self.status = status
        self.goto_error = True
        self.error_reason = f"responder: {why}"
        return _S.COMPLETE

    def _check_psn(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        diff = _psn_diff(pkt.bth.psn, self.psn)
        if diff > 0:
            if self.sent_psn_nak:
                return _S.CLEANUP
            self.sent_psn_nak = True
            self.out.counters["out_of_seq_request"] += 1  # once per NAK, as rxe
            return _S.ERR_PSN_OUT_OF_SEQ
        if diff < 0:
            self.out.counters["duplicate_request"] += 1
            return _S.DUPLICATE_REQUEST
        self.sent_psn_nak = False
        return _S.CHK_OP_SEQ

    def _check_op_seq(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        last = self.opcode
        op = pkt.bth.opcode
        if last in _SEND_OPEN:
            return _S.CHK_OP_VALID if op in _SEND_CONT else _S.ERR_MISSING_OPCODE_LAST_C
        if last in _WRITE_OPEN:
            return _S.CHK_OP_VALID if op in _WRITE_CONT else _S.ERR_MISSING_OPCODE_LAST_C
        if op in _SEND_CONT or op in _WRITE_CONT:
            return _S.ERR_MISSING_OPCODE_FIRST
        return _S.CHK_OP_VALID

    def _check_op_valid(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``check_qp_attr_access``: the QP must allow the operation."""
        flags = self.access
        if (
            (info.is_read and not flags & _REMOTE_READ)
            or (info.is_write and not flags & _REMOTE_WRITE)
            or (info.is_atomic and not flags & _REMOTE_ATOMIC)
        ):
            return _S.ERR_UNSUPPORTED_OPCODE
        return _S.CHK_RESOURCE

    def _check_resource(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        if info.is_read or info.is_atomic:
            # The requester must not exceed our resources; we just recycle.
            return (
                _S.CHK_LENGTH
                if self.params.max_dest_rd_atomic > 0
                else (_S.ERR_TOO_MANY_RDMA_ATM_REQ)
            )
        if info.consumes_recv_wqe:
            if not self.rq:
                return _S.ERR_RNR
            self.wqe = self.rq[0]
        return _S.CHK_LENGTH

    def _check_length(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``rxe_resp_check_length`` (IBTA C9-92, C9-94)."""
        if info.has_payload:
            mtu = self.params.path_mtu
            n = len(pkt.payload)
            if info.is_only:
                if n > mtu:
                    return _S.ERR_LENGTH
            elif info.is_first or info.is_middle:
                if n != mtu:
                    return _S.ERR_LENGTH
            elif info.is_last and (n == 0 or n > mtu):
                return _S.ERR_LENGTH
        reth = pkt.reth
        if reth is not None and reth.dma_len > _MAX_DMA_LEN:
            return _S.ERR_LENGTH
        return _S.CHK_RKEY

    def _check_rkey(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``check_rkey``: the whole range of the RETH / AtomicETH
        is validated on the first packet, before any byte is written."""
        if info.is_read or info.is_write:
            reth = pkt.reth
            if reth is not None:
                # qp_resp_from_reth()
                self.va = reth.va
                self.rkey = reth.rkey
                self.resid = self.length = reth.dma_len
            access = IbAccess.REMOTE_READ if info.is_read else IbAccess.REMOTE_WRITE
        elif info.is_atomic:
            atmeth = pkt.atmeth
            assert atmeth is not None
            self.va = atmeth.va
            self.rkey = atmeth.rkey
            self.resid = 8
            access = IbAccess.REMOTE_ATOMIC
        else:
            return _S.EXECUTE
        if info.is_write:
            # Each WRITE packet must carry exactly its share of the rest.
            n = len(pkt.payload)
            resid = self.resid
            if n != (self.params.path_mtu if resid > self.params.path_mtu else resid):
                return _S.ERR_LENGTH
        if pkt.reth is not None and pkt.reth.dma_len == 0:
            return _S.EXECUTE  # zero-length READ/WRITE: no R_Key check (C9-88)
        if pkt.reth is not None or info.is_atomic:
            try:
                self.mem.check_rkey(self.rkey, self.va, self.resid, access)
            except RemoteAccessError as e:
                self.nak = e.nak
                return _S.ERR_RKEY_VIOLATION
        if info.is_atomic and self.va & 7:
            return _S.ERR_MISALIGNED_ATOMIC
        return _S.EXECUTE

    def _execute(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``execute``: a new request, never a repeated one."""
        payload = pkt.payload
        n = len(payload)
        if info.is_send:
            wqe = self.wqe
            assert wqe is not None  # check_resource() took it
            if n:
                try:
                    self.mem.scatter(wqe.sg_list, self.recv_offset, payload)
                except LocalAccessError as e:
                    self.local_status = e.status
                    # A receive buffer too small is an invalid request (rxe
                    # send_data_in -ENOSPC); any other fault is class A.
                    if e.status is IbWcStatus.LOC_LEN_ERR:
                        return _S.ERR_LENGTH
                    return _S.ERR_MALFORMED_WQE
                self.recv_offset += n
        elif info.is_write:
            if n:
                try:
                    self.mem.remote_write(self.rkey, self.va, payload)
                except RemoteAccessError as e:
                    self.nak = e.nak
                    return _S.ERR_RKEY_VIOLATION
                self.va += n
                self.resid -= n
        elif info.is_read:
            # The MSN counts the READ now (C9-148).
            self.msn = (self.msn + 1) & PSN_MASK
            return _S.READ_REPLY
        else:
            return _S.ATOMIC_REPLY
        if info.has_invalidate:
            ieth = pkt.ieth
            assert ieth is not None
            try:
                self.mem.remote_invalidate(ieth.inv_rkey)
            except (RemoteAccessError, LocalAccessError):
                return _S.ERR_INVALIDATE_RKEY
        if info.is_last or info.is_only:
            self.msn = (self.msn + 1) & PSN_MASK
        self.psn = self.ack_psn = (pkt.bth.psn + 1) & PSN_MASK
        self.opcode = pkt.bth.opcode
        self.status = _SUCCESS
        return _S.COMPLETE if info.completes else _S.ACKNOWLEDGE

    def _prepare_res(self, pkt: Packet, is_read: bool) -> RespRes:
        """rxe_resp.c ``rxe_prepare_res``: take the next resource round robin."""
        res = self.resources[self.res_head]
        self.res_head = (self.res_head + 1) % len(self.resources)
        res.valid = True
        res.is_read = is_read
        res.replay = False
        res.started = False
        psn = pkt.bth.psn
        res.first_psn = res.cur_psn = psn
        if is_read:
            mtu = self.params.path_mtu
            res.va = res.va_org = self.va
            res.resid = res.length = self.resid
            res.rkey = self.rkey
            res.last_psn = (psn + max(1, -(-self.resid // mtu)) - 1) & PSN_MASK
        else:
            res.last_psn = psn
        return res

    def _read_reply(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``read_reply``: the response packets of a READ, at most
        :data:`READ_BURST` per pass; an unfinished reply continues at the next
        :meth:`run` (``self.cur`` holds its request, like the skb rxe leaves
        at the head of ``req_pkts``).

        A new READ starts with FIRST (or ONLY); a repeated one restarts at the
        requested PSN, with FIRST/ONLY at the READ's first PSN and MIDDLE/LAST
        inside it. AETH (ACK, MSN) goes on FIRST, LAST and ONLY. The memory is
        read when each packet is built, so a repeated READ returns the current
        data.
        """
        res = self.res
        if res is None:
            res = self._prepare_res(pkt, True)
            self.res = res
        elif not res.started and res.resid:
            # A replay: the MR may have changed since (rxe_recheck_mr).
            try:
                self.mem.check_rkey(res.rkey, res.va, res.resid, IbAccess.REMOTE_READ)
            except RemoteAccessError as e:
                self.cur = None
                self.nak = e.nak
                return _S.ERR_RKEY_VIOLATION
        p = self.params
        mtu = p.path_mtu
        dest_qp = p.dest_qpn
        pkey = p.pkey
        first, middle, last, only = _RESP_READ
        remote_read = self.mem.remote_read
        packets = self.out.packets
        aeth = Aeth(_ACK_SYN, self.msn)
        # FIRST / ONLY only at the READ's first PSN.
        start = not res.started and res.cur_psn == res.first_psn
        res.started = True
        rkey = res.rkey
        va = res.va
        resid = res.resid
        psn = res.cur_psn
        for _ in range(READ_BURST):
            n = resid if resid < mtu else mtu
            if start:  # noqa: SIM108
                opcode = only if resid <= mtu else first
            else:
                opcode = middle if resid > mtu else last
            if n:
                try:
                    data = remote_read(rkey, va, n)
                except RemoteAccessError as e:
                    self.cur = None
                    self.nak = e.nak
                    return _S.ERR_RKEY_VIOLATION
            else:
                data = b""
            pkt_out = Packet.build(
                opcode,
                dest_qp=dest_qp,
                psn=psn,
                payload=data,
                pkey=pkey,
                aeth=aeth if opcode != middle else None,
            )
            packets.append(_tuple_new(OutPacket, (pkt_out, None)))
            va += n
            resid -= n
            psn = (psn + 1) & PSN_MASK
            start = False
            if resid <= 0:
                break
        res.va, res.resid, res.cur_psn = va, resid, psn
        if resid > 0:
            self.cur = (pkt, info)  # more next time (rxe: RESPST_DONE)
            return _S.DONE
        self.cur = None
        if not res.replay:
            self.opcode = -1
        if _psn_diff(psn, self.psn) >= 0:
            self.psn = psn
        return _S.CLEANUP

    def _atomic_reply(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``atomic_reply``: execute once and remember the original
        value; a repeated request only replays it."""
        res = self.res
        if res is None:
            atmeth = pkt.atmeth
            assert atmeth is not None
            try:
                orig = self.mem.atomic(
                    self.rkey,
                    self.va,
                    pkt.bth.opcode == _Op.RC_COMPARE_SWAP,
                    atmeth.compare,
                    atmeth.swap_add,
                )
            except RemoteAccessError as e:
                self.nak = e.nak
                return _S.ERR_RKEY_VIOLATION
            res = self._prepare_res(pkt, False)
            res.orig = orig
            self.msn = (self.msn + 1) & PSN_MASK
            self.psn = self.ack_psn = (pkt.bth.psn + 1) & PSN_MASK
            self.opcode = pkt.bth.opcode
            self.status = _SUCCESS
        self.res = res
        return _S.ACKNOWLEDGE

    def _do_complete(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``do_complete``: the receive completion (or its error)."""
        wqe = self.wqe
        if wqe is not None:
            status = self.status
            if status is _SUCCESS:
                flags = IbWcFlags(0)
                imm = 0
                inv = 0
                if info.has_immediate:
                    flags |= IbWcFlags.WITH_IMM
                    assert pkt.immdt is not None
                    imm = pkt.immdt.imm
                if info.has_invalidate:
                    flags |= IbWcFlags.WITH_INVALIDATE
                    assert pkt.ieth is not None
                    inv = pkt.ieth.inv_rkey
                if info.is_write:
                    # WRITE with immediate: byte_len is the RDMA length (rxe).
                    wc = WorkCompletion(
                        wqe.wr_id, status, IbWcOpcode.RECV_RDMA_WITH_IMM, self.qpn,
                        self.length, flags, imm,
                    )  # fmt: skip
                else:
                    wc = WorkCompletion(
                        wqe.wr_id, status, IbWcOpcode.RECV, self.qpn, self.recv_offset,
                        flags, imm, inv,
                    )  # fmt: skip
            else:
                wc = WorkCompletion(wqe.wr_id, status, IbWcOpcode.RECV, self.qpn)
            self.out.completions.append(Completion(CqSide.RECV, wc, pkt.bth.se))
            self.rq.popleft()
            self.wqe = None
            self.recv_offset = 0
        return _S.ACKNOWLEDGE

    def _send_ack(self, syndrome: int, psn: int) -> None:
        """rxe_resp.c ``send_ack``: an ACKNOWLEDGE with ``syndrome`` for ``psn``."""
        p = self.params
        pkt = Packet.build(
            _Op.RC_ACKNOWLEDGE,
            dest_qp=p.dest_qpn,
            psn=psn,
            pkey=p.pkey,
            aeth=Aeth(syndrome, self.msn),
        )
        self.out.packets.append(_tuple_new(OutPacket, (pkt, None)))

    def _acknowledge(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``acknowledge``: NAKs always, atomics always, otherwise
        only when the requester set AckReq (ACK coalescing)."""
        if self.aeth_syndrome != _ACK_SYN:
            self._send_ack(self.aeth_syndrome, pkt.bth.psn)
        elif info.is_atomic:
            res = self.res
            assert res is not None
            self.res = None
            p = self.params
            ack = Packet.build(
                _Op.RC_ATOMIC_ACKNOWLEDGE,
                dest_qp=p.dest_qpn,
                psn=pkt.bth.psn,
                pkey=p.pkey,
                aeth=Aeth(_ACK_SYN, self.msn),
                atmack=AtomicAckEth(res.orig),
            )
            self.out.packets.append(_tuple_new(OutPacket, (ack, None)))
        elif pkt.bth.ack_req:
            self._send_ack(_ACK_SYN, pkt.bth.psn)
        return _S.CLEANUP

    def _find_resource(self, psn: int, is_read: bool) -> RespRes | None:
        for res in self.resources:
            if res.valid and res.is_read == is_read and res.covers(psn):
                return res
        return None

    def _duplicate_request(self, pkt: Packet, info: OpcodeInfo) -> RespState:
        """rxe_resp.c ``duplicate_request``."""
        if info.is_send or info.is_write:
            # C9-105: ACK again with the last PSN executed; never re-execute.
            self._send_ack(_ACK_SYN, (self.ack_psn - 1) & PSN_MASK)
            return _S.CLEANUP
        res = self._find_resource(pkt.bth.psn, info.is_read)
        if res is None:
            return _S.CLEANUP  # class D: no resource, drop
        if info.is_read:
            reth = pkt.reth
            assert reth is not None
            # The repeated READ must be the original or a tail of it.
            if (
                reth.va < res.va_org
                or reth.dma_len > res.length
                or reth.va + reth.dma_len > res.va_org + res.length
                or reth.rkey != res.rkey
            ):
                return _S.CLEANUP
            res.cur_psn = pkt.bth.psn
            res.replay = True
            res.started = False
            res.va = reth.va
            res.resid = reth.dma_len
            self.res = res
            return _S.READ_REPLY
        res.replay = True
        res.cur_psn = pkt.bth.psn
        self.res = res
        return _S.ATOMIC_REPLY
