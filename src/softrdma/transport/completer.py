"""The RC completer: matches ACKs and responses to send WQEs and completes them.

Kernel counterpart: ``drivers/infiniband/sw/rxe/rxe_comp.c`` (``rxe_completer``
and its states ``COMPST_*``: ``get_wqe``, ``check_psn``, ``check_ack``,
``do_read``, ``do_atomic``, ``complete_ack``, ``complete_wqe``,
``do_complete``, ``make_send_cqe``, ``retransmit_timer``, ``rnrnak_usec``).

Every response packet (ACKNOWLEDGE, ATOMIC ACKNOWLEDGE, RDMA READ RESPONSE)
is run through the per-packet state machine :class:`CompState`, exactly
the rxe one. Without a packet the same machine retires WQEs that need no
ACK (local operations) or failed locally, and handles a fired retransmit
timer.

Per-packet states (``COMPST_*``) and their transitions::

    GET_WQE      head WQE: none/POSTED -> DONE | EXIT; DONE -> COMP_WQE;
                 ERROR -> ERROR; else packet ? CHECK_PSN : EXIT
    CHECK_PSN    psn > wqe.last_psn: SEND/WRITE -> COMP_WQE (implicitly
                 acknowledged), READ/atomic -> ERROR_RETRY (their data is
                 missing); psn < comp.psn: psn == last_psn ? COMP_ACK : DONE
                 (a duplicate); psn > comp.psn and READ/atomic -> DONE;
                 else -> CHECK_ACK
    CHECK_ACK    response sequence and opcode checks -> READ | ATOMIC |
                 WRITE_SEND | RNR_RETRY | ERROR_RETRY (NAK sequence error,
                 everything before the NAK'd PSN acknowledged) | ERROR;
                 a plain ACK at a READ/atomic WQE -> DONE
    READ         scatter the response payload -> COMP_ACK (last) | UPDATE_COMP
    ATOMIC       write the original value to the first SGE -> COMP_ACK
    WRITE_SEND   ACK of the WQE's last PSN -> COMP_ACK, else -> UPDATE_COMP
    COMP_ACK     complete the WQE, give back its READ/atomic credit ->
                 UPDATE_COMP | DONE
    COMP_WQE     complete the WQE -> GET_WQE (the packet may ack more)
    UPDATE_COMP  comp.psn := psn + 1 -> DONE
    ERROR_RETRY  timeout or sequence NAK: retry_cnt left ? ask the
                 requester to go back N -> DONE : IB_WC_RETRY_EXC_ERR -> ERROR
    RNR_RETRY    rnr_retry left (7 = forever) ? arm the RNR timer -> EXIT :
                 IB_WC_RNR_RETRY_EXC_ERR -> ERROR
    ERROR        complete the WQE with its error status, QP -> ERR
    EXIT / DONE  stop (EXIT: re-arm the retransmit timer if progress)

Deviations from rxe (each also noted where it happens): ``retry_cnt`` 7
means seven retries as IBTA says (rxe treats it as infinite), and a PSN
sequence NAK that acknowledges new PSNs counts as progress (resets the
count); a plain ACK never completes a READ or atomic (rxe completes one
without its data when a duplicate's re-ACK carries its PSN); protocol
violations by the responder complete with ``IB_WC_BAD_RESP_ERR`` (rxe
leaves the status unset or uses ``IB_WC_FATAL_ERR``), including READ
responses of the wrong length; the retransmit timer is only pushed back on
progress and is stopped while an RNR wait is on.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Final

from softrdma.transport.headers import RNR_NAK_USEC, AethType, NakCode
from softrdma.transport.memory_port import LocalAccessError
from softrdma.transport.opcodes import Opcode as _Op
from softrdma.transport.opcodes import OpcodeInfo
from softrdma.transport.packet import Packet
from softrdma.transport.params import RNR_RETRY_INFINITE
from softrdma.transport.psn import PSN_HALF, PSN_MASK
from softrdma.transport.wqe import (
    WR_ATOMIC,
    WR_IMM,
    WR_READ,
    Completion,
    CqSide,
    SendWqe,
    WqeState,
)
from softrdma.verbs.enums import IbWcFlags, IbWcStatus
from softrdma.verbs.wr import WorkCompletion

if TYPE_CHECKING:
    from collections.abc import Callable

    from softrdma.transport.requester import Requester

__all__ = ["CompState", "Completer"]


class CompState(enum.IntEnum):
    """rxe_comp.c ``enum comp_state`` (see the module docstring)."""

    GET_ACK = 0
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


# Module constants: a global lookup is cheaper than an enum attribute.
_C_ATOMIC = CompState.ATOMIC
_C_CHECK_ACK = CompState.CHECK_ACK
_C_CHECK_PSN = CompState.CHECK_PSN
_C_COMP_ACK = CompState.COMP_ACK
_C_COMP_WQE = CompState.COMP_WQE
_C_DONE = CompState.DONE
_C_ERROR = CompState.ERROR
_C_ERROR_RETRY = CompState.ERROR_RETRY
_C_EXIT = CompState.EXIT
_C_GET_WQE = CompState.GET_WQE
_C_READ = CompState.READ
_C_RNR_RETRY = CompState.RNR_RETRY
_C_UPDATE_COMP = CompState.UPDATE_COMP
_C_WRITE_SEND = CompState.WRITE_SEND
_POSTED, _PENDING, _DONE, _ERROR = (
    WqeState.POSTED,
    WqeState.PENDING,
    WqeState.DONE,
    WqeState.ERROR,
)
_READ_FIRST: Final = _Op.RC_RDMA_READ_RESPONSE_FIRST
_READ_MIDDLE: Final = _Op.RC_RDMA_READ_RESPONSE_MIDDLE
_READ_LAST: Final = _Op.RC_RDMA_READ_RESPONSE_LAST
_READ_ONLY: Final = _Op.RC_RDMA_READ_RESPONSE_ONLY
_READ_RESPONSES = frozenset({_READ_FIRST, _READ_MIDDLE, _READ_LAST, _READ_ONLY})
_ACK: Final = _Op.RC_ACKNOWLEDGE
_ATOMIC_ACK: Final = _Op.RC_ATOMIC_ACKNOWLEDGE
_NAK_STATUS: dict[int, IbWcStatus] = {
    NakCode.INVALID_REQUEST: IbWcStatus.REM_INV_REQ_ERR,
    NakCode.REMOTE_ACCESS_ERR: IbWcStatus.REM_ACCESS_ERR,
    NakCode.REMOTE_OP_ERR: IbWcStatus.REM_OP_ERR,
}
_SUCCESS = IbWcStatus.SUCCESS
_NO_FLAGS = IbWcFlags(0)


def _psn_diff(a: int, b: int) -> int:
    return ((a - b + PSN_HALF) & PSN_MASK) - PSN_HALF


class Completer:
    """The completion side of one RC QP (rxe ``qp->comp``).

    ``psn`` is the oldest PSN not yet acknowledged (``qp->comp.psn``),
    ``opcode`` the last READ response opcode of a response in progress (-1
    between messages). ``fatal`` is how the completer moves the QP to ERR.
    """

    def __init__(self, req: Requester, fatal: Callable[[IbWcStatus, str], None]) -> None:
        self.req = req
        self.fatal = fatal
        self.psn = 0
        self.opcode = -1
        self.retry_cnt = 0
        self.rnr_retry = 0
        self.started_retry = False
        self.timeout_retry = False
        self.mtu = 1024

    def start(self, psn: int) -> None:
        """Modify to RTS: nothing outstanding, fresh retry counters."""
        self.psn = psn
        self.opcode = -1
        self.reset_retry_counters()

    def reset_retry_counters(self) -> None:
        """rxe_comp.c ``reset_retry_counters``: any valid response is progress."""
        p = self.req.params
        self.retry_cnt = p.retry_cnt
        self.rnr_retry = p.rnr_retry
        self.started_retry = False

    # -- entry points ---------------------------------------------------------

    def receive(self, pkt: Packet, info: OpcodeInfo, now: float) -> None:
        """Process one response packet (rxe ``rxe_comp_queue_pkt`` +
        ``rxe_completer`` from ``COMPST_GET_ACK`` with a packet)."""
        self.timeout_retry = False
        self.mtu = self.req.params.path_mtu
        self._run(pkt, info, now)

    def run(self, now: float, timeout: bool = False) -> None:
        """Run without a packet: retire WQEs that need no ACK, report local
        errors, and retry after a retransmit timeout (rxe ``retransmit_timer``
        → ``rxe_completer`` with ``comp.timeout``)."""
        self.timeout_retry = timeout
        self._run(None, None, now)

    # -- the state machine ----------------------------------------------------

    def _head(self) -> SendWqe | None:
        req = self.req
        return req.sq[req.sq_head] if req.sq_head < len(req.sq) else None

    def _run(self, pkt: Packet | None, info: OpcodeInfo | None, now: float) -> None:
        progress = False
        timed_out = False
        psn_before = self.psn
        wqe: SendWqe | None = None
        state = _C_GET_WQE
        while True:
            if state is _C_GET_WQE:
                wqe = self._head()
                if wqe is None or wqe.state is _POSTED:
                    state = _C_DONE if pkt is not None else _C_EXIT
                elif wqe.state is _DONE:
                    state = _C_COMP_WQE
                elif wqe.state is _ERROR:
                    state = _C_ERROR
                else:
                    state = _C_CHECK_PSN if pkt is not None else _C_EXIT
                continue
            if state is _C_CHECK_PSN:
                assert pkt is not None and wqe is not None
                state = self._check_psn(pkt, wqe)
            elif state is _C_CHECK_ACK:
                assert pkt is not None and info is not None and wqe is not None
                state = self._check_ack(pkt, info, wqe)
            elif state is _C_READ:
                assert pkt is not None and info is not None and wqe is not None
                state = self._do_read(pkt, info, wqe)
            elif state is _C_ATOMIC:
                assert pkt is not None and wqe is not None
                state = self._do_atomic(pkt, wqe)
            elif state is _C_WRITE_SEND:
                assert pkt is not None and wqe is not None
                if wqe.state is _PENDING and wqe.last_psn == pkt.bth.psn:
                    state = _C_COMP_ACK
                else:
                    state = _C_UPDATE_COMP
            elif state is _C_COMP_ACK:
                assert pkt is not None and wqe is not None
                state = self._complete_ack(pkt, wqe)
                progress = True
            elif state is _C_COMP_WQE:
                assert wqe is not None
                self._complete_wqe(pkt, wqe)
                progress = True
                state = _C_GET_WQE
            elif state is _C_UPDATE_COMP:
                assert pkt is not None and info is not None
                self.opcode = -1 if info.ends_message else pkt.bth.opcode
                psn = pkt.bth.psn
                if _psn_diff(psn, self.psn) >= 0:
                    self.psn = (psn + 1) & PSN_MASK
                state = _C_DONE
            elif state is _C_ERROR_RETRY:
                state = self._error_retry(wqe)
            elif state is _C_RNR_RETRY:
                assert pkt is not None and wqe is not None
                state = self._rnr_retry(pkt, wqe, now)
            elif state is _C_ERROR:
                assert wqe is not None
                if wqe.status is _SUCCESS:
                    wqe.status = IbWcStatus.BAD_RESP_ERR
                self._do_complete(wqe)
                self.fatal(wqe.status, f"send WQE wr_id={wqe.wr.wr_id:#x} failed")
                return
            elif state is _C_EXIT:
                if self.timeout_retry and wqe is not None and not timed_out:
                    timed_out = True  # handle the timeout once
                    state = _C_ERROR_RETRY
                    continue
                break
            else:  # DONE
                break
        # rxe re-arms the retransmit timer after every response; here only on
        # progress, so a peer repeating stale ACKs cannot keep us alive forever.
        if progress or self.psn != psn_before:
            self._rearm(now)

    def _rearm(self, now: float) -> None:
        req = self.req
        if req.wait_for_rnr_timer or req.ack_timeout is None:
            return
        if _psn_diff(req.psn, self.psn) > 0:
            req.retrans_deadline = now + req.ack_timeout
        else:
            req.retrans_deadline = None

    def _check_psn(self, pkt: Packet, wqe: SendWqe) -> CompState:
        """rxe_comp.c ``check_psn``."""
        psn = pkt.bth.psn
        if _psn_diff(psn, wqe.last_psn) > 0:
            # The response is past the oldest WQE: a SEND/WRITE is implicitly
            # acknowledged; a READ/atomic lost its response and is retried.
            if wqe.state is _PENDING:
                if wqe.mask & (WR_READ | WR_ATOMIC):
                    return _C_ERROR_RETRY
                self.reset_retry_counters()
                return _C_COMP_WQE
            return _C_DONE
        diff = _psn_diff(psn, self.psn)
        if diff < 0:
            # A duplicate; it completes the WQE only if it is its last PSN.
            return _C_COMP_ACK if psn == wqe.last_psn and wqe.state is _PENDING else _C_DONE
        if diff > 0 and wqe.mask & (WR_READ | WR_ATOMIC):
            return _C_DONE
        return _C_CHECK_ACK

    def _check_ack(self, pkt: Packet, info: OpcodeInfo, wqe: SendWqe) -> CompState:
        """rxe_comp.c ``check_ack``: response sequence, then opcode."""
        op = pkt.bth.opcode
        if self.opcode == -1:
            if not info.starts_message:  # MIDDLE/LAST without FIRST
                wqe.status = IbWcStatus.BAD_RESP_ERR
                return _C_ERROR
        elif (
            op != _READ_MIDDLE
            and op != _READ_LAST
            # A retried READ may restart with FIRST (or ONLY) at its first PSN.
            and not (op == _READ_FIRST and pkt.bth.psn == wqe.first_psn)
            and not (op == _READ_ONLY and wqe.first_psn == wqe.last_psn)
        ):
            wqe.status = IbWcStatus.BAD_RESP_ERR
            return _C_ERROR

        aeth = pkt.aeth
        if op in _READ_RESPONSES:
            if aeth is not None and aeth.syndrome >> 5 != AethType.ACK:
                wqe.status = IbWcStatus.BAD_RESP_ERR
                return _C_ERROR
            if not wqe.mask & WR_READ:
                wqe.status = IbWcStatus.BAD_RESP_ERR
                return _C_ERROR
            self.reset_retry_counters()
            return _C_READ
        assert aeth is not None  # ACKNOWLEDGE and ATOMIC ACKNOWLEDGE carry one
        kind = aeth.syndrome >> 5
        if op == _ATOMIC_ACK:
            if kind != AethType.ACK or not wqe.mask & WR_ATOMIC:
                wqe.status = IbWcStatus.BAD_RESP_ERR
                return _C_ERROR
            self.reset_retry_counters()
            return _C_ATOMIC
        if op == _ACK:
            if kind == AethType.ACK:
                if wqe.mask & (WR_READ | WR_ATOMIC):
                    # Only its response completes a READ / atomic. A plain ACK
                    # at its PSN is the responder re-acknowledging a duplicate
                    # (C9-105: PSN of the last request executed); rxe would
                    # complete the WQE here without its data.
                    return _C_DONE
                self.reset_retry_counters()
                return _C_WRITE_SEND
            if kind == AethType.RNR_NAK:
                return _C_RNR_RETRY
            if kind == AethType.NAK:
                code = aeth.syndrome & 0x1F
                if code == NakCode.PSN_SEQ_ERR:
                    self.req.out.counters["rcvd_seq_err"] += 1
                    # A sequence NAK acknowledges every PSN before it. That is
                    # progress, so the retry count starts over (rxe only
                    # resets it on an ACK; under steady loss a long message
                    # would then exhaust it while still advancing).
                    if _psn_diff(pkt.bth.psn, self.psn) > 0:
                        self.psn = pkt.bth.psn
                        self.req.wait_psn = False
                        self.reset_retry_counters()
                    return _C_ERROR_RETRY
                # Unknown NAK codes are a remote operational error (rxe).
                wqe.status = _NAK_STATUS.get(code, IbWcStatus.REM_OP_ERR)
                return _C_ERROR
        # Reserved AETH type or a response opcode that is not one.
        wqe.status = IbWcStatus.BAD_RESP_ERR
        return _C_ERROR

    def _do_read(self, pkt: Packet, info: OpcodeInfo, wqe: SendWqe) -> CompState:
        """rxe_comp.c ``do_read``: scatter the response into the local SGEs."""
        payload = pkt.payload
        n = len(payload)
        remaining = wqe.length - wqe.offset
        # Every response but the last carries exactly one MTU; anything else
        # would put data at the wrong offset (rxe does not check this).
        if (n != remaining) if info.ends_message else (n != self.mtu or n >= remaining):
            wqe.status = IbWcStatus.BAD_RESP_ERR
            return _C_ERROR
        if n:
            try:
                self.req.mem.scatter(wqe.wr.sg_list, wqe.offset, payload)
            except LocalAccessError as e:
                wqe.status = e.status
                return _C_ERROR
            wqe.offset += n
        if info.ends_message:
            return _C_COMP_ACK
        return _C_UPDATE_COMP

    def _do_atomic(self, pkt: Packet, wqe: SendWqe) -> CompState:
        """rxe_comp.c ``do_atomic``: the original remote value, a host-order
        (little-endian) u64, goes to the first SGE."""
        atmack = pkt.atmack
        assert atmack is not None
        try:
            self.req.mem.scatter(wqe.wr.sg_list, 0, atmack.orig_data.to_bytes(8, "little"))
        except LocalAccessError as e:
            wqe.status = e.status
            return _C_ERROR
        return _C_COMP_ACK

    def _do_complete(self, wqe: SendWqe) -> None:
        """rxe_comp.c ``do_complete`` / ``make_send_cqe``: a CQE when the WQE
        is signaled (or the QP signals all) or failed (IBTA 10.7.3.1)."""
        req = self.req
        status = wqe.status
        if wqe.signaled or status is not _SUCCESS or req.params.sq_sig_all:
            ok = status is _SUCCESS
            wc = WorkCompletion(
                wqe.wr.wr_id,
                status,
                wqe.wc_opcode,
                req.qpn,
                wqe.length if ok else 0,
                IbWcFlags.WITH_IMM if ok and wqe.mask & WR_IMM else _NO_FLAGS,
            )
            req.out.completions.append(Completion(CqSide.SEND, wc))
        req.sq_head += 1
        req.wait_fence = False
        # Compact the queue now and then; indices are relative to the list.
        head = req.sq_head
        if head >= 256 and head * 2 >= len(req.sq):
            del req.sq[:head]
            req.sq_head = 0
            req.wqe_index -= head

    def _complete_ack(self, pkt: Packet, wqe: SendWqe) -> CompState:
        """rxe_comp.c ``complete_ack``: return the READ/atomic credit."""
        req = self.req
        if wqe.has_rd_atomic:
            wqe.has_rd_atomic = False
            req.rd_atomic += 1
            req.need_rd_atomic = False
        self._do_complete(wqe)
        return _C_UPDATE_COMP if _psn_diff(pkt.bth.psn, self.psn) >= 0 else _C_DONE

    def _complete_wqe(self, pkt: Packet | None, wqe: SendWqe) -> None:
        """rxe_comp.c ``complete_wqe``: a WQE acknowledged by a later PSN, or
        one that needed no ACK."""
        if pkt is not None and wqe.state is _PENDING:
            if _psn_diff(wqe.last_psn, self.psn) >= 0:
                self.psn = (wqe.last_psn + 1) & PSN_MASK
                self.opcode = -1
            self.req.wait_psn = False
        if wqe.has_rd_atomic:  # defensive: only READ/atomic hold one
            wqe.has_rd_atomic = False
            self.req.rd_atomic += 1
        self._do_complete(wqe)

    def _error_retry(self, wqe: SendWqe | None) -> CompState:
        """rxe_comp.c ``COMPST_ERROR_RETRY``: a timeout or a sequence NAK."""
        if wqe is None or wqe.state is _POSTED:
            return _C_EXIT
        # One retry sequence at a time, unless the timer fired again.
        if self.started_retry and not self.timeout_retry:
            return _C_DONE
        if self.retry_cnt > 0:
            # IBTA: retry_cnt 7 is seven retries (rxe treats 7 as infinite).
            self.retry_cnt -= 1
            req = self.req
            if _psn_diff(req.psn, self.psn) > 0:
                req.need_retry = True
                self.started_retry = True
                req.out.counters["completer_retry_err"] += 1
            return _C_DONE
        wqe.status = IbWcStatus.RETRY_EXC_ERR
        self.req.out.counters["retry_exceeded_err"] += 1
        return _C_ERROR

    def _rnr_retry(self, pkt: Packet, wqe: SendWqe, now: float) -> CompState:
        """rxe_comp.c ``COMPST_RNR_RETRY``: wait the advertised RNR time,
        then go back N (``rnr_nak_timer``)."""
        self.req.out.counters["rcvd_rnr_err"] += 1
        if self.rnr_retry > 0:
            if self.rnr_retry != RNR_RETRY_INFINITE:
                self.rnr_retry -= 1
            req = self.req
            assert pkt.aeth is not None
            req.wait_for_rnr_timer = True
            req.rnr_deadline = now + RNR_NAK_USEC[pkt.aeth.syndrome & 0x1F] * 1e-6
            # The RNR wait is not a missing ACK: stop the retransmit timer.
            req.retrans_deadline = None
            return _C_EXIT
        wqe.status = IbWcStatus.RNR_RETRY_EXC_ERR
        self.req.out.counters["retry_rnr_exceeded_err"] += 1
        return _C_ERROR


def send_wc(wqe: SendWqe, qpn: int, status: IbWcStatus) -> WorkCompletion:
    """A send completion for ``wqe`` with ``status`` (used for flushes)."""
    return WorkCompletion(wqe.wr.wr_id, status, wqe.wc_opcode, qpn)
