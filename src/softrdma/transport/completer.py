"""The RC completer: matches ACKs and responses to send WQEs and completes them.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_comp.c`` (``rxe_completer``
and its states ``COMPST_*``: ``get_wqe``, ``check_psn``, ``check_ack``,
``do_read``, ``do_atomic``, ``complete_ack``, ``complete_wqe``,
``do_complete``, ``make_send_cqe``, ``retransmit_timer``, ``rnrnak_usec``).

Every response packet (ACKNOWLEDGE, ATOMIC ACKNOWLEDGE, RDMA READ RESPONSE)
runs through the per-packet state machine :data:`COMPLETER`: a table of
state → (handler, states it may go to), dispatched by :func:`receive` /
:func:`run` and asserted by the tests. Without a packet the same machine
retires WQEs that need no ACK (local operations) or failed locally, and
handles a fired retransmit timer.

The states (``COMPST_*``) and what each does; where each may go next is
:data:`COMPLETER` alone::

    GET_WQE      look at the oldest WQE: none, not started, done without an
                 ACK (local operation), failed locally, or waiting for this
                 packet; without a packet, stop (or handle a fired timer)
    CHECK_PSN    place the packet's PSN: never sent (ignored: a response can
                 only acknowledge what was sent); past the WQE (a SEND/WRITE
                 is implicitly acknowledged, a READ/atomic lost its
                 response); a duplicate; or the one expected
    CHECK_ACK    response sequence and opcode; ACK, RNR NAK, sequence NAK
                 (everything before the NAK'd PSN acknowledged) or an error
                 NAK; a plain ACK never completes a READ/atomic
    READ         scatter a READ response's payload
    ATOMIC       write the original value to the first SGE
    WRITE_SEND   an ACK of the WQE's last PSN completes it
    COMP_ACK     complete the WQE, give back its READ/atomic credit
    COMP_WQE     complete a WQE acknowledged by a later PSN (or needing none)
    UPDATE_COMP  comp.psn := psn + 1
    ERROR_RETRY  a timeout or a sequence NAK: go back N while retry_cnt
                 lasts, then IB_WC_RETRY_EXC_ERR
    RNR_RETRY    wait the advertised RNR time while rnr_retry lasts (7 =
                 forever), then IB_WC_RNR_RETRY_EXC_ERR
    ERROR        complete the WQE with its error status; the QP enters ERR
                 and flushes (sticky)
    EXIT         nothing more to do: a fired retransmit timer is handled here
    DONE         stop

Deviations from rxe (each also noted where it happens): a response for a
PSN the requester never sent is ignored (rxe takes it as an acknowledgement:
one forged ACK ahead would complete a WRITE that never arrived, or freeze a
long one); ``retry_cnt`` 7 means seven retries as IBTA says (rxe treats it
as infinite), and a PSN sequence NAK that acknowledges new PSNs counts as
progress (resets the count); a plain ACK never completes a READ or atomic
(rxe completes one without its data when a duplicate's re-ACK carries its
PSN); protocol violations by the responder complete with
``IB_WC_BAD_RESP_ERR`` (rxe leaves the status unset or uses
``IB_WC_FATAL_ERR``), including READ responses of the wrong length; the
retransmit timer is only pushed back on progress and is stopped while an
RNR wait is on.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from softrdma.transport.headers import RNR_NAK_USEC, AethType, NakCode
from softrdma.transport.memory_port import LocalAccessError
from softrdma.transport.opcodes import Opcode, OpcodeInfo
from softrdma.transport.packet import Packet
from softrdma.transport.psn import PSN_HALF, PSN_MASK, psn_add, psn_diff
from softrdma.transport.qp_base import send_wc
from softrdma.transport.wqe import (
    WQE_DONE,
    WQE_ERROR,
    WQE_PENDING,
    WQE_POSTED,
    WR_ATOMIC,
    WR_READ,
    WR_RESPONSE,
    Completion,
    CqSide,
    SendWqe,
)
from softrdma.verbs.enums import IbEventType, IbWcStatus

if TYPE_CHECKING:
    from softrdma.transport.rc import CompInfo, RcQp

__all__ = ["COMPLETER", "RETIRABLE", "RNR_RETRY_INFINITE", "CompState", "Step", "receive", "run"]

RNR_RETRY_INFINITE = 7
"""``rnr_retry`` 7 means retry forever (IBTA 9.7.5.2.8; rxe_comp.c)."""


class CompState(enum.IntEnum):
    """rxe_comp.c ``enum comp_state``: where one pass of the completer is
    (see the module docstring)."""

    GET_WQE = 1
    COMP_WQE = 2
    COMP_ACK = 3
    CHECK_PSN = 4
    CHECK_ACK = 5
    READ = 6
    ATOMIC = 7
    WRITE_SEND = 8
    UPDATE_COMP = 9
    ERROR_RETRY = 10
    RNR_RETRY = 11
    ERROR = 12
    EXIT = 13
    DONE = 14


# The states as module names (see wqe.py: ~80 ns an enum attribute, ~10 a
# global; each packet takes several transitions).
GET_WQE = CompState.GET_WQE
COMP_WQE = CompState.COMP_WQE
COMP_ACK = CompState.COMP_ACK
CHECK_PSN = CompState.CHECK_PSN
CHECK_ACK = CompState.CHECK_ACK
READ = CompState.READ
ATOMIC = CompState.ATOMIC
WRITE_SEND = CompState.WRITE_SEND
UPDATE_COMP = CompState.UPDATE_COMP
ERROR_RETRY = CompState.ERROR_RETRY
RNR_RETRY = CompState.RNR_RETRY
ERROR = CompState.ERROR
EXIT = CompState.EXIT
DONE = CompState.DONE


# Opcodes the per-packet checks compare with, as module names (as the states).
RC_ACKNOWLEDGE = Opcode.RC_ACKNOWLEDGE
RC_ATOMIC_ACKNOWLEDGE = Opcode.RC_ATOMIC_ACKNOWLEDGE
RC_RDMA_READ_RESPONSE_FIRST = Opcode.RC_RDMA_READ_RESPONSE_FIRST
RC_RDMA_READ_RESPONSE_MIDDLE = Opcode.RC_RDMA_READ_RESPONSE_MIDDLE
RC_RDMA_READ_RESPONSE_LAST = Opcode.RC_RDMA_READ_RESPONSE_LAST
RC_RDMA_READ_RESPONSE_ONLY = Opcode.RC_RDMA_READ_RESPONSE_ONLY
_READ_RESPONSES = frozenset(
    {
        Opcode.RC_RDMA_READ_RESPONSE_FIRST,
        Opcode.RC_RDMA_READ_RESPONSE_MIDDLE,
        Opcode.RC_RDMA_READ_RESPONSE_LAST,
        Opcode.RC_RDMA_READ_RESPONSE_ONLY,
    }
)
_READ_IN_PROGRESS = frozenset(
    {Opcode.RC_RDMA_READ_RESPONSE_FIRST, Opcode.RC_RDMA_READ_RESPONSE_MIDDLE}
)
_NAK_STATUS: dict[int, IbWcStatus] = {
    NakCode.INVALID_REQUEST: IbWcStatus.REM_INV_REQ_ERR,
    NakCode.REMOTE_ACCESS_ERR: IbWcStatus.REM_ACCESS_ERR,
    NakCode.REMOTE_OP_ERR: IbWcStatus.REM_OP_ERR,
}
_SUCCESS = IbWcStatus.SUCCESS
_ACK_TYPE = int(AethType.ACK)
RETIRABLE = frozenset({WQE_DONE, WQE_ERROR})
"""WQE states the completer retires without a packet (done without an ACK,
or failed locally)."""


class _Pass:
    """One run of the state machine: the QP, the packet (None for a run
    without one), the WQE at the head and what happened."""

    __slots__ = ("info", "now", "pkt", "progress", "qp", "timed_out", "wqe")

    def __init__(self, qp: RcQp, pkt: Packet | None, info: OpcodeInfo | None, now: float) -> None:
        self.qp = qp
        self.pkt = pkt
        self.info = info
        self.now = now
        self.wqe: SendWqe | None = None
        self.progress = False
        self.timed_out = False


# -- entry points -------------------------------------------------------------------------


def receive(qp: RcQp, pkt: Packet, info: OpcodeInfo, now: float) -> None:
    """Process one response packet (rxe ``rxe_comp_queue_pkt`` +
    ``rxe_completer`` with a packet)."""
    comp = qp.comp
    comp.timeout = False
    opcode = pkt.bth.opcode
    if opcode == RC_ACKNOWLEDGE and comp.opcode == -1 and _ack_fast(qp, comp, pkt, now):
        return
    p = _Pass(qp, pkt, info, now)
    if opcode == RC_RDMA_READ_RESPONSE_MIDDLE and comp.opcode in _READ_IN_PROGRESS:
        psn_before = comp.psn
        _dispatch(p, _read_middle_fast(p, comp), psn_before)
    else:
        _dispatch(p)


def _ack_fast(qp: RcQp, comp: CompInfo, pkt: Packet, now: float) -> bool:
    """The table's fixed outcome for an ACK of exactly the last PSN of the
    oldest WQE, a pending SEND / WRITE, between READ replies: GET_WQE →
    CHECK_PSN → CHECK_ACK → WRITE_SEND → COMP_ACK → UPDATE_COMP → DONE in
    one pass, the retransmit timer re-armed. False, having changed
    nothing, when the walk could decide otherwise."""
    head = qp.sq_head
    sq = qp.sq
    aeth = pkt.aeth
    if head >= len(sq) or aeth is None or aeth.syndrome >> 5 != _ACK_TYPE:
        return False
    wqe = sq[head]
    psn = pkt.bth.psn
    if (
        wqe.state is not WQE_PENDING
        or psn != wqe.last_psn
        or wqe.mask & WR_RESPONSE
        or (psn - qp.req.sent_psn) & PSN_MASK < PSN_HALF  # not below every PSN sent
        or (psn - comp.psn) & PSN_MASK >= PSN_HALF  # behind: a duplicate
    ):
        return False
    # reset_retry_counters(), complete_ack(), update_comp() and the re-arm
    # of _dispatch(), written out: one ACK per signalled small message.
    attr = qp.attr
    comp.retry_cnt = attr.retry_cnt
    comp.rnr_retry = attr.rnr_retry
    comp.started_retry = False
    if wqe.has_rd_atomic:
        wqe.has_rd_atomic = False
        qp.req.rd_atomic += 1
    _do_complete(qp, wqe)
    comp.opcode = -1
    comp.psn = psn = (psn + 1) & PSN_MASK
    req = qp.req
    timeout = qp.ack_timeout
    if not req.wait_for_rnr_timer and timeout is not None:
        # psn_diff(req.psn, comp.psn) > 0: more is outstanding
        req.retrans_deadline = now + timeout if 0 < (req.psn - psn) & PSN_MASK < PSN_HALF else None
    return True


def _read_middle_fast(p: _Pass, comp: CompInfo) -> CompState:
    """The table's fixed outcome for the expected READ RESPONSE MIDDLE of the
    oldest WQE, a pending READ: GET_WQE → CHECK_PSN → CHECK_ACK → READ →
    UPDATE_COMP → DONE in one pass. Anything the walk would decide
    differently returns ``GET_WQE`` (untouched) to walk the table from, or
    ``ERROR`` when the scatter faults."""
    qp = p.qp
    pkt = p.pkt
    assert pkt is not None
    head = qp.sq_head
    if head >= len(qp.sq):
        return GET_WQE
    wqe = qp.sq[head]
    psn = pkt.bth.psn
    payload = pkt.payload
    n = len(payload)
    sgl = wqe.sgl
    if (
        wqe.state is not WQE_PENDING
        or psn != comp.psn
        or (psn - qp.req.sent_psn) & PSN_MASK < PSN_HALF
        or 0 < (psn - wqe.last_psn) & PSN_MASK < PSN_HALF
        or not wqe.mask & WR_READ
        or n != qp.mtu
        or n >= wqe.length - wqe.offset
        or sgl is None
    ):
        return GET_WQE
    p.wqe = wqe
    reset_retry_counters(qp)
    try:
        sgl.scatter(wqe.offset, payload)
    except LocalAccessError as e:
        wqe.status = e.status
        return ERROR
    wqe.offset += n
    comp.opcode = RC_RDMA_READ_RESPONSE_MIDDLE
    comp.psn = (psn + 1) & PSN_MASK
    return DONE


def run(qp: RcQp, now: float, timeout: bool) -> None:
    """Run without a packet: retire WQEs that need no ACK, report local
    errors, and retry after a retransmit timeout (rxe ``retransmit_timer``
    → ``rxe_completer`` with ``comp.timeout``)."""
    qp.comp.timeout = timeout
    if not timeout:
        # Without a packet or a fired timer, only a head WQE that is done (a
        # local operation) or failed moves; otherwise GET_WQE -> EXIT -> DONE
        # changes nothing, so skip the pass (it runs after every poll).
        head = qp.sq_head
        if head >= len(qp.sq) or qp.sq[head].state not in RETIRABLE:
            return
    _dispatch(_Pass(qp, None, None, now))


def _dispatch(p: _Pass, state: CompState = GET_WQE, psn_before: int | None = None) -> None:
    comp = p.qp.comp
    if psn_before is None:
        psn_before = comp.psn
    table = COMPLETER
    while state is not DONE:
        handler, allowed = table[state]
        nxt = handler(p)
        if nxt not in allowed:  # an engine bug, never the peer's doing
            raise AssertionError(f"completer: {state.name} -> {nxt.name} is not in the table")
        state = nxt
    # rxe re-arms the retransmit timer after every response; here only on
    # progress, so a peer repeating stale ACKs cannot keep us alive forever.
    if p.progress or comp.psn != psn_before:
        _rearm(p.qp, p.now)


def _rearm(qp: RcQp, now: float) -> None:
    req = qp.req
    if req.wait_for_rnr_timer or qp.ack_timeout is None:
        return
    if 0 < (req.psn - qp.comp.psn) & PSN_MASK < PSN_HALF:  # psn_diff(...) > 0
        req.retrans_deadline = now + qp.ack_timeout
    else:
        req.retrans_deadline = None


def reset_retry_counters(qp: RcQp) -> None:
    """rxe_comp.c ``reset_retry_counters``: any valid response is progress."""
    comp = qp.comp
    comp.retry_cnt = qp.attr.retry_cnt
    comp.rnr_retry = qp.attr.rnr_retry
    comp.started_retry = False


# -- the states ---------------------------------------------------------------------------


def _get_wqe(p: _Pass) -> CompState:
    qp = p.qp
    wqe = qp.sq[qp.sq_head] if qp.sq_head < len(qp.sq) else None
    p.wqe = wqe
    if wqe is None or wqe.state is WQE_POSTED:
        return DONE if p.pkt is not None else EXIT
    if wqe.state is WQE_DONE:
        return COMP_WQE
    if wqe.state is WQE_ERROR:
        return ERROR
    return CHECK_PSN if p.pkt is not None else EXIT


def _check_psn(p: _Pass) -> CompState:
    """rxe_comp.c ``check_psn``, plus: a PSN never sent is ignored."""
    qp = p.qp
    pkt, wqe = p.pkt, p.wqe
    assert pkt is not None and wqe is not None
    psn = pkt.bth.psn
    # psn_diff written out (every response comes here): d < PSN_HALF is
    # "at or ahead", 0 < d < PSN_HALF "ahead".
    if (psn - qp.req.sent_psn) & PSN_MASK < PSN_HALF:
        return DONE  # beyond every PSN sent: forged or stale, not an ACK
    if 0 < (psn - wqe.last_psn) & PSN_MASK < PSN_HALF:
        # The response is past the oldest WQE: a SEND/WRITE is implicitly
        # acknowledged; a READ/atomic lost its response and is retried.
        if wqe.state is WQE_PENDING:
            if wqe.mask & WR_RESPONSE:
                return ERROR_RETRY
            reset_retry_counters(qp)
            return COMP_WQE
        return DONE
    diff = ((psn - qp.comp.psn + PSN_HALF) & PSN_MASK) - PSN_HALF
    if diff < 0:
        if (
            qp.comp.opcode in _READ_IN_PROGRESS
            and pkt.bth.opcode == RC_ACKNOWLEDGE
            and psn_diff(psn, wqe.first_psn) >= 0
        ):
            # A NAK in the midst of a READ reply carries the READ's PSN, which
            # the responses already passed: it is the reply's end, not a
            # duplicate (IBTA 9.9.2.2; rxe "Handle remote errors in the midst
            # of a Read reply sequence").
            return CHECK_ACK
        # A duplicate; it completes the WQE only if it is its last PSN.
        if psn == wqe.last_psn and wqe.state is WQE_PENDING:
            return COMP_ACK
        return DONE
    if diff > 0 and wqe.mask & WR_RESPONSE:
        return DONE
    return CHECK_ACK


def _check_ack(p: _Pass) -> CompState:
    """rxe_comp.c ``check_ack``: response sequence, then opcode."""
    qp = p.qp
    pkt, info, wqe = p.pkt, p.info, p.wqe
    assert pkt is not None and info is not None and wqe is not None
    op = pkt.bth.opcode
    if qp.comp.opcode == -1:
        if not info.starts_message:  # MIDDLE/LAST without FIRST
            return _bad_response(wqe)
    elif op == RC_ACKNOWLEDGE:
        pass  # a NAK may end a READ reply (rxe check_ack: "handle a remote error")
    elif (
        op != RC_RDMA_READ_RESPONSE_MIDDLE
        and op != RC_RDMA_READ_RESPONSE_LAST
        # A retried READ may restart with FIRST (or ONLY) at its first PSN.
        and not (op == RC_RDMA_READ_RESPONSE_FIRST and pkt.bth.psn == wqe.first_psn)
        and not (op == RC_RDMA_READ_RESPONSE_ONLY and wqe.first_psn == wqe.last_psn)
    ):
        return _bad_response(wqe)
    aeth = pkt.aeth
    if op in _READ_RESPONSES:
        if aeth is not None and aeth.syndrome >> 5 != AethType.ACK:
            return _bad_response(wqe)
        if not wqe.mask & WR_READ:
            # FLUSH and ATOMIC WRITE are answered with an RDMA READ
            # RESPONSE ONLY without payload (rxe send_read_response_ack;
            # rxe_comp.c check_ack accepts it for IB_WR_FLUSH /
            # IB_WR_ATOMIC_WRITE).
            if not wqe.mask & WR_RESPONSE or op != RC_RDMA_READ_RESPONSE_ONLY or len(pkt.payload):
                return _bad_response(wqe)
            reset_retry_counters(qp)
            return COMP_ACK
        reset_retry_counters(qp)
        return READ
    assert aeth is not None  # ACKNOWLEDGE and ATOMIC ACKNOWLEDGE carry one
    kind = aeth.syndrome >> 5
    if op == RC_ATOMIC_ACKNOWLEDGE:
        if kind != AethType.ACK or not wqe.mask & WR_ATOMIC:
            return _bad_response(wqe)
        reset_retry_counters(qp)
        return ATOMIC
    if op == RC_ACKNOWLEDGE:
        if kind == AethType.ACK:
            if wqe.mask & WR_RESPONSE:
                # Only its response completes a READ / atomic (/ FLUSH /
                # ATOMIC WRITE). A plain ACK at
                # its PSN is the responder re-acknowledging a duplicate
                # (C9-105: PSN of the last request executed); rxe would
                # complete the WQE here without its data.
                return DONE
            reset_retry_counters(qp)
            return WRITE_SEND
        if kind == AethType.RNR_NAK:
            return RNR_RETRY
        if kind == AethType.NAK:
            code = aeth.syndrome & 0x1F
            if code == NakCode.PSN_SEQ_ERR:
                qp.out.counters["rcvd_seq_err"] += 1
                # A sequence NAK acknowledges every PSN before it. That is
                # progress, so the retry count starts over (rxe only resets it
                # on an ACK; under steady loss a long message would then
                # exhaust it while still advancing).
                if psn_diff(pkt.bth.psn, qp.comp.psn) > 0:
                    qp.comp.psn = pkt.bth.psn
                    reset_retry_counters(qp)
                return ERROR_RETRY
            # Unknown NAK codes are a remote operational error (rxe).
            wqe.status = _NAK_STATUS.get(code, IbWcStatus.REM_OP_ERR)
            return ERROR
    # Reserved AETH type or a response opcode that is not one.
    return _bad_response(wqe)


def _bad_response(wqe: SendWqe) -> CompState:
    wqe.status = IbWcStatus.BAD_RESP_ERR
    return ERROR


def _do_read(p: _Pass) -> CompState:
    """rxe_comp.c ``do_read``: scatter the response into the local SGEs."""
    qp = p.qp
    pkt, info, wqe = p.pkt, p.info, p.wqe
    assert pkt is not None and info is not None and wqe is not None
    payload = pkt.payload
    n = len(payload)
    remaining = wqe.length - wqe.offset
    ends = info.is_last or info.is_only
    # Every response but the last carries exactly one MTU; anything else
    # would put data at the wrong offset (rxe does not check this).
    if (n != remaining) if ends else (n != qp.mtu or n >= remaining):
        return _bad_response(wqe)
    if n:
        # Translated by the first response, kept for the rest and retries.
        sgl = wqe.sgl
        if sgl is None:
            sgl = wqe.sgl = qp.mem.map_sgl(wqe.wr.sg_list, True)
        try:
            sgl.scatter(wqe.offset, payload)
        except LocalAccessError as e:
            wqe.status = e.status
            return ERROR
        wqe.offset += n
    return COMP_ACK if ends else UPDATE_COMP


def _do_atomic(p: _Pass) -> CompState:
    """rxe_comp.c ``do_atomic``: the original remote value, a host-order
    (little-endian) u64, goes to the first SGE."""
    pkt, wqe = p.pkt, p.wqe
    assert pkt is not None and wqe is not None
    atmack = pkt.atmack
    assert atmack is not None
    try:
        p.qp.mem.scatter(wqe.wr.sg_list, 0, atmack.orig_data.to_bytes(8, "little"))
    except LocalAccessError as e:
        wqe.status = e.status
        return ERROR
    return COMP_ACK


def _write_send(p: _Pass) -> CompState:
    pkt, wqe = p.pkt, p.wqe
    assert pkt is not None and wqe is not None
    if wqe.state is WQE_PENDING and wqe.last_psn == pkt.bth.psn:
        return COMP_ACK
    return UPDATE_COMP


def _do_complete(qp: RcQp, wqe: SendWqe) -> None:
    """rxe_comp.c ``do_complete`` / ``make_send_cqe``: a CQE when the WQE is
    signaled (or the QP signals all) or failed (IBTA 10.7.3.1)."""
    wc = send_wc(wqe, wqe.status, qp.qpn, qp.sq_sig_all)
    if wc is not None:
        qp.out.completions.append(Completion(CqSide.SEND, wc))
    qp.sq_head += 1
    # Compact the queue now and then; indices are relative to the list.
    head = qp.sq_head
    if head >= 256 and head * 2 >= len(qp.sq):
        del qp.sq[:head]
        qp.sq_head = 0
        qp.req.wqe_index -= head


def _comp_ack(p: _Pass) -> CompState:
    """rxe_comp.c ``complete_ack``: return the READ/atomic credit."""
    qp = p.qp
    pkt, wqe = p.pkt, p.wqe
    assert pkt is not None and wqe is not None
    if wqe.has_rd_atomic:
        wqe.has_rd_atomic = False
        qp.req.rd_atomic += 1
    _do_complete(qp, wqe)
    p.progress = True
    if psn_diff(pkt.bth.psn, qp.comp.psn) >= 0:
        return UPDATE_COMP
    return DONE


def _comp_wqe(p: _Pass) -> CompState:
    """rxe_comp.c ``complete_wqe``: a WQE acknowledged by a later PSN, or one
    that needed no ACK."""
    qp = p.qp
    wqe = p.wqe
    assert wqe is not None
    comp = qp.comp
    if p.pkt is not None and wqe.state is WQE_PENDING and psn_diff(wqe.last_psn, comp.psn) >= 0:
        comp.psn = psn_add(wqe.last_psn)
        comp.opcode = -1
    _do_complete(qp, wqe)
    p.progress = True
    return GET_WQE


def _update_comp(p: _Pass) -> CompState:
    pkt, info = p.pkt, p.info
    assert pkt is not None and info is not None
    comp = p.qp.comp
    psn = pkt.bth.psn
    comp.opcode = -1 if info.is_last or info.is_only else pkt.bth.opcode
    if (psn - comp.psn) & PSN_MASK < PSN_HALF:  # psn_diff(psn, comp.psn) >= 0
        comp.psn = (psn + 1) & PSN_MASK
    return DONE


def _error_retry(p: _Pass) -> CompState:
    """rxe_comp.c ``COMPST_ERROR_RETRY``: a timeout or a sequence NAK."""
    qp = p.qp
    comp = qp.comp
    wqe = p.wqe
    if wqe is None or wqe.state is WQE_POSTED:
        return DONE
    # One retry sequence at a time, unless the timer fired again.
    if comp.started_retry and not comp.timeout:
        return DONE
    if comp.retry_cnt > 0:
        # IBTA: retry_cnt 7 is seven retries (rxe treats 7 as infinite).
        comp.retry_cnt -= 1
        req = qp.req
        if psn_diff(req.psn, comp.psn) > 0:
            req.need_retry = True
            comp.started_retry = True
            qp.out.counters["completer_retry_err"] += 1
        return DONE
    wqe.status = IbWcStatus.RETRY_EXC_ERR
    qp.out.counters["retry_exceeded_err"] += 1
    return ERROR


def _rnr_retry(p: _Pass) -> CompState:
    """rxe_comp.c ``COMPST_RNR_RETRY``: wait the advertised RNR time, then go
    back N (``rnr_nak_timer``)."""
    qp = p.qp
    comp = qp.comp
    pkt, wqe = p.pkt, p.wqe
    assert pkt is not None and wqe is not None
    qp.out.counters["rcvd_rnr_err"] += 1
    if comp.rnr_retry > 0:
        if comp.rnr_retry != RNR_RETRY_INFINITE:
            comp.rnr_retry -= 1
        aeth = pkt.aeth
        assert aeth is not None
        req = qp.req
        req.wait_for_rnr_timer = True
        req.rnr_deadline = p.now + RNR_NAK_USEC[aeth.syndrome & 0x1F] * 1e-6
        # The RNR wait is not a missing ACK: stop the retransmit timer.
        req.retrans_deadline = None
        return EXIT
    wqe.status = IbWcStatus.RNR_RETRY_EXC_ERR
    qp.out.counters["retry_rnr_exceeded_err"] += 1
    return ERROR


def _error(p: _Pass) -> CompState:
    """Complete the failed WQE, then the whole QP fails (sticky ERR)."""
    qp = p.qp
    wqe = p.wqe
    assert wqe is not None
    if wqe.status is _SUCCESS:
        wqe.status = IbWcStatus.BAD_RESP_ERR
    _do_complete(qp, wqe)
    qp.fatal(wqe.status, f"send WQE wr_id={wqe.wr.wr_id:#x} failed", IbEventType.QP_FATAL)
    return DONE


def _exit(p: _Pass) -> CompState:
    comp = p.qp.comp
    if comp.timeout and p.wqe is not None and not p.timed_out:
        p.timed_out = True  # handle a fired timer once
        return ERROR_RETRY
    return DONE


class Step(NamedTuple):
    """A row of a state table: the handler of a state and the states it may
    go to next (h11's explicit state table; the dispatcher refuses any other
    transition)."""

    handler: Callable[[_Pass], CompState]
    next: frozenset[CompState]


COMPLETER: dict[CompState, Step] = {
    GET_WQE: Step(
        _get_wqe,
        frozenset(
            {
                DONE,
                EXIT,
                COMP_WQE,
                ERROR,
                CHECK_PSN,
            }
        ),
    ),
    CHECK_PSN: Step(
        _check_psn,
        frozenset(
            {
                DONE,
                ERROR_RETRY,
                COMP_WQE,
                COMP_ACK,
                CHECK_ACK,
            }
        ),
    ),
    CHECK_ACK: Step(
        _check_ack,
        frozenset(
            {
                READ,
                ATOMIC,
                WRITE_SEND,
                COMP_ACK,
                RNR_RETRY,
                ERROR_RETRY,
                ERROR,
                DONE,
            }
        ),
    ),
    READ: Step(_do_read, frozenset({COMP_ACK, UPDATE_COMP, ERROR})),
    ATOMIC: Step(_do_atomic, frozenset({COMP_ACK, ERROR})),
    WRITE_SEND: Step(_write_send, frozenset({COMP_ACK, UPDATE_COMP})),
    COMP_ACK: Step(_comp_ack, frozenset({UPDATE_COMP, DONE})),
    COMP_WQE: Step(_comp_wqe, frozenset({GET_WQE})),
    UPDATE_COMP: Step(_update_comp, frozenset({DONE})),
    ERROR_RETRY: Step(_error_retry, frozenset({DONE, ERROR})),
    RNR_RETRY: Step(_rnr_retry, frozenset({EXIT, ERROR})),
    ERROR: Step(_error, frozenset({DONE})),
    EXIT: Step(_exit, frozenset({ERROR_RETRY, DONE})),
}
"""The completer's state table (``COMPST_*``): every state but DONE has a
handler; the dispatcher checks each transition against it."""
